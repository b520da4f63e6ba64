"""`tldr-jax compress`: the six TL;DR stages in order, then the retrieval comparison.

A stage whose summary W/<stage>.json and output folder exist is finished and skipped; an
interrupted stage resumes from its own checkpoint. Before any of that, every stage output
already in the workdir is checked against this run's settings and training data
(`common.check_pipeline`, each stage's W/<folder>/signature.json): a difference stops the
run with one line naming each changed key. The comparison pre-trains the dual encoder from
scratch on (a) the full set, (b) the TL;DR subset (its new captions), (c) a seeded random
subset of the same size, and evaluates all three on the clean test split. Budget `steps`
gives every run the full set's number of optimizer steps (equal compute); `epochs` gives
every run the same number of epochs (the subsets then train ~1/fraction times shorter).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from tldr_jax.compress.caption_stage import clean_pairs_bound
from tldr_jax.compress.common import (
    check_pipeline,
    check_stage,
    load_test,
    load_train,
    rows_of,
    shared_cache,
    stage_dir,
    train_fingerprint,
)
from tldr_jax.config_check import ConfigError, check_batch_fits, lookup
from tldr_jax.data.records import clean_caption
from tldr_jax.eval.retrieval import RECALL_KEYS
from tldr_jax.train.losses import loss_at_chance
from tldr_jax.train.pretrain import make_text_encoder, train_and_evaluate
from tldr_jax.utils import dist, io

log = logging.getLogger(__name__)

STAGES = ("train-captioner", "extract", "select", "score", "caption", "write")
# The batch each training stage draws from a set (checked against it before the first stage).
BATCH_KEYS = {
    "train-captioner": "captioner.train.batch_size",
    "score": "train.batch_size",
    "caption": "caption.train.batch_size",
}


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    from tldr_jax.cli import run_stage

    walls: dict[str, float] = {}
    checked = STAGES + (("eval",) if config.retrieval_eval.enabled else ())
    done = check_pipeline(config, workdir, checked)
    # Batches larger than the set, found now rather than at the stage that trains with them
    # (every one too large, in one line).
    pairs = int(train_fingerprint(config)["pairs"])
    sets = {s: (pairs, "training pairs") for s in ("train-captioner", "score") if s not in done}
    if "caption" not in done and (clean := clean_pairs_bound(config)) is not None:
        where = f"caption.data={config.caption.data}" if config.caption.data else "world"
        sets["caption"] = (clean, f"clean images ({where})")
    found = []
    for stage, (size, what) in sets.items():
        key = BATCH_KEYS[stage]
        try:
            check_batch_fits(size, int(lookup(config, key)[1]), key, what)
        except ConfigError as e:
            found.append(str(e))
    if found:
        raise ConfigError("; ".join(found))
    for stage in STAGES:
        if stage in done:
            log.info("compress: %s already finished, skipping", stage)
            summary = io.read_json(Path(workdir) / f"{stage}.json")
            walls[stage] = float(summary.get("wall_s", 0.0))
            continue
        log.info("compress: running %s", stage)  # the stage checks and records its signature
        walls[stage] = float(run_stage(stage, config, workdir)["wall_s"])
    return walls


def _recalls(summary: dict) -> dict[str, float]:
    return {k: float(summary[k]) for k in RECALL_KEYS}


def subset_batch_config(
    cfg: ml_collections.ConfigDict, pairs: int
) -> tuple[ml_collections.ConfigDict, int]:
    """The config the subset runs train with, and their batch size: `train.batch_size`, or,
    for a subset smaller than it, the subset's size rounded down to a multiple of the device
    count (said in the log and in each arm's `batch_size`)."""
    import jax

    batch = int(cfg.train.batch_size)
    if pairs >= batch:
        return cfg, batch
    devices = jax.device_count()
    small = pairs // devices * devices
    if small < 2:  # one pair's contrastive loss is 0 (config_check.PAIRS)
        raise ConfigError(
            f"the kept subset has {pairs} pair{'s' * (pairs != 1)}: its comparison runs need a "
            f"batch of at least 2 pairs (a multiple of the {devices} devices); keep more "
            "(select.target, score.keep_fraction), use a larger input, or set "
            "retrieval_eval.enabled=False"
        )
    log.warning(
        "compress: the kept subset (%d pairs) is smaller than train.batch_size %d; its "
        "comparison runs train with batch %d",
        pairs,
        batch,
        small,
    )
    small_cfg = cfg.copy_and_resolve_references()
    small_cfg.train.batch_size = small
    return small_cfg, small


def written_captions(workdir: str) -> list[list[str]]:
    """compress/train.json's captions as a pre-training run reading that file sees them:
    cleaned (BLIP's pre_caption drops the "; " joint and caps each at 30 words), as every
    reader here cleans its input."""
    written = io.read_json(Path(workdir) / "compress" / "train.json")
    return [[clean_caption(e["caption"])] for e in written]


def retrieval_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    cfg = shared_cache(config, workdir)
    check_stage(cfg, workdir, "eval")
    out = stage_dir(workdir, "eval")
    train, test = load_train(cfg), load_test(cfg)
    full = io.read_json(Path(workdir) / "score" / "full_retrieval.json")
    manifest = io.read_json(Path(workdir) / "compress" / "manifest.json")["rows"]
    tldr_rows = rows_of(train.ids, [m["id"] for m in manifest])
    new_caps = written_captions(workdir)
    tldr = dataclasses.replace(train.subset(tldr_rows), captions=new_caps)
    rng = np.random.default_rng(int(cfg.seed) + 12345)
    random_rows = np.sort(rng.choice(len(train), size=len(tldr_rows), replace=False))
    random_set = train.subset(random_rows)
    if dist.is_main():  # which pairs each subset arm trains on (the random one is seeded)
        ids = {"tldr": list(tldr.ids), "random": list(random_set.ids)}
        io.write_json(out / "subsets.json", ids, indent=None)

    budget = str(cfg.retrieval_eval.budget)
    num_steps = int(full["steps"]) if budget == "steps" else None
    text_encoder = make_text_encoder(cfg)
    batch = int(cfg.train.batch_size)
    results = {
        "full": {
            **_recalls(full),
            "pairs": len(train),
            "steps": int(full["steps"]),
            "batch_size": batch,
        }
    }
    arm_cfg, arm_batch = subset_batch_config(cfg, len(tldr))
    for name, subset in (("tldr", tldr), ("random", random_set)):
        cached = out / f"{name}.json"
        if cached.exists():
            summary = io.read_json(cached)
        else:
            summary, _ = train_and_evaluate(
                arm_cfg,
                out / name,
                subset,
                test,
                text_encoder,
                num_steps=num_steps,
                name=f"eval-{name}",
                # train.* is also the scorer's: a lower lr would redo score and what follows.
                diverged_remedy=(
                    f"use a new --workdir (train.* is also the scorer's, in {workdir}/score), "
                    "or set retrieval_eval.enabled=False to leave the comparison out"
                ),
            )
            if dist.is_main():
                io.write_json(cached, summary)
        results[name] = {
            **_recalls(summary),
            "pairs": len(subset),
            "steps": int(summary["steps"]),
            "batch_size": arm_batch,
            "loss_at_chance": _at_chance(summary),  # (W/eval/<arm>.json)
            # text embedding + training + evaluation, in the run that made it
            "time_s": round(sum(summary.get("time_s", {}).values()), 3),
        }
    for r in results.values():
        r["mean_r1"] = 0.5 * (r["tr_r1"] + r["ir_r1"])
    return {"budget": budget, **results}


def _at_chance(summary: dict[str, Any]) -> bool | None:
    """An arm's `loss_at_chance`; for an arm trained before the key was recorded, worked
    out from its final loss and batch size (None where those are missing too)."""
    if "loss_at_chance" in summary:
        return bool(summary["loss_at_chance"])
    loss, batch = summary.get("final_loss"), summary.get("batch_size")
    if loss is None or not batch:
        return None
    return loss_at_chance(float(loss), int(batch), above=False)


def _world_composition(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
    """For the embedded world only, and only for the report: what the kept rows were."""
    if config.data.train:
        return None
    from tldr_jax.data.world import make_world

    world = make_world(config.data.world)
    label_of = {r.sample_id: lab for r, lab in zip(world.train, world.labels, strict=True)}
    manifest = io.read_json(Path(workdir) / "compress" / "manifest.json")["rows"]

    def frac(labels: list[str]) -> dict[str, float]:
        n = max(len(labels), 1)
        return {k: round(labels.count(k) / n, 4) for k in ("clean", "misaligned", "duplicate")}

    return {
        "input": frac(list(world.labels)),
        "kept": frac([label_of[m["id"]] for m in manifest]),
    }


def _nonzero(counts: dict[str, int]) -> str:
    """`not_an_image 1, missing_image 2` (reasons with a count), or `none`."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def _of_rows(summary: dict[str, Any]) -> str:
    """` from 50 rows (50 images)`: where pairs and input rows differ (several captions per
    row) the report says both."""
    records, images = summary.get("input_records"), summary.get("input_images")
    if records is None or (records == summary["input_rows"] and images in (None, records)):
        return ""
    return f" from {records} rows" + (f" ({images} images)" if images is not None else "")


def plot_recalls(path: Path, retrieval: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("full", "tldr", "random") if n in retrieval]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    x = np.arange(len(RECALL_KEYS))
    for i, n in enumerate(names):
        vals = [retrieval[n][k] for k in RECALL_KEYS]
        ax.bar(x + i * width, vals, width, label=f"{n} ({retrieval[n]['pairs']} pairs)")
    ax.set_xticks(x + width * (len(names) - 1) / 2, RECALL_KEYS)
    ax.set_ylabel("recall (%)")
    ax.legend()
    io.save_figure(fig, path)


def write_report(workdir: str, summary: dict[str, Any]) -> None:
    lines = [
        "# TL;DR compression report",
        "",
        f"Input: {summary['input_rows']} pairs{_of_rows(summary)}; kept: "
        f"{summary['kept_rows']} pairs ({100 * summary['fraction']:.1f}%)"
        + (f", {summary['kept_images']} images" if summary.get("kept_images") else "")
        + f". Skipped rows: {_nonzero(summary['skipped'])}."
        + (
            f" Empty or non-UTF-8 captions dropped: {summary['captions_dropped']}."
            if summary.get("captions_dropped")
            else ""
        ),
        "",
        "Stage wall times (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in summary["stage_wall_s"].items()),
        "",
    ]
    ret = summary.get("retrieval")
    if ret:
        lines += [
            f"## Retrieval on the test split (budget: same {ret['budget']})",
            "",
            "| train set | pairs | steps | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean R@1 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in ("full", "tldr", "random"):
            r = ret[n]
            cells = " | ".join(f"{r[k]:.1f}" for k in (*RECALL_KEYS, "mean_r1"))
            lines.append(f"| {n} | {r['pairs']} | {r['steps']} | {cells} |")
        lines += ["", "![recall](recall.png)", ""]
    comp = summary.get("world_composition")
    if comp:
        lines += [
            "## What was kept (embedded world labels; used for this report only)",
            "",
            f"Input: {comp['input']}  ",
            f"Kept: {comp['kept']}",
            "",
        ]
    lines += [
        "![cluster sizes](select/cluster_sizes.png)",
        "![alignment scores](score_histogram.png)",
        "",
    ]
    io.write_text(Path(workdir) / "report.md", "\n".join(lines))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    walls = run_stages(config, workdir)
    write_summary = io.read_json(Path(workdir) / "write.json")
    train_summary = io.read_json(Path(workdir) / "score.json")
    # input_rows / kept_rows / fraction count (image, caption) pairs, one per caption;
    # rows_read counts the input's rows (= input_records + skipped), as read by `write`.
    counts = write_summary if "input_records" in write_summary else train_summary
    summary: dict[str, Any] = {
        "input_rows": int(write_summary["input_rows"]),
        "kept_rows": int(write_summary["kept_rows"]),
        "fraction": float(write_summary["fraction"]),
        "input_images": write_summary.get("input_images"),
        "kept_images": write_summary.get("kept_images"),
        "rows_read": int(counts.get("rows_read", write_summary["input_rows"])),
        "input_records": counts.get("input_records"),
        "skipped": counts.get("skipped", {}),
        "captions_dropped": int(counts.get("captions_dropped", 0)),
        "test_images": train_summary.get("test_images"),
        "test_captions": train_summary.get("test_captions"),
        "test_rows_read": train_summary.get("test_rows_read"),
        "skipped_test": train_summary.get("skipped_test", {}),
        "train_json": write_summary["train_json"],
        "image_root": write_summary["image_root"],
        "stage_wall_s": walls,
    }
    if counts.get("inputs"):  # several inputs joined by commas: what each gave
        summary["inputs"] = counts["inputs"]
    if config.retrieval_eval.enabled:
        summary["retrieval"] = ret = retrieval_comparison(config, workdir)
        # What the two subset runs took when they ran (a rerun reads them back made).
        wall = sum(ret[name]["time_s"] for name in ("tldr", "random"))
        summary["stage_wall_s"]["retrieval_eval"] = round(wall, 3)
        if dist.is_main():
            plot_recalls(Path(workdir) / "recall.png", summary["retrieval"])
    else:  # the key is always there (scripts read it): null when the comparison is off
        summary["retrieval"] = None
    comp = _world_composition(config, workdir)
    if comp:
        summary["world_composition"] = comp
    # What making the outputs took (each stage in the run that made it); `wall_s`: this run.
    summary["total_s"] = round(sum(summary["stage_wall_s"].values()), 3)
    if dist.is_main():
        write_report(workdir, summary)
    return summary
