"""Stages buffer -> distill -> eval-distilled on a tiny embedded world: outputs and resumption."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from configs import distill as distill_config
from tldr_jax.cli import run_stage
from tldr_jax.data.images import normalize
from tldr_jax.distill import expert_trajectories as et

EXPERTS, EPOCHS = 2, 2


def tiny_config(cache_dir: Path):
    c = distill_config.get_config("small")
    c.data.image_size = 16
    c.data.world.update(image_size=16, num_pairs=200, num_test=40, num_clean=10)
    c.model.image_kwargs.update(depth=2, width=8)
    c.buffer.update(num_experts=EXPERTS, epochs=EPOCHS, batch_size=64)
    c.distill.update(num_pairs=8, syn_steps=2, iterations=3, ckpt_every=2, log_every=1)
    c.eval.update(num_models=1, epochs=2, budgets=())
    c.cache_dir = str(cache_dir)
    return c


@pytest.fixture(scope="module")
def buffered(tmp_path_factory):
    root = tmp_path_factory.mktemp("vld")
    config = tiny_config(root / "cache")
    summary = run_stage("buffer", config, str(root / "w"))
    return config, root, summary


def _trajectories(config, workdir: Path, num_params, n):
    return [
        et.load_expert(workdir, e, EPOCHS, num_params, n) for e in range(config.buffer.num_experts)
    ]


def test_buffer_snapshots_every_epoch_and_resumes(buffered):
    config, root, summary = buffered
    workdir = root / "w"
    assert summary["trained_epochs_this_run"] == EXPERTS * EPOCHS
    assert (workdir / "buffer.json").exists()
    n = summary["train_pairs"]
    num_params = (summary["num_params"]["img"], summary["num_params"]["txt"])
    trajs = _trajectories(config, workdir, num_params, n)
    for e, (traj, extra, done) in enumerate(trajs):
        assert done == EPOCHS
        assert traj["img"].shape == (EPOCHS + 1, num_params[0])
        assert traj["txt"].shape == (EPOCHS + 1, num_params[1])
        # Epoch 0 is the expert's initialisation; every epoch moves both modalities.
        init = et.init_params(config, 384, int(config.seed) * 1000 + e)
        np.testing.assert_array_equal(traj["img"][0], np.asarray(init[0]))
        np.testing.assert_array_equal(traj["txt"][0], np.asarray(init[1]))
        assert np.all(np.linalg.norm(np.diff(traj["img"], axis=0), axis=1) > 0)
        assert np.all(np.linalg.norm(np.diff(traj["txt"], axis=0), axis=1) > 0)
        assert not traj["correct"][0].any() and traj["correct"][1:].any()
        assert len(extra["recall"]) == EPOCHS + 1
    assert not np.array_equal(trajs[0][0]["img"][0], trajs[1][0]["img"][0])

    # Lose the last expert (as if preempted before it finished): the rerun trains only it
    # and writes the same vectors.
    again = root / "again"
    shutil.copytree(workdir, again)
    shutil.rmtree(et.expert_dir(again, EXPERTS - 1))
    rerun = run_stage("buffer", config, str(again))
    assert rerun["trained_epochs_this_run"] == EPOCHS
    for (a, _, _), (b, _, _) in zip(
        trajs, _trajectories(config, again, num_params, n), strict=True
    ):
        for key in ("img", "txt", "correct"):
            np.testing.assert_array_equal(a[key], b[key])


def test_distill_outputs_resume_and_eval(buffered):
    config, root, _ = buffered
    workdir = root / "d"
    shutil.copytree(root / "w", workdir)
    first = run_stage("distill", config, str(workdir))
    assert first["resumed_from"] == 0 and first["skipped"] == 0
    out = workdir / "distill"
    assert (out / "distilled.png").stat().st_size > 0
    with np.load(out / "distilled.npz") as f:
        images, texts = f["images"], f["texts"]
        assert images.shape == (8, 16, 16, 3) and texts.shape == (8, 384)
        assert np.isfinite(f["lr_img"]) and np.isfinite(f["lr_txt"])
        assert f["nearest_caption_index"].shape == (8,)
    csv = (workdir / "metrics" / "distill.csv").read_text()
    assert "meta_loss" in csv and "skipped" in csv

    # Resume: three more iterations continue from the checkpoint at iteration 3.
    config5 = config.copy_and_resolve_references()
    config5.distill.iterations = 5
    second = run_stage("distill", config5, str(workdir))
    assert second["resumed_from"] == 3 and second["iterations"] == 5
    with np.load(out / "distilled.npz") as f:
        assert not np.array_equal(f["images"], images)

    # eval-distilled: the five methods, each with mean/std of the six recall keys.
    result = run_stage("eval-distilled", config, str(workdir))
    for method in ("distilled", "random", "herding", "kcenter", "forgetting"):
        for key in et.RECALL_KEYS:
            stats = result[method][key]
            assert set(stats) >= {"mean", "std"} and 0.0 <= stats["mean"] <= 100.0
        assert result[method]["num_pairs"] == 8
    assert "| distilled |" in (workdir / "eval-distilled.md").read_text()
    assert (workdir / "eval-distilled.json").exists()


def test_distill_nan_guard_counts_skipped_updates(buffered):
    config, root, _ = buffered
    workdir = root / "nan"
    shutil.copytree(root / "w", workdir)
    config = config.copy_and_resolve_references()
    # A step size of 1e30 makes the student diverge: every meta loss is non-finite.
    config.distill.update(step_size_init=1e30, iterations=2, grad_mode="tesla")
    summary = run_stage("distill", config, str(workdir))
    assert summary["skipped"] == 2
    assert summary["lr_img"] == pytest.approx(1e30, rel=1e-6)
    with np.load(workdir / "distill" / "distilled.npz") as f:
        from tldr_jax.data.dataset import load_set

        train = load_set("", config.data, "train")
        # Untouched: still the initial real pairs.
        np.testing.assert_allclose(f["images"], normalize(train.images[f["init_index"]]))


def test_kill9_mid_distill_then_rerun_matches_uninterrupted(tmp_path):
    """A `tldr-jax distill` subprocess killed with SIGKILL after a checkpoint resumes on rerun
    and ends with the distilled set of an uninterrupted run (within float tolerance)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = ["--config", "configs/distill.py:tiny", "--config.cache_dir", str(tmp_path / "c")]

    def cli(stage, workdir, wait=True):
        p = subprocess.Popen(
            [sys.executable, "-m", "tldr_jax.cli", stage, *args, "--workdir", str(workdir)],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if wait:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        return p

    cli("buffer", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cli("distill", tmp_path / "a")
    proc = cli("distill", tmp_path / "b", wait=False)
    ckpts = tmp_path / "b" / "distill" / "checkpoints"
    t0 = time.time()
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "b" / "distill.json").exists()
    cli("distill", tmp_path / "b")
    a = np.load(tmp_path / "a" / "distill" / "distilled.npz")
    b = np.load(tmp_path / "b" / "distill" / "distilled.npz")
    for k in ("images", "texts", "lr_img", "lr_txt"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
