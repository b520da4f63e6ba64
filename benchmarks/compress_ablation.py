"""Ablate a finished `compress` run: which part (alignment filter, clustering, captions)
moves retrieval. Reuses WORKDIR's stage outputs; each variant pre-trains the dual encoder
from scratch with the full set's step budget and evaluates on the test split.

  python benchmarks/compress_ablation.py --workdir runs/tldr --config configs/tldr.py:small

Variants (same number of pairs as the TL;DR subset unless said):
  tldr_original_captions  TL;DR rows, original captions (filter + clustering, no captions)
  tldr_generated_only     TL;DR rows, generated captions alone
  filter_only             best-scored rows of the whole set (no clustering)
  clustering_only         random rows among those k-means selection kept (no filter)
Writes WORKDIR/ablation.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

VARIANTS = ("tldr_original_captions", "tldr_generated_only", "filter_only", "clustering_only")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/tldr.py:small")
    ap.add_argument("--variants", default="")
    args = ap.parse_args()
    wanted = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    if unknown := [v for v in wanted if v not in VARIANTS]:
        ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    for name in ("score", "compress"):
        if not (Path(args.workdir) / name).is_dir():
            ap.error(f"--workdir {args.workdir}: no {name}/ folder (run `tldr-jax compress` there)")

    from tldr_jax.cli import load_config
    from tldr_jax.compress.common import (
        check_pipeline,
        load_test,
        load_train,
        rows_of,
        shared_cache,
    )
    from tldr_jax.compress.pipeline import STAGES
    from tldr_jax.config_check import ConfigError
    from tldr_jax.eval.retrieval import RECALL_KEYS
    from tldr_jax.train.pretrain import make_text_encoder, train_and_evaluate
    from tldr_jax.utils import io

    w = Path(args.workdir)
    try:  # the config the workdir was made with (another one fails deep in training)
        cfg = shared_cache(load_config(args.config), w)
        check_pipeline(cfg, w, STAGES)
    except ConfigError as e:
        ap.error(f"{e} (pass the --config the workdir was made with)")
    train, test = load_train(cfg), load_test(cfg)
    full = io.read_json(w / "score" / "full_retrieval.json")
    steps = int(full["steps"])
    manifest = io.read_json(w / "compress" / "manifest.json")["rows"]
    tldr_rows = rows_of(train.ids, [m["id"] for m in manifest])
    n = len(tldr_rows)
    scores = np.load(w / "score" / "scores.npz")["scores"]
    selected = rows_of(train.ids, np.load(w / "select" / "selected.npz")["ids"])
    rng = np.random.default_rng(0)

    def with_caps(rows, caps):
        return dataclasses.replace(train.subset(rows), captions=[[c] for c in caps])

    gen = [m["generated"] or m["original"] for m in manifest]
    variants = {
        "tldr_original_captions": train.subset(tldr_rows),
        "tldr_generated_only": with_caps(tldr_rows, gen),
        "filter_only": train.subset(np.sort(np.argsort(-scores, kind="stable")[:n])),
        "clustering_only": train.subset(np.sort(rng.choice(selected, n, replace=False))),
    }
    text_encoder = make_text_encoder(cfg)
    out = {}
    for name in wanted:
        summary, _ = train_and_evaluate(
            cfg,
            w / "ablation" / name,
            variants[name],
            test,
            text_encoder,
            num_steps=steps,
            name=f"ablation-{name}",
        )
        out[name] = {k: summary[k] for k in RECALL_KEYS}
        out[name]["mean_r1"] = 0.5 * (summary["tr_r1"] + summary["ir_r1"])
        out[name]["pairs"] = len(variants[name])
        io.write_json(w / "ablation.json", out)
    print("| variant | pairs | TR@1 | IR@1 | mean R@1 |\n|---|---|---|---|---|")
    for name, r in out.items():
        print(
            f"| {name} | {r['pairs']} | {r['tr_r1']:.1f} | {r['ir_r1']:.1f} | {r['mean_r1']:.1f} |"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
