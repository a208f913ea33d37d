"""Flax model definitions and PyTorch weight import."""
