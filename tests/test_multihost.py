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


def test_initialize_explicit_arguments_win_and_one_process_stays_local(monkeypatch):
    """dist.initialize: arguments over TLDR_* variables; the runtime only for > 1 process
    (one process with a coordinator, or a one-task SLURM job, runs without it); once."""
    import jax

    from tldr_jax.utils import dist

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    monkeypatch.setattr(dist, "_initialized", False)
    for key in ("TLDR_COORDINATOR", "TLDR_NUM_PROCESSES", "TLDR_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("CLOUD_TPU_TASK_ID", raising=False)
    dist.initialize("localhost:1234", 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    dist.initialize()
    assert calls == [] and not dist._initialized
    monkeypatch.delenv("SLURM_NTASKS")
    env = {"TLDR_COORDINATOR": "env:1", "TLDR_NUM_PROCESSES": "4", "TLDR_PROCESS_ID": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.initialize("host:2", 2, 1)
    dist.initialize()  # initialised already: nothing
    assert calls == [{"coordinator_address": "host:2", "num_processes": 2, "process_id": 1}]
    monkeypatch.setattr(dist, "_initialized", False)
    dist.initialize()
    assert calls[-1] == {"coordinator_address": "env:1", "num_processes": 4, "process_id": 3}


def test_slurm_task_whose_runtime_fails_stops_an_allocation_shell_runs_alone(monkeypatch, caplog):
    """Under `srun` (a job step's variables), a jax.distributed that cannot start stops the
    task: alone, every task would redo the stage in one workdir. In an allocation's own
    shell (SLURM_NTASKS but no step) one process runs, with a warning."""
    import jax

    from tldr_jax.utils import dist

    def fail(**kw):
        raise ValueError("coordinator unreachable")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    monkeypatch.setattr(dist, "_initialized", False)
    for key in ("TLDR_COORDINATOR", "TLDR_NUM_PROCESSES", "TLDR_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for key in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level("WARNING", logger="tldr_jax.utils.dist"):
        dist.initialize()
    assert not dist._initialized and "running single-process" in caplog.text
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-4]")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    with pytest.raises(RuntimeError, match="SLURM task 2 of 4: jax.distributed could not start"):
        dist.initialize()
    assert not dist._initialized


def test_two_processes_pretrain_equals_one(pretrain_runs):
    one = json.loads((pretrain_runs / "one" / "pretrain.json").read_text())
    two = json.loads((pretrain_runs / "two" / "pretrain.json").read_text())
    assert two["num_processes"] == 2 and two["num_devices"] == 4
    assert one["num_processes"] == 1
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert two[k] == pytest.approx(one[k], abs=0.5), k
    # Only process 0 wrote outputs: one summary, one metrics file.
    names = sorted(p.name for p in (pretrain_runs / "two").glob("*.json"))
    assert names == ["pretrain.config.json", "pretrain.json", "pretrain.signature.json"]


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
    for f in ("selected", "clusters"):
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

    from tldr_jax.distill.expert_trajectories import load_expert

    args = ["--config", "configs/distill.py:tiny", "--config.cache_dir", str(tmp_path / "c")]
    run_single("buffer", *args, "--workdir", str(tmp_path / "one"))
    # The experts on 2 processes (each feeding its half of every minibatch) equal 1 process,
    # parameters and the per-row "retrieved in its minibatch" record alike.
    run_multi(2, "buffer", *args, "--workdir", str(tmp_path / "two"), logdir=tmp_path / "blogs")
    info = json.loads((tmp_path / "one" / "buffer.json").read_text())
    sizes = (info["epochs"], (info["num_params"]["img"], info["num_params"]["txt"]))
    for e in range(info["num_experts"]):
        ta, _, done_a = load_expert(tmp_path / "one", e, *sizes, info["train_pairs"])
        tb, _, done_b = load_expert(tmp_path / "two", e, *sizes, info["train_pairs"])
        assert done_a == done_b == info["epochs"]
        np.testing.assert_allclose(ta["img"], tb["img"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ta["txt"], tb["txt"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(ta["correct"], tb["correct"])
    shutil.rmtree(tmp_path / "two")
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
    # the start set is process 0's on every process (broadcast), its rows of the same dtype
    assert a["init_index"].dtype == b["init_index"].dtype
    np.testing.assert_array_equal(a["init_index"], b["init_index"])
    one = json.loads((tmp_path / "one" / "distill.json").read_text())
    two = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1


_LOAD = """
import json, sys
from tldr_jax.utils import dist

address, pid, path, strict = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
dist.initialize(address, 2, pid)
from tldr_jax.config_lib import data_config
from tldr_jax.data.dataset import load_set

try:
    ds = load_set(path, data_config(image_size=8, decode_workers=1, strict=strict), "train")
except Exception as e:
    # One write: a C++ thread's log line (Gloo) must not land inside the message.
    sys.stdout.write(f"\\nERROR {type(e).__name__} {e}\\n")
    sys.stdout.flush()
    sys.exit(3)
out = {"ids": ds.ids, "skipped": ds.skipped, "rows_read": ds.rows_read, "n": len(ds.images)}
sys.stdout.write(f"\\nRESULT {json.dumps(out)}\\n")
sys.stdout.flush()
"""


def test_shard_unreadable_on_one_process_is_skipped_and_counted_everywhere(tmp_path):
    """Process 1 sees shard 00001 truncated: both keep the rows every process read (strict:
    both stop naming the shard), and neither hangs."""
    import shutil
    import socket

    sys.path.insert(0, str(Path(__file__).parent))
    from test_readers import _encode, _image, _write_shard

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    for s, keys in enumerate([("0", "1"), ("2", "3"), ("4",)]):
        samples = {k: {"png": _encode(_image(int(k))), "txt": f"cap {k}".encode()} for k in keys}
        _write_shard(good / f"0000{s}.tar", samples)
    shutil.copytree(good, bad)
    import tarfile

    with tarfile.open(bad / "00001.tar") as tar:
        cut = tar.getmember("2.png").offset_data + 50
    data = (bad / "00001.tar").read_bytes()
    (bad / "00001.tar").write_bytes(data[:cut])  # cut inside the first member: no sample left
    (tmp_path / "load.py").write_text(_LOAD)

    def run(strict: bool, paths: tuple[Path, Path] = (good, bad)) -> list[tuple[int, str]]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{sock.getsockname()[1]}"
        procs = [
            subprocess.Popen(
                [sys.executable, str(tmp_path / "load.py"), address, str(pid), str(path)]
                + ["1" if strict else "0"],
                cwd=REPO,
                env=_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pid, path in enumerate(paths)
        ]
        try:
            # 300 s: two JAX processes starting on a loaded 2-core machine took over 90 s once.
            outs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()  # only after a timeout (a hang): no-op on exited processes
        return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]

    results = []
    for rc, out in run(strict=False):
        assert rc == 0, out[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    want_ids = ["00000/0", "00000/1", "00002/4"]
    for r in results:
        assert r["ids"] == want_ids and r["n"] == 3
        assert r["rows_read"] == 5  # agreed: the most rows any process read
    from tldr_jax.data.records import SKIP_REASONS

    zero = dict.fromkeys(SKIP_REASONS, 0)
    assert results[0]["skipped"] == {**zero, "unreadable_on_other_process": 2}
    assert results[1]["skipped"] == {**zero, "unreadable_shard": 1}

    errors = []
    for rc, out in run(strict=True):
        assert rc == 3, out[-3000:]
        errors.append(next(x for x in out.splitlines() if x.startswith("ERROR ")))
    assert errors[0].startswith(f"ERROR BadRowError {good}, row 00001/2: "), errors[0]
    assert "unreadable_on_other_process (image 00001.tar/2.png" in errors[0], errors[0]
    assert errors[1].startswith(f"ERROR BadRowError {bad / '00001.tar'}, row -: "), errors[1]
    assert "unreadable_shard" in errors[1], errors[1]
    # An input process 1 cannot open at all: it raises, process 0 stops too instead of waiting.
    (rc0, out0), (rc1, out1) = run(strict=False, paths=(good, tmp_path / "gone"))
    assert rc0 == 3 and rc1 == 3, out0[-3000:] + out1[-3000:]
    assert f"ERROR RuntimeError {good}: process 1 failed to load it" in out0, out0[-3000:]
    assert "ERROR FileNotFoundError" in out1, out1[-3000:]


PREEMPT_PRETRAIN = [
    "--config",
    "configs/pretrain.py:small",
    *TINY_PRETRAIN[:2],
    "--config.data.world.num_pairs=512",
    *TINY_PRETRAIN[3:-1],
    "--config.train.epochs=6",  # 96 steps: the stop is agreed a few steps after the signal
    "--config.train.ckpt_every=4",
]


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes_on_another_count(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service tells process 0, both checkpoint
    the same step and exit 143 (a per-process flag hung both). The checkpoint then resumes
    on one process (2 devices instead of 2 x 2), data-iterator state included."""
    import signal
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    work = tmp_path / "two"
    procs = []
    for i in range(2):
        log = open(tmp_path / f"process_{i}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tldr_jax.cli", "pretrain", *PREEMPT_PRETRAIN]
                + ["--workdir", str(work), f"--coordinator_address=127.0.0.1:{port}"]
                + ["--num_processes=2", f"--process_id={i}"],
                cwd=REPO,
                env=_env(2),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    logs = (
        lambda: "\n".join(  # noqa: E731
            (tmp_path / f"process_{i}.log").read_text()[-2000:] for i in range(2)
        )
    )
    ckpts = work / "checkpoints"
    t0 = time.time()
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert all(p.poll() is None for p in procs), logs()
        assert time.time() - t0 < 600, logs()
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert rcs == [143, 143], logs()
    text = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    steps = [int(t.split("checkpointed at step ")[1].split(".")[0]) for t in text]
    assert steps[0] == steps[1], logs()
    assert not (work / "pretrain.json").exists()
    assert not list(ckpts.glob(f"{steps[0]}/data/process_*"))  # no per-process iterator files

    run_single("pretrain", *PREEMPT_PRETRAIN, "--workdir", str(work))
    run_single("pretrain", *PREEMPT_PRETRAIN, "--workdir", str(tmp_path / "one"))
    resumed = json.loads((work / "pretrain.json").read_text())
    one = json.loads((tmp_path / "one" / "pretrain.json").read_text())
    assert resumed["num_processes"] == 1 and resumed["steps"] == one["steps"]
    assert resumed["final_loss"] == pytest.approx(one["final_loss"], rel=1e-3)
    for k in ("tr_r5", "tr_r10", "ir_r5", "ir_r10"):
        assert resumed[k] == pytest.approx(one[k], abs=5.0), k


def test_a_busy_workdir_stops_every_process_with_one_line(tmp_path):
    """Only the main process takes the stage lock; the others went on into the stage and
    crashed 30 s later in its first collective. Now each stops at once with the line."""
    import fcntl

    work = tmp_path / "w"
    work.mkdir()
    with open(work / ".pretrain.lock", "a+") as held:  # a run of this stage, still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("424242")
        held.flush()
        env = _env(2)
        env["TLDR_LOGDIR"] = str(tmp_path / "logs")
        args = ["--config", "configs/pretrain.py:tiny", "--workdir", str(work)]
        r = subprocess.run(
            ["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "pretrain", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 2
    for i in range(2):
        log = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        line = f"error: another `tldr-jax pretrain` (pid 424242) is running on {work}"
        assert f"tldr-jax pretrain: {line}" in log, log[-3000:]
    assert not (work / "pretrain.json").exists()


def test_a_task_needs_a_job_steps_node_list(monkeypatch):
    """A batch script's own shell has its job, task and local ids but no step node list:
    not an srun task (it runs alone, with a warning, if jax.distributed cannot start)."""
    from tldr_jax.utils import dist

    for key, value in (("SLURM_JOB_ID", "77"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    assert not dist.srun_task()
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    assert dist.srun_task()
