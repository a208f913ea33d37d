"""Streaming statistics of a pass over the probe set: one protocol for all of them.

A `Statistic` is four functions over a pytree state, in the style of optax's
transformations:

- `init(shard) -> state`: the empty state of shard `shard` (the device's position
  in the global `data` mesh, unique over the devices of every host), so that
  randomised statistics draw independent coins per device (`shard_seed`).
- `update(state, batch) -> state`: pure and jittable. `batch` holds the loader's
  fields of this device's rows (`index`, `valid`, and `pixel_labels`/`image_labels`
  where the pass reads labels) and `acts`: {layer: float32 [B, h, w, K]}.
- `merge(a, b) -> state`: pure and jittable, associative (bitwise for the exact
  statistics; up to the sketch's error for the sketch). `merge_devices` merges a
  stacked per-device state with it; the engine and the tests use the same function.
- `finalize(state) -> {name: numpy array}`: host side, what the pass stores.

Constants a statistic needs (a pass-2 tally's thresholds) live in its state, so a
statistic is self-contained and a driver needs to know nothing about it. A
statistic's `key` names everything its `update` and `merge` close over (layer,
mode, label space...): statistics with equal keys compute the same function of
(state, batch), so a driver may reuse one compiled step for all of them; `KeyClaims`
refuses an equal key whose functions visibly close over other constants. `group`
makes one statistic of several (a dict state); adding a statistic to a pass, or a
pass to a dissection, touches no driver code.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdissect import code_keys, quantiles, store, tally, tie_counts, topimages
from jaxdissect.labelspace import LabelSpace

State = Any
Batch = Mapping[str, Any]


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or infinite activations."""


class Statistic(NamedTuple):
    """A mergeable streaming statistic (see the module docstring).

    key: hashable, equal only for statistics whose `update` and `merge` are the same
      functions of their arguments; None (a statistic built ad hoc): never shared.
    parts: a `group`'s members by name (its state and update are the dict of theirs),
      so that a driver may compile and run each part's update as its own program;
      None for any other statistic.
    """

    init: Callable[[int], State]
    update: Callable[[State, Batch], State]
    merge: Callable[[State, State], State]
    finalize: Callable[[State], dict[str, np.ndarray]]
    key: Hashable | None = None
    parts: Mapping[str, Statistic] | None = None


def _size_key(size: tuple[int, int] | None) -> tuple[int, ...] | None:
    return None if size is None else tuple(int(n) for n in size)


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard `shard`: `seed` itself for shard 0, distinct for every other.

    Successive splitmix64 increments, which the sketch's own seed hashing scrambles
    into independent coin streams.
    """
    return (int(seed) + int(shard) * 0x9E3779B97F4A7C15) % 2**64


def merge_schedule(n: int) -> list[tuple[int, int]]:
    """The pairwise tree over `n` stacked states as (a, b) slots, in order: `merge(a, b)`
    goes into slot a. Level by level, the i-th live state merges with the (i+1)-th for
    even i (an odd last one moves up unchanged); slot 0 ends with the result."""
    live, pairs = list(range(n)), []
    while len(live) > 1:
        pairs += [(live[i], live[i + 1]) for i in range(0, len(live) - 1, 2)]
        live = live[0::2]
    return pairs


def _reduce_pairs(merge: Callable[[State, State], State], stacked: State) -> State:
    """`merge_schedule`'s merges, one at a time in a loop: the program holds one copy of
    `merge` whatever the number of states, and runs exactly the tree's n - 1 merges."""
    pairs = merge_schedule(shard_count(stacked))
    if len(pairs) == 1:  # two states: no loop
        return merge(*(jax.tree.map(lambda x, i=i: x[i], stacked) for i in pairs[0]))
    schedule = jnp.asarray(pairs, jnp.int32).reshape(-1, 2)

    def one(j, states):
        a, b = (
            jax.tree.map(lambda x, i=i: lax.dynamic_index_in_dim(x, i, keepdims=False), states)
            for i in (schedule[j, 0], schedule[j, 1])
        )
        return jax.tree.map(
            lambda x, m: lax.dynamic_update_index_in_dim(x, m, schedule[j, 0], 0),
            states,
            merge(a, b),
        )

    out = lax.fori_loop(0, schedule.shape[0], one, stacked)
    return jax.tree.map(lambda x: x[0], out)


# `merge_program(merge, stacked)`: the jitted reduction (a driver may compile it ahead).
merge_program = jax.jit(_reduce_pairs, static_argnums=0)


def merge_devices(merge: Callable[[State, State], State], stacked: State) -> State:
    """Merge states stacked on a leading (device) axis: a jitted pairwise tree reduction.

    Shard 2i merges with 2i+1 at each level (an odd last one moves up unchanged), so
    the result depends only on the stacked values, not on hosts or the backend's
    scheduling.
    """
    if shard_count(stacked) == 1:
        return jax.tree.map(lambda x: x[0], stacked)
    return merge_program(merge, stacked)


def shard_count(stacked: State) -> int:
    """The length of the leading (device) axis of stacked states."""
    return jax.tree.leaves(stacked)[0].shape[0]


def stack_shards(statistic: Statistic, num_shards: int) -> State:
    """`init(shard)` of every shard, stacked on a leading axis (numpy, host)."""
    states = [jax.device_get(statistic.init(i)) for i in range(num_shards)]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)


def group(statistics: Mapping[str, Statistic]) -> Statistic:
    """Several statistics as one, with a dict state (and a dict of finalized dicts).

    Raises ValueError for no statistic, and for parts (at any depth) with equal keys whose
    `update` or `merge` close over other constants (`KeyClaims`).
    """
    stats = dict(statistics)
    if not stats:
        raise ValueError(
            "statistics.group(statistics={}): give at least one statistic {name: Statistic}"
        )
    claims = KeyClaims("statistics.group")
    for name, s in stats.items():
        claims.add(s, (name,))

    def init(shard: int) -> dict[str, State]:
        return {name: s.init(shard) for name, s in stats.items()}

    def update(state: dict[str, State], batch: Batch) -> dict[str, State]:
        return {name: s.update(state[name], batch) for name, s in stats.items()}

    def merge(a: dict[str, State], b: dict[str, State]) -> dict[str, State]:
        return {name: s.merge(a[name], b[name]) for name, s in stats.items()}

    def finalize(state: dict[str, State]) -> dict[str, Any]:
        return {name: s.finalize(state[name]) for name, s in stats.items()}

    keys = tuple((name, s.key) for name, s in stats.items())
    key = None if any(k is None for _, k in keys) else ("group", keys)
    return Statistic(init, update, merge, finalize, key, stats)


# ----------------------------------------------------------------------------- keys


def constants(statistic: Statistic) -> dict[store.Label, Any]:
    """What `statistic`'s `update` and `merge` visibly close over: their code objects and
    plain constants (`code_keys.plain_constant`) by label (a group: its parts', named); arrays and other
    objects are left out, so they are never compared."""
    if statistic.parts:
        return {
            (f"part {name!r}'s {fn}", bound): value
            for name, part in statistic.parts.items()
            for (fn, bound), value in constants(part).items()
        }
    return {
        **dict(code_keys.function_constants(statistic.update, "update")),
        **dict(code_keys.function_constants(statistic.merge, "merge")),
    }


def _shown(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return f"{value.co_name} at {value.co_filename}:{value.co_firstlineno}"
    return _short(repr(value))


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(path: tuple[str, ...]) -> str:
    return f"part {'/'.join(path)!r}" if path else "the statistic"


class KeyClaims:
    """What the statistics seen so far under each key close over (`constants`).

    A key promises that `update` and `merge` are the same functions of their arguments;
    where a later statistic (or part) with an equal key visibly closes over other code or
    another constant, `add` raises ValueError naming both and the constant. The states'
    shapes are not compared: a key may serve several (tallies of layers of other widths).
    """

    def __init__(self, caller: str, earlier: str = ""):
        self._caller, self._earlier = caller, earlier  # in messages: who refuses; "seen when"
        self._seen: dict[Hashable, tuple[dict[store.Label, Any], str]] = {}

    def add(self, statistic: Statistic, path: tuple[str, ...] = ()) -> None:
        """Claim the keys of `statistic` (at part `path` of what is checked) and its parts."""
        for name, part in (statistic.parts or {}).items():
            self.add(part, (*path, name))
        if statistic.key is None:
            return
        mine, where = constants(statistic), _where(path)
        seen = self._seen.get(statistic.key)
        if seen is None:
            self._seen[statistic.key] = (mine, where)
            return
        theirs, there = seen
        for label in [label for label in mine if label in theirs]:  # in order: code first
            a, b = mine[label], theirs[label]
            try:
                if a == b:
                    continue
            except Exception:  # values that do not compare: not told apart
                continue
            fn, name = label
            if name is None:
                detail = f"its {fn} is other code ({_shown(a)}, not {_shown(b)})"
            else:
                detail = f"its {fn} closes over {name} = {_shown(a)}, not {_shown(b)}"
            raise ValueError(
                f"{self._caller}: {where} has key {_short(repr(statistic.key))} like {there}"
                f"{self._earlier}, "
                f"but {detail}: a key must name every constant update and merge close over"
            )


# ----------------------------------------------------------------------------- pass 1


def quantile_statistic(
    layer: str,
    num_units: int,
    *,
    total_count: int,
    q: float,
    mode: str,
    seed: int = 0,
    sketch_size: int | None = None,
    upsample_to: tuple[int, int] | None = None,
    activation_dtype: str = "float32",
    name: str | None = None,
) -> Statistic:
    """Each unit's threshold T_k of `layer` (`quantiles`), `mode` "exact", "sketch",
    "histogram" (16-bit `activation_dtype`, raw maps) or "auto" (`quantiles.resolve_mode`).

    name: the layer's name in messages (default: `layer`).

    total_count: values per unit over the whole probe set (all shards together).
    upsample_to: threshold the maps upsampled to this size (the PNAS variant).
    activation_dtype: what the activations were rounded to (the histogram counts its values).
    finalize gives {"thresholds": float32 [K]} and raises `NonFiniteActivationError`
    where the layer produced NaN or inf.
    """
    if mode not in quantiles.MODES:
        raise ValueError(f"quantile_mode={mode!r}; allowed values: {', '.join(quantiles.MODES)}")
    mode = quantiles.resolve_mode(
        mode, num_units, activation_dtype, total_count, upsampled=upsample_to is not None, q=q
    )
    if mode == "histogram":
        if upsample_to is not None:
            raise ValueError(
                "quantile_mode='histogram' counts the raw 16-bit maps: not with "
                "threshold_on='upsampled' (interpolated values); use sketch or exact"
            )
        quantiles.histogram.check_histogram(activation_dtype, total_count, num_units)

    def init(shard: int):
        if mode == "exact":
            return quantiles.exact_init(num_units, total_count, q)
        if mode == "histogram":
            return quantiles.histogram_init(num_units, activation_dtype, total_count, q)
        kwargs = {} if sketch_size is None else {"size": sketch_size}
        return quantiles.sketch_init(
            num_units,
            q=q,
            seed=shard_seed(seed, shard),
            max_count=max(total_count, 1),
            **kwargs,
        )

    def update(state, batch):
        a = batch["acts"][layer]
        b = a.shape[0]
        if upsample_to is not None:
            a = tally.upsample(a, upsample_to)
        rows = a.reshape(-1, num_units)
        valid = jnp.repeat(batch["valid"], rows.shape[0] // b)
        if mode == "exact":
            return quantiles.exact_update(state, rows, valid)
        if mode == "histogram":
            return quantiles.histogram_update(state, rows, valid)
        return quantiles.sketch_update(state, rows, valid)

    merge = {
        "exact": quantiles.exact_merge,
        "histogram": quantiles.histogram_merge,
        "sketch": quantiles.sketch_merge,
    }[mode]

    def finalize(state):
        nonfinite = np.asarray(state.nonfinite)
        if nonfinite.any():
            units = np.flatnonzero(nonfinite)
            hint = ""
            if activation_dtype == "float16":
                hint = (
                    "; if the model's own outputs are finite, they overflowed "
                    f"activation_dtype={activation_dtype} (beyond +-65504): try "
                    "activation_dtype=float32"
                )
            raise NonFiniteActivationError(
                f"layer {name or layer!r}: {int(nonfinite.sum())} NaN/inf activations in units "
                f"{units[:20].tolist()}{' ...' if len(units) > 20 else ''}. Check the model's "
                "weights and input normalisation" + hint
            )
        if mode == "exact":
            thresholds = quantiles.exact_threshold(state, q)
        elif mode == "histogram":
            thresholds = quantiles.histogram_threshold(state, q)
        else:
            thresholds = quantiles.sketch_threshold(state, q)
        return {"thresholds": np.asarray(thresholds, np.float32)}

    dtype_key = activation_dtype if mode == "histogram" else None
    key = ("quantile", layer, num_units, mode, dtype_key, _size_key(upsample_to))
    return Statistic(init, update, merge, finalize, key)


def top_images_statistic(
    layer: str, num_units: int, k: int, map_size: tuple[int, int] | None = None
) -> Statistic:
    """Each unit's `k` top images of `layer` by peak activation (`topimages`), with
    their raw maps when `map_size` (h, w) is given.

    finalize gives {"top_values", "top_indices"} and, with maps, "top_maps"
    float32 [k, h, w, K].
    """

    def init(shard: int):
        return topimages.init(num_units, k, map_size)

    def update(state, batch):
        return topimages.update(state, batch["acts"][layer], batch["index"], batch["valid"])

    def finalize(state):
        out = {"top_values": np.asarray(state.values), "top_indices": np.asarray(state.indices)}
        if state.maps is not None:
            out["top_maps"] = np.asarray(state.maps, np.float32)
        return out

    key = ("top_images", layer, num_units, k, _size_key(map_size))
    return Statistic(init, update, topimages.merge, finalize, key)


# ----------------------------------------------------------------------------- pass 2


def tally_statistic(
    layer: str,
    thresholds: np.ndarray,
    labels: LabelSpace,
    *,
    restriction: str,
    method: str = "auto",
    tie_rule: str = "strict",
    patterns: bool = False,
) -> Statistic:
    """Exact IoU counts of `layer`'s units thresholded at `thresholds` (`tally`), the
    mask compared with the threshold by `tie_rule` (`jaxdissect.tie_rule`); `patterns`:
    also the unit totals by restriction pattern (`tally.batch_counts`).

    The thresholds ride in the state, so one compiled step serves any thresholds.
    finalize gives the int64 counts of `tally.tally_to_numpy`.
    """
    thresholds = np.asarray(thresholds, np.float32)
    num_units = thresholds.shape[0]
    primary = np.asarray(labels.primary, np.int32)
    num_categories = labels.num_categories

    def init(shard: int):
        return {
            "thresholds": jax.device_put(thresholds),
            "counts": tally.tally_init(num_units, labels, patterns=patterns),
        }

    def update(state, batch):
        counts = tally.batch_counts(
            batch["acts"][layer],
            state["thresholds"],
            batch,
            jnp.asarray(primary),
            num_categories,
            restriction=restriction,
            method=method,
            tie_rule=tie_rule,
            patterns=patterns,
        )
        return {**state, "counts": tally.tally_add(state["counts"], counts)}

    def merge(a, b):
        return {
            "thresholds": a["thresholds"],
            "counts": tally.tally_merge(a["counts"], b["counts"]),
        }

    def finalize(state):
        return tally.tally_to_numpy(state["counts"])

    key = (
        "tally",
        layer,
        primary.tobytes(),
        num_categories,
        restriction,
        method,
        tie_rule,
        patterns,
    )
    return Statistic(init, update, merge, finalize, key)


def ties_statistic(
    layer: str, thresholds: np.ndarray, *, upsample_to: tuple[int, int] | None = None
) -> Statistic:
    """Each unit's minimum, maximum and count of activations equal to its threshold, in
    the thresholds' domain: the raw maps, or (`upsample_to`) the upsampled ones (`tie_counts`).

    finalize gives the arrays of `tie_counts.ties_to_numpy`.
    """
    thresholds = np.asarray(thresholds, np.float32)

    def init(shard: int):
        return {
            "thresholds": jax.device_put(thresholds),
            "ties": tie_counts.ties_init(thresholds.shape[0]),
        }

    def update(state, batch):
        maps = batch["acts"][layer]
        if upsample_to is not None:
            maps = tally.upsample(maps, upsample_to)
        new = tie_counts.ties_update(state["ties"], maps, state["thresholds"], batch["valid"])
        return {**state, "ties": new}

    def merge(a, b):
        return {"thresholds": a["thresholds"], "ties": tie_counts.ties_merge(a["ties"], b["ties"])}

    def finalize(state):
        return tie_counts.ties_to_numpy(state["ties"])

    return Statistic(init, update, merge, finalize, ("ties", layer, _size_key(upsample_to)))


__all__ = [
    "KeyClaims",
    "NonFiniteActivationError",
    "Statistic",
    "constants",
    "group",
    "merge_devices",
    "merge_schedule",
    "merge_program",
    "quantile_statistic",
    "shard_seed",
    "stack_shards",
    "tally_statistic",
    "ties_statistic",
    "top_images_statistic",
]
