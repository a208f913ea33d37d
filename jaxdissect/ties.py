"""Units whose threshold sits on a tie: per-unit statistics and their classification.

A unit's mask is S > T (`tie_rule="strict"`, NetDissect-Lite) or S >= T (`"inclusive"`,
the paper's formula). The two agree for continuous activations and differ completely when
many activations equal T: a clipping nonlinearity (ReLU6) puts more than the quantile's
mass at its cap, so T = cap and the strict mask is empty; a dead unit is constant, so both
rules give it a mask of nothing or of everything. The statistics here, in the domain the
thresholds were computed on (raw or upsampled maps), say which units are affected:

- minimum, maximum: of the unit's activations over the probe set;
- at_threshold: how many activations equal T; values: how many activations there are.

States (`unit_states`), first match wins:

- "dead": minimum == maximum, the unit is constant over the probe set (T equals both);
- "saturated": T == maximum and at_threshold > quantile * values: the threshold is the
  unit's cap (strict marks nothing, inclusive all the positions at the cap);
- "tied": at_threshold > quantile * values with T below the maximum (a mostly-zero ReLU unit
  with T = 0, for one): the mask covers less (strict) or more (inclusive) than the quantile;
- "": none of these.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.tally import WideCount

DEAD, SATURATED, TIED = "dead", "saturated", "tied"
TIE_STATES = (DEAD, SATURATED, TIED)


@flax.struct.dataclass
class TieState:
    """Running tie statistics of one layer's K units (see module docstring)."""

    minimum: jax.Array  # float32 [K], +inf before any value
    maximum: jax.Array  # float32 [K], -inf before any value
    at_threshold: WideCount  # [K]
    values: WideCount  # []


def ties_init(num_units: int) -> TieState:
    """Empty statistics for `num_units` units."""
    return TieState(
        minimum=jnp.full((num_units,), jnp.inf, jnp.float32),
        maximum=jnp.full((num_units,), -jnp.inf, jnp.float32),
        at_threshold=WideCount.zeros((num_units,)),
        values=WideCount.zeros(()),
    )


def ties_update(
    state: TieState, maps: jax.Array, thresholds: jax.Array, valid: jax.Array
) -> TieState:
    """Add a batch of maps [B, h, w, K] (rows with valid=False ignored); jit-able.

    `maps` are in the thresholds' domain (raw or upsampled), B * h * w < 2**30.
    """
    maps = jnp.asarray(maps, jnp.float32)
    b, h, w, k = maps.shape
    keep = jnp.asarray(valid, bool)[:, None, None, None]
    low = jnp.where(keep, maps, jnp.inf).min((0, 1, 2))
    high = jnp.where(keep, maps, -jnp.inf).max((0, 1, 2))
    at = (keep & (maps == jnp.asarray(thresholds, jnp.float32))).sum((0, 1, 2), dtype=jnp.int32)
    n = jnp.asarray(valid, bool).sum(dtype=jnp.int32) * (h * w)
    return TieState(
        minimum=jnp.minimum(state.minimum, low),
        maximum=jnp.maximum(state.maximum, high),
        at_threshold=state.at_threshold.add(at),
        values=state.values.add(n),
    )


def ties_merge(a: TieState, b: TieState) -> TieState:
    """Statistics of the union of two states (associative and commutative)."""
    return TieState(
        minimum=jnp.minimum(a.minimum, b.minimum),
        maximum=jnp.maximum(a.maximum, b.maximum),
        at_threshold=a.at_threshold.merge(b.at_threshold),
        values=a.values.merge(b.values),
    )


def ties_to_numpy(state: TieState) -> dict[str, np.ndarray]:
    """Host arrays: float32 minimum, maximum [K], int64 at_threshold [K], values []."""
    return {
        "minimum": np.asarray(state.minimum, np.float32),
        "maximum": np.asarray(state.maximum, np.float32),
        "at_threshold": state.at_threshold.to_numpy(),
        "values": state.values.to_numpy(),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class UnitTies:
    """One layer's tie statistics on the host, with the thresholds and quantile they refer to."""

    thresholds: np.ndarray  # float32 [K]
    minimum: np.ndarray  # float32 [K]
    maximum: np.ndarray  # float32 [K]
    at_threshold: np.ndarray  # int64 [K]
    values: int
    quantile: float

    @classmethod
    def from_arrays(cls, arrays, thresholds: np.ndarray, quantile: float) -> UnitTies:
        """From `ties_to_numpy`'s dict (or a stored copy of it)."""
        return cls(
            thresholds=np.asarray(thresholds, np.float32),
            minimum=np.asarray(arrays["minimum"], np.float32),
            maximum=np.asarray(arrays["maximum"], np.float32),
            at_threshold=np.asarray(arrays["at_threshold"], np.int64),
            values=int(arrays["values"]),
            quantile=float(quantile),
        )

    @property
    def tie_fraction(self) -> np.ndarray:
        """float64 [K]: the fraction of the unit's activations equal to its threshold."""
        return self.at_threshold / max(self.values, 1)

    def states(self) -> np.ndarray:
        """object [K] of "dead", "saturated", "tied" or "" (see module docstring)."""
        return unit_states(
            self.thresholds,
            self.minimum,
            self.maximum,
            self.at_threshold,
            self.values,
            self.quantile,
        )


def unit_states(
    thresholds: np.ndarray,
    minimum: np.ndarray,
    maximum: np.ndarray,
    at_threshold: np.ndarray,
    values: int,
    quantile: float,
) -> np.ndarray:
    """Each unit's tie state: object [K] of "dead", "saturated", "tied" or ""."""
    thresholds = np.asarray(thresholds, np.float32)
    minimum = np.asarray(minimum, np.float32)
    maximum = np.asarray(maximum, np.float32)
    heavy = np.asarray(at_threshold, np.int64) > quantile * values
    dead = minimum == maximum
    saturated = ~dead & heavy & (thresholds == maximum)
    tied = ~dead & ~saturated & heavy
    out = np.full(thresholds.shape, "", object)
    out[tied] = TIED
    out[saturated] = SATURATED
    out[dead] = DEAD
    return out
