"""`tldr-jax compress` end to end on the tiny config: outputs, the BLIP round trip, and a
kill -9 mid-stage followed by a rerun that ends with an identical training file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import tldr as tldr_config
from tldr_jax.compress.common import load_test, load_train, shared_cache
from tldr_jax.data.readers import read_records
from tldr_jax.data.records import Skips
from tldr_jax.train.pretrain import (
    embed_captions,
    embed_images,
    embed_texts,
    make_text_encoder,
    train_and_evaluate,
)

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tldr.py:tiny"]


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tldr_jax.cli",
            "compress",
            *ARGS,
            *extra,
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(workdir: Path, *extra: str) -> dict:
    proc = _start(workdir, *extra)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return json.loads((workdir / "compress.json").read_text())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("compress_clean")
    return w, _finish(w)


def test_compress_outputs(clean_run):
    w, summary = clean_run
    for k in ("input_rows", "kept_rows", "fraction", "skipped", "stage_wall_s", "retrieval"):
        assert k in summary, k
    assert summary["input_rows"] == 192 and summary["kept_rows"] == 48
    assert summary["fraction"] == pytest.approx(0.25)
    # rows_read = input_records + skipped; one caption per row here, so records = pairs
    assert (summary["rows_read"], summary["input_records"], summary["captions_dropped"]) == (
        192,
        192,
        0,
    )
    assert 0 < summary["kept_images"] <= 48 and summary["input_images"] <= 192
    score = json.loads((w / "score.json").read_text())
    assert summary["test_images"] == score["test_images"] > 0
    assert summary["test_captions"] == score["test_captions"] >= summary["test_images"]
    for name in ("full", "tldr", "random"):
        for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
            assert 0.0 <= summary["retrieval"][name][k] <= 100.0
    for name in ("tldr", "random"):  # a dead arm would say so here, as in its own summary
        arm = json.loads((w / "eval" / f"{name}.json").read_text())
        assert summary["retrieval"][name]["loss_at_chance"] is arm["loss_at_chance"]
    # Every stage's summary says how many data rows were read and which were skipped.
    for stage in ("train-captioner", "extract", "select", "score", "caption", "write"):
        stage_summary = json.loads((w / f"{stage}.json").read_text())
        assert stage_summary["rows_read"] == 192 and "skipped" in stage_summary, stage
        assert stage_summary["captions_dropped"] == 0, stage
        assert stage_summary["seed"] == 0, stage
    for png in ("score_histogram.png", "recall.png", "select/cluster_sizes.png"):
        assert (w / png).stat().st_size > 1000, png
    report = (w / "report.md").read_text()
    assert "| tldr |" in report and "Skipped rows: none." in report  # a clean world
    # The written file is BLIP format and reads back through our own reader.
    rows = json.loads((w / "compress" / "train.json").read_text())
    assert all(set(r) == {"image", "caption"} for r in rows)
    records = read_records(str(w / "compress" / "train.json"), summary["image_root"], Skips(True))
    assert len(records) == 48
    assert all(Path(r.image).exists() for r in records)
    manifest = json.loads((w / "compress" / "manifest.json").read_text())["rows"]
    for row, m in zip(rows, manifest, strict=True):
        if m["generated"]:
            assert row["caption"] == f"{m['original']}; {m['generated']}"
    # write wrote exactly the rows score kept, with their scores; score kept the best-scored
    # keep_fraction (0.5) of the rows select kept, and select kept the fraction asked for.
    kept = np.load(w / "score" / "kept.npz")
    selected = np.load(w / "select" / "selected.npz")["ids"].tolist()
    all_scores = np.load(w / "score" / "scores.npz")
    score_of = dict(zip(all_scores["ids"].tolist(), all_scores["scores"].tolist(), strict=True))
    assert [m["id"] for m in manifest] == kept["ids"].tolist()
    np.testing.assert_allclose([m["score"] for m in manifest], kept["scores"], rtol=1e-6)
    assert len(selected) == 96 and set(kept["ids"].tolist()) <= set(selected)
    dropped = [score_of[i] for i in selected if i not in set(kept["ids"].tolist())]
    assert min(kept["scores"]) >= max(dropped)
    assert [score_of[i] for i in kept["ids"].tolist()] == pytest.approx(kept["scores"].tolist())
    # The comparison's arms: the TL;DR subset and a random subset of the same size.
    ret = summary["retrieval"]
    assert (ret["full"]["pairs"], ret["tldr"]["pairs"], ret["random"]["pairs"]) == (192, 48, 48)
    # budget "steps" (tiny's): every arm trains the full set's number of optimizer steps
    assert ret["budget"] == "steps"
    assert ret["tldr"]["steps"] == ret["random"]["steps"] == ret["full"]["steps"] > 0
    for name in ("full", "tldr", "random"):
        arm = ret[name]
        assert arm["mean_r1"] == pytest.approx((arm["tr_r1"] + arm["ir_r1"]) / 2)
    # The report's world composition is what the kept rows' labels say (read by the test only).
    labels = json.loads((w / "world" / "labels.json").read_text())

    def composition(ids):
        return {k: round(sum(labels[i] == k for i in ids) / len(ids), 4) for k in labels.values()}

    assert summary["world_composition"] == {
        "input": composition(list(labels)),
        "kept": composition([m["id"] for m in manifest]),
    }
    subsets = json.loads((w / "eval" / "subsets.json").read_text())
    assert subsets["tldr"] == [m["id"] for m in manifest]
    order = {sid: i for i, sid in enumerate(all_scores["ids"].tolist())}  # the input's rows
    rows = sorted(order[i] for i in subsets["random"])
    assert len(set(rows)) == 48 and rows != list(range(48)) and rows[-1] >= 96  # all over
    assert set(subsets["random"]) != set(subsets["tldr"])


def test_scores_are_the_scorers_image_caption_cosines(clean_run, tmp_path):
    """score.npz holds, per row, the cosine of the scorer's image and caption embeddings (a
    sign or pairing slip would keep the worst-aligned rows): recomputed here from the
    scorer's finished checkpoint, which a rerun restores without training."""
    w, _ = clean_run
    cfg = shared_cache(tldr_config.get_config("tiny"), w)
    train, test = load_train(cfg), load_test(cfg)
    text_encoder = make_text_encoder(cfg)
    shutil.copytree(w / "score", tmp_path / "score")  # (the restore logs into its folder)
    summary, model = train_and_evaluate(cfg, tmp_path / "score", train, test, text_encoder)
    assert summary["steps"] == json.loads((w / "score.json").read_text())["scorer_steps"]
    assert summary["resumed_from"] == summary["steps"]  # restored, not trained again
    caps = [c[0] for c in train.captions]
    txt = embed_texts(model, embed_captions(text_encoder, caps, Path(cfg.cache_dir), 64))
    img = embed_images(model, train)
    saved = np.load(w / "score" / "scores.npz")
    assert saved["ids"].tolist() == list(train.ids)
    np.testing.assert_allclose(saved["scores"], np.sum(img * txt, axis=1), atol=1e-5)


def test_kill9_mid_stage_then_rerun_gives_identical_train_json(tmp_path, clean_run):
    clean_dir, _ = clean_run
    proc = _start(tmp_path)
    ckpts = tmp_path / "caption" / "checkpoints"
    t0 = time.time()
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 600, "caption stage never checkpointed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "caption.json").exists()
    assert (tmp_path / "train-captioner.json").exists()  # finished stages are kept
    first = _finish(tmp_path)
    caption = json.loads((tmp_path / "caption.json").read_text())
    assert caption["resumed_from"] > 0  # the killed run's captioner, not a fresh one
    assert (tmp_path / "compress" / "train.json").read_bytes() == (
        clean_dir / "compress" / "train.json"
    ).read_bytes()
    # A rerun that finds every stage done keeps what making them took.
    again = _finish(tmp_path)
    assert again["stage_wall_s"] == first["stage_wall_s"]
    assert set(first["stage_wall_s"]) >= {"train-captioner", "write", "retrieval_eval"}
    assert again["total_s"] == first["total_s"] == round(sum(first["stage_wall_s"].values()), 3)
