"""Per-sample clustering features from the extracted code indices (N, T) int."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Feature = Literal["sequence", "histogram"]
FEATURES: tuple[str, ...] = get_args(Feature)


def sequence_features(codes: np.ndarray) -> np.ndarray:
    """The reference feature: the per-image sequence of code indices read as a float vector."""
    return np.asarray(codes, dtype=np.float32)


def histogram_features(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Normalised code histogram (N, codebook_size): order-free, unlike index arithmetic."""
    codes = np.asarray(codes, dtype=np.int64)
    n, t = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"code indices outside [0, {codebook_size})")
    flat = (np.arange(n)[:, None] * codebook_size + codes).ravel()
    counts = np.bincount(flat, minlength=n * codebook_size).reshape(n, codebook_size)
    return (counts / max(t, 1)).astype(np.float32)


def make_features(codes: np.ndarray, feature: Feature, codebook_size: int) -> np.ndarray:
    """Per-row k-means features from (N, L) codebook codes: `sequence` (the codes
    themselves, `sequence_features`) or `histogram` (code counts, `histogram_features`)."""
    if feature == "sequence":
        return sequence_features(codes)
    if feature == "histogram":
        return histogram_features(codes, codebook_size)
    raise ValueError(f"unknown feature {feature!r}; expected 'sequence' or 'histogram'")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def l2_normalize_(x: np.ndarray, block: int = 65536, eps: float = 1e-12) -> np.ndarray:
    """In-place `l2_normalize` of a float32 array (or memory map), block by block."""
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block]
        xb /= np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), eps)
    return x
