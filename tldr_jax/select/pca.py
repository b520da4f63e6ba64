"""PCA (optionally whitening) fitted in one blocked pass, float64 accumulation."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PCA:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), rows = principal directions, variance descending
    variance: np.ndarray  # (k,) explained variance per component
    whiten: bool

    def transform(
        self, x: np.ndarray, block: int = 65536, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Projects rows onto the components; whitened rows have unit variance per component.

        `out` (N, k) float32 receives the result; it may be `x` itself when k == D (each block
        is read before it is overwritten), so large inputs are transformed in place.
        """
        proj = (
            (self.components / np.sqrt(self.variance + 1e-12)[:, None])
            if self.whiten
            else (self.components)
        )
        proj = proj.astype(np.float32).T
        mean = self.mean.astype(np.float32)
        if out is None:
            out = np.empty((x.shape[0], proj.shape[1]), np.float32)
        for s in range(0, x.shape[0], block):
            out[s : s + block] = (np.asarray(x[s : s + block], np.float32) - mean) @ proj
        return out


def num_components(requested: int, n: int, d: int) -> int:
    """The reference asks 256 components of 197-d features and fails: clamp to min(k, D, N)."""
    return max(1, min(requested, d, n))


def fit_pca(x: np.ndarray, n_components: int, whiten: bool, block: int = 65536) -> PCA:
    """Eigen-decomposition of the covariance, accumulated over row blocks (N can be large)."""
    n, d = x.shape
    k = num_components(n_components, n, d)
    mean = np.zeros(d, np.float64)
    for s in range(0, n, block):
        mean += np.asarray(x[s : s + block], np.float64).sum(0)
    mean /= n
    cov = np.zeros((d, d), np.float64)
    mean32 = mean.astype(np.float32)
    for s in range(0, n, block):
        xc = np.asarray(x[s : s + block], np.float32) - mean32
        cov += (xc.T @ xc).astype(np.float64)  # float32 GEMM per block, float64 across blocks
    cov /= max(n - 1, 1)
    var, vec = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1][:k]
    components = vec[:, order].T
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return PCA(
        mean=mean, components=components, variance=np.maximum(var[order], 0.0), whiten=whiten
    )
