"""numpy references of SuperGlobal's pooling, written from its released code.

github.com/ShihaoShao-GH/SuperGlobal, modules/coarse_retrieval/: gemp.py,
rgem.py, sgem.py (relup.py is torch clamp(min=alpha), np.maximum). float64,
plain loops, nothing of landmark_jax: what models/superglobal_pooling.py is
tested against.
"""

import numpy as np


def gemp(x, p=4.6, eps=1e-8):
    """gemp.py on an NHWC map: x.clamp(eps).pow(p), averaged over the
    positions (adaptive_avg_pool1d of the flattened map), .pow(1/p)."""
    x = np.maximum(np.asarray(x, np.float64), eps)
    return np.mean(x**p, axis=(1, 2)) ** (1.0 / p)


def rgem(x, pr=2.5, size=5):
    """rgem.py on an NHWC map: 0.5 * LPPool2d(pr, size, stride=1)(
    ReflectionPad2d((size - 1) // 2)(x / nom)) + 0.5 * x, nom = (size^2)^(1/pr),
    LPPool2d's value at a window (sum x^pr)^(1/pr). Negative values count as 0
    in the windows (the departure superglobal_pooling documents: torch's
    x.pow(2.5) of one is NaN)."""
    x = np.asarray(x, np.float64)
    nominator = (size**2) ** (1.0 / pr)
    pad = (size - 1) // 2
    padded = np.pad(x / nominator, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            window = np.maximum(padded[:, i : i + size, j : j + size], 0.0)
            out[:, i, j] = np.sum(window**pr, axis=(1, 2)) ** (1.0 / pr)
    return 0.5 * out + 0.5 * x


def sgem(stacked, ps=10.0, infinity=True):
    """sgem.py on a [scales, batch, D] stack, one image at a time (the batch
    of 1 of the code's test loader): F.normalize(p=2, dim=-1) and the max over
    the scales; or ((x - x.min())^ps).mean(0)^(1/ps) + x.min()."""
    stacked = np.asarray(stacked, np.float64)
    rows = []
    for b in range(stacked.shape[1]):
        x = stacked[:, b]
        if infinity:
            x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            rows.append(x.max(0))
        else:
            gamma = x.min()
            rows.append(((x - gamma) ** ps).mean(0) ** (1.0 / ps) + gamma)
    return np.stack(rows)
