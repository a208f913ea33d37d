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

The statistics are counted on device by `jaxdissect.tie_counts`; this module is host-side
and JAX-free (the report uses it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEAD, SATURATED, TIED = "dead", "saturated", "tied"
TIE_STATES = (DEAD, SATURATED, TIED)


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

    def on_maximum(self) -> np.ndarray:
        """bool [K]: units whose threshold is their maximum though no more than the
        quantile's share of activations lie there. An exact threshold is then below the
        maximum (it is the maximum only where more lie there: "saturated"), so this is an
        estimate's doing (a sketch's rank error): the strict mask is empty where exact
        thresholds would mark the values at the maximum."""
        heavy = _heavy(self.at_threshold, self.values, self.quantile)
        return (self.minimum < self.maximum) & (self.thresholds == self.maximum) & ~heavy

    def sketch_warning(self, layer: str) -> str | None:
        """One line on the units of `on_maximum`, for a layer whose thresholds a sketch
        estimated; None where there is none."""
        n = int(self.on_maximum().sum())
        if not n:
            return None
        return (
            f"layer {layer}: {n} units' sketched thresholds sit on their maximum, where no "
            f"more than the quantile's share of activations lie (within the sketch's rank "
            "error; an exact threshold is below it): under tie_rule=strict they mark "
            "nothing and get no label; quantile_mode=exact computes their thresholds exactly"
        )

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


def _heavy(at_threshold: np.ndarray, values: int, quantile: float) -> np.ndarray:
    """bool [K]: more than the quantile's share of the activations equal T."""
    return np.asarray(at_threshold, np.int64) > quantile * values


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
    heavy = _heavy(at_threshold, values, quantile)
    dead = minimum == maximum
    saturated = ~dead & heavy & (thresholds == maximum)
    tied = ~dead & ~saturated & heavy
    out = np.full(thresholds.shape, "", object)
    out[tied] = TIED
    out[saturated] = SATURATED
    out[dead] = DEAD
    return out
