"""Preemption and crashes: SIGTERM checkpoints and exits 143 with a resume hint; after
SIGTERM or kill -9 the same command resumes and ends with an uninterrupted run's outputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--config",
    "configs/pretrain.py:small",
    "--config.data.image_size=16",
    "--config.data.world.image_size=16",
    "--config.data.world.num_pairs=512",
    "--config.data.world.num_test=48",
    "--config.model.image_kwargs.depth=2",
    "--config.model.image_kwargs.width=8",
    "--config.model.embed_dim=32",
    "--config.train.batch_size=32",
    "--config.train.epochs=2",
    "--config.train.ckpt_every=4",
]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def _start(workdir: Path, devices: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tldr_jax.cli", "pretrain", *TINY, "--workdir", str(workdir)],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 300) -> None:
    t0 = time.time()
    ckpts = workdir / "checkpoints"
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def _finish(workdir: Path) -> dict:
    proc = _start(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((workdir / "pretrain.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _finish(tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill9"])
def test_interrupted_pretrain_resumes_to_the_same_result(tmp_path, uninterrupted, sig):
    proc = _start(tmp_path)
    _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert "Rerun the same command to resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "pretrain.json").exists()
    resumed = _finish(tmp_path)
    assert 0 < resumed["resumed_from"] < resumed["steps"]  # from its checkpoint, not step 0
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-5)
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert resumed[k] == pytest.approx(uninterrupted[k], abs=1e-6), k


def test_restore_onto_a_different_device_count(tmp_path, uninterrupted):
    """Saved on 8 devices, resumed on 2: model, optimiser and data-iterator state restore
    (results equal up to the float noise of a different reduction order)."""
    proc = _start(tmp_path, devices=8)
    _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    resumed = _finish(tmp_path)
    assert resumed["num_devices"] == 2
    assert 0 < resumed["resumed_from"] < resumed["steps"]  # the 8-device state, restored
    assert resumed["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-3)
    for k in ("tr_r5", "tr_r10", "ir_r5", "ir_r10"):
        assert resumed[k] == pytest.approx(uninterrupted[k], abs=5.0), k


def test_sigterm_outside_a_checkpointed_loop_stops_at_once_inside_it_waits():
    """A stage with no checkpoints (select, score, ...) stops on SIGTERM with Preempted
    instead of running to its end and exiting 0; inside a polling loop the signal only sets
    the flag the loop reads after its step."""
    from tldr_jax.utils import preemption

    old = signal.getsignal(signal.SIGTERM)
    try:
        preemption.reset()
        preemption.install_handlers()
        with preemption.polling():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here: no exception inside the loop
            assert preemption.requested() and preemption.agreed()
        # A signal after the loop's last look (during its final checkpoint): the loop ends,
        # and the stage stops there instead of going on (pretrain's evaluation ran, exit 0).
        preemption.reset()
        finished = pytest.raises(preemption.Preempted, match="as a checkpointed loop finished")
        with finished, preemption.polling():
            assert not preemption.agreed()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        preemption.reset()
        with pytest.raises(preemption.Preempted, match="no checkpointed loop"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, old)
        preemption.reset()
