"""Stage `score`: image-text alignment score for every pair, and a top-fraction filter.

The scorer is a dual encoder trained on the full (noisy) set itself: misaligned captions are
a minority, so the model learns the majority alignment and scores them low. Its retrieval on
the test split is also the "full set" baseline of the compress report. The filter keeps the
best-aligned `score.keep_fraction` of the rows that `select` kept (`score.filter_over=
selected`, an exact size), or (`all`, SPEC A.3's reading of the reference) the rows `select`
kept that are among the best-aligned `keep_fraction` of all rows: the size then depends on
how selection and alignment correlate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from tldr_jax.compress.common import (
    check_stage,
    data_counts,
    load_test,
    load_train,
    require_inputs,
    rows_of,
    shared_cache,
    stage_dir,
)
from tldr_jax.config_check import ConfigError
from tldr_jax.train.pretrain import (
    embed_captions,
    embed_images,
    embed_texts,
    eval_set_counts,
    flat_captions,
    make_text_encoder,
    train_and_evaluate,
)
from tldr_jax.utils import dist, io

log = logging.getLogger(__name__)


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the best `round(fraction * n)` scores (ties: lower index first), sorted."""
    n_keep = int(round(float(fraction) * len(scores)))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n_keep])


def filter_rows(
    scores: np.ndarray, selected: np.ndarray, fraction: float, over: str = "selected"
) -> np.ndarray:
    """The rows of `selected` the alignment filter keeps, sorted: the best `fraction` of them
    (`over="selected"`), or those among the best `fraction` of all rows (`"all"`)."""
    selected = np.asarray(selected, np.int64)
    if over == "all":
        return np.intersect1d(selected, top_fraction(scores, fraction))
    if over != "selected":
        raise ValueError(f"filter_over must be selected | all, got {over!r}")
    return np.sort(selected[top_fraction(scores[selected], fraction)])


def check_keeps_some(fraction: float, over: str, selected: int, rows: int) -> None:
    """A ConfigError where the filter's top `fraction` of the `selected` rows (`over`
    "selected"; of all `rows`: "all") is no row: checked before the scorer trains, whose
    checkpoints would bind the workdir to the setting."""
    n, which = (selected, "rows select kept") if over == "selected" else (rows, "rows read")
    if not round(fraction * n):
        raise ConfigError(
            f"score.keep_fraction={fraction} with score.filter_over={over!r} keeps none of the "
            f"{n} {which}; raise it"
        )


def plot_score_histogram(
    path: Path, all_scores: np.ndarray, selected: np.ndarray, kept: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(float(all_scores.min()), float(all_scores.max()), 50)
    ax.hist(all_scores, bins=bins, alpha=0.5, label=f"all rows ({len(all_scores)})")
    ax.hist(selected, bins=bins, alpha=0.5, label=f"after k-means selection ({len(selected)})")
    ax.hist(kept, bins=bins, alpha=0.7, label=f"after alignment filter ({len(kept)})")
    ax.set_xlabel("image-text alignment score (cosine)")
    ax.set_ylabel("pairs")
    ax.legend()
    io.save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    require_inputs(workdir, "score")
    check_stage(config, workdir, "score")  # this workdir's earlier runs: same settings and data
    out = stage_dir(workdir, "score")
    cfg = shared_cache(config, workdir)
    train, test = load_train(cfg), load_test(cfg)
    (sel_ids,) = io.npz_arrays(Path(workdir) / "select" / "selected.npz", "ids", made_by="select")
    sel_rows = rows_of(train.ids, sel_ids)
    keep_fraction = float(cfg.score.keep_fraction)
    over = str(cfg.score.get("filter_over", "selected"))
    check_keeps_some(keep_fraction, over, len(sel_rows), len(train))
    text_encoder = make_text_encoder(cfg)

    # The scorer: a dual encoder on the full set (resumes from its own checkpoints).
    full_summary, model = train_and_evaluate(
        cfg,
        out,
        train,
        test,
        text_encoder,
        name="score-full",
        diverged_remedy=f"use a new --workdir, or delete {out} (the scorer was trained with it)",
    )

    if full_summary["loss_at_chance"]:
        log.warning(
            "score: the scorer did not learn (its loss is at chance, see above): the "
            "rows score keeps are chosen by scores that mean nothing (score.json's "
            "scorer_loss_at_chance)"
        )
    # Score every row: cosine between its image and its (first) caption.
    caps, offsets = flat_captions(train)
    tb = int(cfg.text.batch_size)
    txt = embed_texts(model, embed_captions(text_encoder, caps, Path(cfg.cache_dir), tb))
    img = embed_images(model, train)
    scores = np.sum(img * txt[offsets], axis=1).astype(np.float32)

    kept_rows = filter_rows(scores, sel_rows, keep_fraction, over)
    if not len(kept_rows):
        raise ConfigError(
            f"score.keep_fraction={keep_fraction} with score.filter_over={over!r} keeps none "
            f"of the {len(sel_rows)} rows select kept; raise it"
        )

    if dist.is_main():
        ids = np.array(train.ids)
        io.write_npz(out / "scores.npz", ids=ids, scores=scores)
        io.write_npz(out / "kept.npz", ids=ids[kept_rows], scores=scores[kept_rows])
        plot_score_histogram(
            Path(workdir) / "score_histogram.png", scores, scores[sel_rows], scores[kept_rows]
        )
        io.write_json(out / "full_retrieval.json", full_summary)
    return {
        "input_rows": len(train),
        "selected_rows": len(sel_rows),
        "kept_rows": len(kept_rows),
        "keep_fraction": keep_fraction,
        "filter_over": over,
        "score_mean_all": float(scores.mean()),
        "score_mean_selected": float(scores[sel_rows].mean()),
        "score_mean_kept": float(scores[kept_rows].mean()),
        "scorer_retrieval": {
            k: full_summary[k] for k in full_summary if k.startswith(("tr_", "ir_"))
        },
        "scorer_steps": full_summary["steps"],
        "scorer_loss_at_chance": full_summary["loss_at_chance"],
        "scorer_resumed_from": full_summary["resumed_from"],
        **data_counts(train),
        **eval_set_counts(test),
    }
