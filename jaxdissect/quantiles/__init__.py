"""Per-unit activation thresholds: exact top-k, exact 16-bit histogram, mergeable sketch.

Network Dissection thresholds unit k at T_k with P(a_k > T_k) = q over all spatial
activations of the unit on the whole probe set. The modes consume activation batches
reshaped to [rows, units] (rows = images x h x w), under `jax.jit`, and their states are
`flax.struct` pytrees that merge across devices or hosts (each mode's `*_merge`; stacked
states by `statistics.merge_devices`' pairwise tree).

Modules:
  definition  T_k's definition (numpy's linear quantile), value conventions, and
              `reference_threshold`, its plain-numpy reference
  exact       exact mode: per-unit top-k, bitwise equal to the reference
  histogram   histogram mode: counts of the 2**16 values of 16-bit activations, bitwise
              equal to the reference; `resolve_mode` (mode `auto`)
  sketch      sketch mode: a ReqSketch-style compactor of the upper tail, fixed memory
  counts      row counts beyond int32 as (hi, lo) int32 pairs
  chunks      batches in row chunks, split against a per-unit cut
  bitonic     bitonic sorting and merging networks (the sketch's levels)

Accuracy of the sketch is measured by tests/test_quantiles.py and
benchmarks/bench_quantiles.py (figures in benchmarks/README.md). ReqSketch's analysis
gives a rank error O(R / sqrt(B * B/16)) at rank R from the top: relative, and
independent of n; B = 1024 roughly divides it by 1.5 against the default B = 672.

Memory per unit in floats: exact mode k + max(2048, ~k/8); sketch mode (L + 1) * B for
the levels and the stage, plus 2L + 6 words, L = sketch_levels(B, q, n):

    values per unit n         3.1M (7x7 layer)   199M (56x56)    3.2G (224x224)
    exact: top-k + stage      15.5K + 2K         993K + 64K      15.9M + 64K
    sketch, max_count = n     6.7K (L=9)         10.8K (L=15)    13.4K (L=19)
    sketch, no max_count      13.4K (L=19, any n up to 2^32)

(n = 63,305 Broden images x h x w). Both fit 512 units easily; exact mode is the one that
does not scale to early layers (4 GB for 64 units at 224x224). Histogram mode holds 2^16
int32 counts a unit (256 KB) whatever n (up to 2^31 - 1 values a unit), for 16-bit
activations only; `auto` uses it up to 256 units (64 MB).
"""

from jaxdissect.quantiles.counts import _count_add, _count_merge, _count_zero, count_value
from jaxdissect.quantiles.definition import DEFAULT_Q, _positions, reference_threshold
from jaxdissect.quantiles.exact import (
    ExactState,
    exact_init,
    exact_merge,
    exact_threshold,
    exact_update,
)
from jaxdissect.quantiles.histogram import (
    HistogramState,
    histogram_init,
    histogram_merge,
    histogram_threshold,
    histogram_update,
    resolve_mode,
)
from jaxdissect.quantiles.sketch import (
    DEFAULT_MAX_COUNT,
    DEFAULT_RHO,
    DEFAULT_SIZE,
    SECTIONS,
    SketchState,
    check_size,
    sketch_certified,
    sketch_init,
    sketch_levels,
    sketch_merge,
    sketch_threshold,
    sketch_update,
)

MODES = ("auto", "sketch", "exact", "histogram")

__all__ = [
    "DEFAULT_MAX_COUNT",
    "DEFAULT_Q",
    "DEFAULT_RHO",
    "DEFAULT_SIZE",
    "MODES",
    "SECTIONS",
    "ExactState",
    "HistogramState",
    "SketchState",
    "_count_add",
    "_count_merge",
    "_count_zero",
    "_positions",
    "check_size",
    "count_value",
    "exact_init",
    "exact_merge",
    "exact_threshold",
    "exact_update",
    "histogram_init",
    "histogram_merge",
    "histogram_threshold",
    "histogram_update",
    "reference_threshold",
    "resolve_mode",
    "sketch_certified",
    "sketch_init",
    "sketch_levels",
    "sketch_merge",
    "sketch_threshold",
    "sketch_update",
]
