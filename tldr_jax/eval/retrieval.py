"""Image-text retrieval recall@K with BLIP semantics, computed on device in chunks.

image->text: an image's rank is the best rank among its ground-truth captions.
text->image: each caption has exactly one ground-truth image.
R@K = percentage of queries whose rank < K.

Ties are broken as a stable descending sort would (the lower index ranks first), so the
result is deterministic and matches `np.argsort(-s, kind="stable")`.
The full (images x captions) score matrix is never materialised: scores are computed for a
block of queries at a time and reduced to ranks inside one jitted function.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

RECALL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")

log = logging.getLogger(__name__)


def nonfinite_rows(x: np.ndarray | jax.Array) -> int:
    """How many rows of a 2-D array hold a NaN or an infinity."""
    return int(jnp.sum(~jnp.all(jnp.isfinite(jnp.asarray(x)), axis=1)))


def _rank_of(scores: jax.Array, gt: jax.Array) -> jax.Array:
    """Rank of column `gt` in each row of `scores` under a stable descending sort.

    scores: (Q, C); gt: (Q,) int. Returns (Q,) int32. A NaN ground-truth score (a diverged
    model's) ranks last, C: NaN compares false both ways, which would otherwise rank it first
    and report recall 100. Other NaN scores are never ahead.
    """
    gt_score = jnp.take_along_axis(scores, gt[:, None], axis=1)
    cols = jnp.arange(scores.shape[1])[None, :]
    ahead = (scores > gt_score) | ((scores == gt_score) & (cols < gt[:, None]))
    rank = jnp.sum(ahead, axis=1, dtype=jnp.int32)
    return jnp.where(jnp.isnan(gt_score[:, 0]), jnp.int32(scores.shape[1]), rank)


@jax.jit
def _i2t_ranks(scores: jax.Array, gt_caps: jax.Array) -> jax.Array:
    """scores: (Q, T); gt_caps: (Q, G) caption ids padded with -1. Best rank over G."""
    valid = gt_caps >= 0
    safe = jnp.where(valid, gt_caps, 0)
    ranks = jax.vmap(lambda g: _rank_of(scores, g), in_axes=1, out_axes=1)(safe)
    return jnp.min(jnp.where(valid, ranks, jnp.iinfo(jnp.int32).max), axis=1)


@jax.jit
def _t2i_ranks(scores: jax.Array, gt_img: jax.Array) -> jax.Array:
    return _rank_of(scores, gt_img)


@functools.partial(jax.jit, static_argnames=())
def _block_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    return jnp.dot(q, keys.T, precision=jax.lax.Precision.HIGHEST)


def check_txt2img(txt2img: np.ndarray, num_images: int, num_texts: int) -> np.ndarray:
    """`txt2img` as int64 (one image index per caption), or a ValueError naming what is
    wrong. Images without a caption are warned about: image->text recall counts them as
    misses."""
    t2i = np.asarray(txt2img)
    if t2i.ndim != 1 or len(t2i) != num_texts:
        raise ValueError(
            f"txt2img must hold one image index per caption ({num_texts}), got shape {t2i.shape}"
        )
    if t2i.size and not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"txt2img must hold integer image indices, got dtype {t2i.dtype}")
    if t2i.size and (t2i.min() < 0 or t2i.max() >= num_images):
        raise ValueError(
            f"txt2img holds image indices in [{t2i.min()}, {t2i.max()}]; there are "
            f"{num_images} images"
        )
    without = num_images - len(np.unique(t2i))
    if without:
        log.warning(
            "retrieval: %d of %d images have no caption; image->text recall counts them as misses",
            without,
            num_images,
        )
    return t2i.astype(np.int64)


def _ground_truth(
    txt2img: np.ndarray, num_images: int, num_texts: int
) -> tuple[jax.Array, jax.Array]:
    """(each image's caption ids padded with -1, each caption's image), checked."""
    txt2img = check_txt2img(txt2img, num_images, num_texts)
    gt_caps = jnp.asarray(image_to_caption_lists(txt2img, num_images))
    return gt_caps, jnp.asarray(txt2img.astype(np.int32))


def image_to_caption_lists(txt2img: np.ndarray, num_images: int) -> np.ndarray:
    """(num_images, max_captions) caption ids per image, padded with -1."""
    txt2img = np.asarray(txt2img)
    counts = np.bincount(txt2img, minlength=num_images)
    out = np.full((num_images, max(int(counts.max(initial=0)), 1)), -1, np.int32)
    fill = np.zeros(num_images, np.int64)
    for t, i in enumerate(txt2img):
        out[i, fill[i]] = t
        fill[i] += 1
    return out


def _recall(ranks: np.ndarray, ks: tuple[int, ...]) -> list[float]:
    return [float(100.0 * np.mean(ranks < k)) for k in ks]


def ranks_from_scores(
    sim: np.ndarray | jax.Array, txt2img: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from a given (images x captions) score matrix (used on precomputed scores)."""
    sim = jnp.asarray(sim)
    n_img, n_txt = sim.shape
    gt_caps, gt_img = _ground_truth(txt2img, n_img, n_txt)
    i2t = [_i2t_ranks(sim[s : s + chunk], gt_caps[s : s + chunk]) for s in range(0, n_img, chunk)]
    t2i = [
        _t2i_ranks(sim[:, s : s + chunk].T, gt_img[s : s + chunk]) for s in range(0, n_txt, chunk)
    ]
    return np.concatenate([np.asarray(r) for r in i2t]), np.concatenate(
        [np.asarray(r) for r in t2i]
    )


def recall_at_k(
    sim: np.ndarray | jax.Array, txt2img: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K (percent) from a score matrix (images x captions)."""
    i2t, t2i = ranks_from_scores(sim, txt2img)
    return _as_dict(_recall(i2t, ks), _recall(t2i, ks), ks)


def _as_dict(tr: list[float], ir: list[float], ks: tuple[int, ...]) -> dict[str, float]:
    out = {f"tr_r{k}": v for k, v in zip(ks, tr, strict=True)}
    out.update({f"ir_r{k}": v for k, v in zip(ks, ir, strict=True)})
    return out


def retrieval_metrics(
    img_emb: np.ndarray | jax.Array,
    txt_emb: np.ndarray | jax.Array,
    txt2img: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 512,
) -> dict[str, float]:
    """Recall@K from embeddings (scores = dot products), blockwise: memory O(chunk x N).
    Non-finite embeddings (a diverged model) are logged; their queries rank last."""
    img = jnp.asarray(img_emb, jnp.float32)
    txt = jnp.asarray(txt_emb, jnp.float32)
    bad_img, bad_txt = nonfinite_rows(img), nonfinite_rows(txt)
    if bad_img or bad_txt:
        log.warning(
            "retrieval: %d of %d image and %d of %d caption embeddings are not finite (a "
            "diverged model); their queries rank last and they are never ahead",
            bad_img,
            img.shape[0],
            bad_txt,
            txt.shape[0],
        )
        img = jnp.where(jnp.all(jnp.isfinite(img), axis=1, keepdims=True), img, jnp.nan)
        txt = jnp.where(jnp.all(jnp.isfinite(txt), axis=1, keepdims=True), txt, jnp.nan)
    n_img, n_txt = img.shape[0], txt.shape[0]
    gt_caps, gt_img = _ground_truth(txt2img, n_img, n_txt)
    i2t = np.concatenate(
        [
            np.asarray(_i2t_ranks(_block_scores(img[s : s + chunk], txt), gt_caps[s : s + chunk]))
            for s in range(0, n_img, chunk)
        ]
    )
    t2i = np.concatenate(
        [
            np.asarray(_t2i_ranks(_block_scores(txt[s : s + chunk], img), gt_img[s : s + chunk]))
            for s in range(0, n_txt, chunk)
        ]
    )
    return _as_dict(_recall(i2t, ks), _recall(t2i, ks), ks)
