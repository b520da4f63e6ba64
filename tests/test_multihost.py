"""Multi-process runs: 2 processes on localhost (2 fake CPU devices each) through
jax.distributed, launched by launch/local_multiprocess.sh, give the 1-process result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_PRETRAIN = [
    "--config.data.image_size=16",
    "--config.data.world.image_size=16",
    "--config.data.world.num_pairs=256",
    "--config.data.world.num_test=48",
    "--config.model.image_kwargs.depth=2",
    "--config.model.image_kwargs.width=8",
    "--config.model.embed_dim=32",
    "--config.train.batch_size=32",
    "--config.train.epochs=1",
]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TLDR_BIN=str(Path(sys.executable).parent / "tldr-jax"),
    )
    return env


def run_multi(n: int, stage: str, *args: str, logdir: Path) -> None:
    env = _env(2)
    env["TLDR_LOGDIR"] = str(logdir)
    r = subprocess.run(
        ["bash", str(REPO / "launch" / "local_multiprocess.sh"), str(n), stage, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(logdir.glob("*.log")))
    assert r.returncode == 0, logs


def run_single(stage: str, *args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tldr_jax.cli", stage, *args],
        cwd=REPO,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp")
    args = ["--config", "configs/pretrain.py:small", *TINY_PRETRAIN]
    run_multi(2, "pretrain", *args, "--workdir", str(base / "two"), logdir=base / "logs")
    run_single("pretrain", *args, "--workdir", str(base / "one"))
    return base


def test_two_processes_pretrain_equals_one(pretrain_runs):
    one = json.loads((pretrain_runs / "one" / "pretrain.json").read_text())
    two = json.loads((pretrain_runs / "two" / "pretrain.json").read_text())
    assert two["num_processes"] == 2 and two["num_devices"] == 4
    assert one["num_processes"] == 1
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert two[k] == pytest.approx(one[k], abs=0.5), k
    # Only process 0 wrote outputs: one summary, one metrics file.
    assert len(list((pretrain_runs / "two").glob("*.json"))) == 1


SELECT = [
    "--config",
    "configs/tldr.py",
    "--config.select.feature=sequence",
    "--config.select.num_clusters=4",
    "--config.select.iterations=5",
    "--config.select.target=0.25",
]


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_two_processes_select_equals_one(tmp_path, streamed):
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from test_select import write_fake_extract

    extra = (
        ["--config.select.max_in_memory_mb=0.001", "--config.select.stream_chunk_rows=64"]
        if streamed
        else []
    )
    for name in ("one", "two"):
        write_fake_extract(tmp_path / name)
    run_single("select", *SELECT, *extra, "--workdir", str(tmp_path / "one"))
    run_multi(
        2, "select", *SELECT, *extra, "--workdir", str(tmp_path / "two"), logdir=tmp_path / "logs"
    )
    for f in ("selected", "clusters", "random"):
        a = np.load(tmp_path / "one" / "select" / f"{f}.npz")
        b = np.load(tmp_path / "two" / "select" / f"{f}.npz")
        assert set(a.files) == set(b.files)
        for key in a.files:
            if key == "distance":
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{f}.{key}")
    two = json.loads((tmp_path / "two" / "select.json").read_text())
    assert two["num_processes"] == 2


def test_two_processes_one_distillation_iteration_equals_one(tmp_path):
    import shutil

    import numpy as np

    args = ["--config", "configs/distill.py:tiny", "--config.cache_dir", str(tmp_path / "c")]
    run_single("buffer", *args, "--workdir", str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one_iter = ["--config.distill.iterations=1"]
    run_single("distill", *args, *one_iter, "--workdir", str(tmp_path / "one"))
    run_multi(
        2, "distill", *args, *one_iter, "--workdir", str(tmp_path / "two"), logdir=tmp_path / "logs"
    )
    a = np.load(tmp_path / "one" / "distill" / "distilled.npz")
    b = np.load(tmp_path / "two" / "distill" / "distilled.npz")
    for k in ("images", "texts", "lr_img", "lr_txt"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    one = json.loads((tmp_path / "one" / "distill.json").read_text())
    two = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
