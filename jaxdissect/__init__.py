"""jaxdissect: Network Dissection in JAX/Flax."""
