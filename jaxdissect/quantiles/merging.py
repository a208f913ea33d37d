"""Merging many states of either mode: stacked on device, or a list on the host."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxdissect.quantiles.exact import ExactState, exact_merge
from jaxdissect.quantiles.sketch import SketchState, sketch_merge


def merge_all(stacked: ExactState | SketchState) -> ExactState | SketchState:
    """Merge states stacked along a leading axis (e.g. the output of `lax.all_gather`
    inside `jax.shard_map`, or `jnp.stack`ed host states). jit-able.

    A left fold in a `fori_loop`, so the merge is traced once whatever the axis length.
    """
    merge = exact_merge if isinstance(stacked, ExactState) else sketch_merge
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    first = jax.tree_util.tree_map(lambda a: a[0], stacked)
    if n == 1:
        return first

    def body(i, acc):
        return merge(acc, jax.tree_util.tree_map(lambda a: a[i], stacked))

    return jax.lax.fori_loop(1, n, body, first)


_exact_merge_jit = jax.jit(exact_merge)
_sketch_merge_jit = jax.jit(sketch_merge)


def merge_list(states: Sequence, merge=None):
    """Merge a list of states pairwise (tree order, deterministic), e.g. on a host after
    `jax.device_get`. `merge` defaults to the jitted merge of the states' mode."""
    if not states:
        raise ValueError("nothing to merge")
    if merge is None:
        merge = _exact_merge_jit if isinstance(states[0], ExactState) else _sketch_merge_jit
    states = list(states)
    while len(states) > 1:
        nxt = [merge(states[i], states[i + 1]) for i in range(0, len(states) - 1, 2)]
        if len(states) % 2:
            nxt.append(states[-1])
        states = nxt
    return states[0]
