"""Slow numpy reference of Net2Vec concept vectors (`jaxdissect/concept_vectors.py`).

Loops over images, pixels, units and concepts; float64 arithmetic. Upsampling is
`tests.reference.reference_upsample`; nothing else of the package is called.

- Inputs of the probe at pixel p of image x: unit k's upsampled map S_k(x)[p] (`raw`) or
  its mask S_k(x)[p] > T_k (`binary`, strict rule), on the grid taken every `stride` pixels.
- Target: 1 where any label plane holds c, or everywhere when c is an image-level label.
- Loss of concept c on a batch: mean over its pixels of
  alpha_c y softplus(-z) + (1 - alpha_c)(1 - y) softplus(z), z = w_c . m + b_c; the
  gradient: dL/dz = (alpha_c y (sigmoid(z) - 1) + (1 - alpha_c)(1 - y) sigmoid(z)) / pixels.
- Set IoU: sum |A & B| / sum |A | B| over all pixels of all images; 0 when empty.
"""

from __future__ import annotations

import math

import numpy as np

from tests.reference import reference_upsample


def reference_inputs(
    acts: np.ndarray, thresholds: np.ndarray, size: tuple[int, int], stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(raw float64 [N, P, K], binary bool [N, P, K]) per image and strided pixel."""
    n, _, _, k = acts.shape
    ys, xs = range(0, size[0], stride), range(0, size[1], stride)
    raw = np.zeros((n, len(ys) * len(xs), k))
    for i in range(n):
        for u in range(k):
            s = reference_upsample(acts[i, :, :, u], size)
            p = 0
            for y in ys:
                for x in xs:
                    raw[i, p, u] = s[y, x]
                    p += 1
    binary = np.zeros(raw.shape, bool)
    for u in range(k):
        binary[:, :, u] = raw[:, :, u] > thresholds[u]
    return raw, binary


def reference_targets(
    pixel_labels: np.ndarray,
    image_labels: np.ndarray,
    concepts: np.ndarray,
    stride: int = 1,
) -> np.ndarray:
    """bool [N, P, C]: each concept's mask at each strided pixel."""
    n, planes, sh, sw = pixel_labels.shape
    ys, xs = range(0, sh, stride), range(0, sw, stride)
    out = np.zeros((n, len(ys) * len(xs), len(concepts)), bool)
    for i in range(n):
        for j, c in enumerate(concepts):
            whole = c in list(image_labels[i])
            p = 0
            for y in ys:
                for x in xs:
                    out[i, p, j] = whole or any(
                        pixel_labels[i, q, y, x] == c for q in range(planes)
                    )
                    p += 1
    return out


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def reference_loss_and_grad(
    w: np.ndarray, b: np.ndarray, alpha: np.ndarray, inputs: np.ndarray, targets: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """(summed loss, dL/dw [C, K], dL/db [C]) of a batch: inputs [B, P, K], targets [B, P, C]."""
    nb, npix, k = inputs.shape
    count = nb * npix
    loss = 0.0
    gw = np.zeros(w.shape)
    gb = np.zeros(b.shape)
    for c in range(w.shape[0]):
        a = float(alpha[c])
        for i in range(nb):
            for p in range(npix):
                z = float(np.dot(inputs[i, p], w[c]) + b[c])
                y = float(targets[i, p, c])
                loss += (a * y * _softplus(-z) + (1 - a) * (1 - y) * _softplus(z)) / count
                dz = (a * y * (_sigmoid(z) - 1) + (1 - a) * (1 - y) * _sigmoid(z)) / count
                gw[c] += dz * inputs[i, p]
                gb[c] += dz
    return loss, gw, gb


def reference_set_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Set IoU of two boolean arrays over all their elements."""
    inter = int(np.sum(a & b))
    union = int(np.sum(a | b))
    return inter / union if union else 0.0
