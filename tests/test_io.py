"""Atomic output writers."""

from __future__ import annotations

import os
import stat

import numpy as np

from tldr_jax.utils import io


def test_outputs_get_the_umask_permissions_not_mkstemps(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    io.write_json(tmp_path / "a.json", {"x": np.float32(1.5)})
    io.write_npy(tmp_path / "b.npy", np.arange(3))
    for name in ("a.json", "b.npy"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))
    assert io.read_json(tmp_path / "a.json") == {"x": 1.5}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    """kill -9 inside `atomic_path` leaves its temporary (the world's PNGs were such); the
    rerun's writer removes them, and nothing else."""
    import tempfile

    (tmp_path / "images" / "train").mkdir(parents=True)
    fd, stale = tempfile.mkstemp(
        prefix=".train-000046.png.", suffix=".tmp.png", dir=tmp_path / "images" / "train"
    )
    os.close(fd)
    keep = [tmp_path / ".keep", tmp_path / "notes.tmp.png", tmp_path / "images" / "a.png"]
    for p in keep:
        p.write_bytes(b"x")
    assert io.remove_stale_temps(tmp_path) == 1
    assert not os.path.exists(stale) and all(p.exists() for p in keep)


def stale(folder, name, suffix=""):
    """An `atomic_path` temporary of `folder/name`, as a killed run leaves it."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    return path


def test_a_stage_sweeps_what_a_killed_run_of_it_left(tmp_path):
    """kill -9 inside `atomic_path`: the next run of the stage (under its lock) removes the
    temporaries in its folder and beside its outputs, and nothing of other stages."""
    ours = [
        stale(tmp_path / "score", "kept.npz"),
        stale(tmp_path / "score" / "metrics", "score-full.png", ".png"),
        stale(tmp_path, "score.json"),
        stale(tmp_path, "score_histogram.png", ".png"),
    ]
    theirs = [stale(tmp_path / "select", "selected.npz"), stale(tmp_path, "select.json")]
    theirs.append(stale(tmp_path, "scorer-notes.json"))  # another name that starts alike
    (tmp_path / "score" / "kept.npz").write_bytes(b"x")
    assert io.remove_stage_temps(tmp_path, "score") == len(ours)
    assert not any(os.path.exists(p) for p in ours)
    assert all(os.path.exists(p) for p in theirs) and (tmp_path / "score" / "kept.npz").exists()
    # One output's own temporaries (a metrics logger's CSV and plot), not its neighbours'.
    mine = stale(tmp_path / "metrics", "pretrain.png", ".png")
    other = stale(tmp_path / "metrics", "pretrain.png.old")
    assert io.remove_stale_temps_of(tmp_path / "metrics" / "pretrain.png") == 1
    assert not os.path.exists(mine) and os.path.exists(other)
    # compress's comparison folder `eval` is not `eval-distilled`
    kept = stale(tmp_path, "eval-distilled.md")
    assert io.remove_stage_temps(tmp_path, "eval") == 0 and os.path.exists(kept)


def test_a_killed_checkpoint_save_is_swept_when_the_manager_opens(tmp_path):
    """A save killed midway leaves `<step>.orbax-checkpoint-tmp`; a rerun that saves other
    steps (another ckpt_every) would never replace it: the folder's writer removes it. One
    that only reads the folder never does: another stage may be saving into it (`distill`
    beside a `buffer` still training), and that would delete its save in progress."""
    import jax.numpy as jnp

    from tldr_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt", sweep_tmp=True)
    ckpt.save(2, {"w": jnp.ones(3)})
    ckpt.close()
    in_progress = tmp_path / "ckpt" / "13.orbax-checkpoint-tmp" / "state"
    in_progress.mkdir(parents=True)
    reader = Checkpointer(tmp_path / "ckpt")
    assert reader.latest_step() == 2
    reader.restore(2, {"w": jnp.zeros(3)})
    reader.close()
    assert in_progress.exists()
    ckpt = Checkpointer(tmp_path / "ckpt", sweep_tmp=True)
    ckpt.save(4, {"w": jnp.zeros(3)})  # (orbax finishes the sweep before a save)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "4"]


def test_a_second_save_of_the_saved_step_is_a_no_op(tmp_path):
    """SIGTERM right after a periodic save checkpoints the same step again: that save keeps
    the one there (Orbax refuses a step that exists) instead of stopping the stage."""
    import jax.numpy as jnp

    from tldr_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, {"w": jnp.ones(2)}, extra={"loss": 1.0})
    ckpt.save(3, {"w": jnp.zeros(2)}, extra={"loss": 2.0})
    state, extra = ckpt.restore(3, {"w": jnp.zeros(2)})
    ckpt.close()
    np.testing.assert_array_equal(state["w"], np.ones(2))
    assert extra == {"loss": 1.0}


def test_compress_sweeps_only_what_it_writes_not_stages_running_beside_it(tmp_path, monkeypatch):
    """Stages hold locks of their own and may run side by side on one workdir: compress's
    sweep (under its lock) leaves the live temporaries of an `extract`, `write`, `score` or
    `eval-distilled` running beside it, and removes its own: W/eval, compress.json,
    report.md, recall.png."""
    from configs import tldr as tldr_config
    from tldr_jax import cli

    w = tmp_path / "w"
    beside = [
        stale(w / "extract", "codes-00000.npz"),
        stale(w / "compress", "train.json"),  # write's
        stale(w, "score_histogram.png", ".png"),
        stale(w, "eval-distilled.md"),
    ]
    ours = [
        stale(w / "eval" / "tldr", "metrics.json"),
        stale(w, "compress.json"),
        stale(w, "report.md"),
        stale(w, "recall.png", ".png"),
    ]
    monkeypatch.setattr(cli, "resolve_stage", lambda name: lambda config, workdir: {})
    cli.run_stage("compress", tldr_config.get_config("tiny"), str(w))
    assert all(os.path.exists(p) for p in beside)
    assert not any(os.path.exists(p) for p in ours)
    # write's sweep: its folder W/compress, not compress's summary
    live = stale(w, "compress.json")
    cli.run_stage("write", tldr_config.get_config("tiny"), str(w))
    assert not os.path.exists(beside[1]) and os.path.exists(live)


def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    """A crash mid-write (here an unserialisable value half way through the JSON, then a
    failing rename) keeps the previous output as it was, never a truncated mix."""
    import pytest

    target = tmp_path / "summary.json"
    io.write_json(target, {"kept": list(range(1000))})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        io.write_json(target, {"kept": list(range(1000)), "bad": object()})
    assert target.read_bytes() == before
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError, match="disk gone"):
            io.write_npy(tmp_path / "rows.npy", np.arange(5))
        with pytest.raises(OSError, match="disk gone"):
            io.write_json(target, {"other": 1})
    assert target.read_bytes() == before and not (tmp_path / "rows.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporaries


def test_a_damaged_output_is_an_error_naming_it_and_its_stage(tmp_path):
    """An earlier stage's `.npz` / JSON cut short or overwritten (outputs land whole: not by
    us) is a DamagedFileError naming the file and the stage that writes it again, not a
    BadZipFile / JSONDecodeError that names neither; a missing one stays FileNotFoundError."""
    import pytest

    npz, js = tmp_path / "kept.npz", tmp_path / "generated.json"
    io.write_npz(npz, ids=np.array(["a", "b"]), scores=np.array([0.5, 0.25]))
    io.write_json(js, {"a": "x"})
    ids, scores = io.npz_arrays(npz, "ids", "scores", made_by="score")
    assert ids.tolist() == ["a", "b"] and scores.tolist() == [0.5, 0.25]
    assert set(io.read_npz(npz)) == {"ids", "scores"}
    whole = npz.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"", b"garbage"):
        npz.write_bytes(damaged)
        with pytest.raises(io.DamagedFileError, match="kept.npz is damaged") as err:
            io.npz_arrays(npz, "ids", made_by="score")
        assert str(err.value).startswith(str(npz))
        assert "rerun `tldr-jax score` on this workdir" in str(err.value)
    io.write_npz(npz, ids=np.array(["a"]))
    with pytest.raises(io.DamagedFileError, match="KeyError"):
        io.npz_arrays(npz, "ids", "scores", made_by="score")
    js.write_text('{"a": "x')
    with pytest.raises(
        io.DamagedFileError, match=r"generated.json is damaged .*`tldr-jax caption`"
    ):
        io.read_json(js, made_by="caption")
    with pytest.raises(FileNotFoundError):
        io.npz_arrays(tmp_path / "none.npz", "ids")


def test_metric_logger_resumes_at_its_step_and_a_fresh_run_starts_over(tmp_path):
    """A resumed run keeps the rows up to its resume step (rows logged after the checkpoint
    are logged again, once); a run that does not resume starts a new file."""
    from tldr_jax.utils.metrics import MetricLogger

    def rows():
        return (tmp_path / "metrics" / "run.csv").read_text().splitlines()

    logger = MetricLogger(tmp_path, "run")
    for step in (1, 2, 3):
        logger.log(step, loss=float(step))
    logger.close()
    assert rows() == ["step,name,value", "1,loss,1.0", "2,loss,2.0", "3,loss,3.0"]
    assert (tmp_path / "metrics" / "run.png").stat().st_size > 0
    logger = MetricLogger(tmp_path, "run", resume_step=2)
    logger.log(3, loss=30.0)
    logger.close()
    assert rows()[1:] == ["1,loss,1.0", "2,loss,2.0", "3,loss,30.0"]
    logger = MetricLogger(tmp_path, "run")
    logger.log(1, loss=5.0)
    logger.close()
    assert rows()[1:] == ["1,loss,5.0"]


_FULL_DISK = """
import resource, signal, sys
import numpy as np
import jax.numpy as jnp
from tldr_jax.train.checkpoint import Checkpointer
from tldr_jax.utils import io
ckpt = Checkpointer(sys.argv[1] + "/ckpt")
# A file-size limit stands in for a full disk (a write past it fails with EFBIG).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
big = np.random.default_rng(0).normal(size=(200, 200)).astype(np.float32)
for name, write in [
    ("checkpoint", lambda: ckpt.save(1, {"w": jnp.asarray(big)})),
    ("npy", lambda: io.write_npy(sys.argv[1] + "/a.npy", big)),
    ("npz", lambda: io.write_npz(sys.argv[1] + "/b.npz", x=big)),
]:
    try:
        write()
    except OSError as e:
        print(name, "|", type(e).__name__, "|", e.errno, "|", e)
"""


def test_a_write_past_the_disk_s_room_is_an_oserror_naming_the_output(tmp_path):
    """A full disk (here a file-size limit, EFBIG) during a checkpoint save or an .npy/.npz
    write is an OSError with its errno and the output's name, which the CLI tells in one
    line: not Orbax's ValueError, nor numpy's "N requested and M written" with neither."""
    import errno
    import subprocess
    import sys

    from tldr_jax import cli

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    ).stdout  # fmt: skip
    lines = {line.split(" | ")[0]: line.split(" | ")[1:] for line in out.splitlines()}
    assert set(lines) == {"checkpoint", "npy", "npz"}, out
    assert lines["checkpoint"][:2] == ["OSError", str(errno.EFBIG)]
    assert lines["checkpoint"][2].endswith(f"saving checkpoint step 1: '{tmp_path / 'ckpt'}'")
    assert lines["npy"] == ["OSError", str(errno.EFBIG), f"[Errno 27] File too large: "
                            f"'{tmp_path / 'a.npy'}'"]  # fmt: skip
    assert lines["npz"][:2] == ["OSError", str(errno.EFBIG)]
    assert lines["npz"][2].endswith(f"'{tmp_path / 'b.npz'}'")
    assert cli.file_system_error(OSError(errno.EFBIG, "File too large"))
    # nothing half-written under an output's name, no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if not p.name.endswith("-tmp")]


def test_a_damaged_checkpoint_is_an_error_naming_it(tmp_path):
    """A checkpoint's files cut short since the save (Orbax renames a step into place only
    once whole): a DamagedFileError naming the step's folder and what to delete, not
    TensorStore's OUT_OF_RANGE traceback. A target of another structure stays Orbax's."""
    import jax.numpy as jnp
    import pytest

    from tldr_jax.train.checkpoint import Checkpointer

    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, {"w": jnp.asarray(w)}, extra={"loss": 1.0})
    state, _ = ckpt.restore(2, {"w": jnp.zeros((64, 64))})
    np.testing.assert_array_equal(state["w"], w)
    data = [p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file()]
    biggest = max(data, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(io.DamagedFileError) as err:
        ckpt.restore(2, {"w": jnp.zeros((64, 64))})
    where = tmp_path / "ckpt" / "2"
    assert str(err.value).startswith(f"checkpoint {where} is damaged (")
    assert f"delete {where} to resume from the one before it" in str(err.value)
    ckpt.close()


def test_an_output_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The temporary file is fsynced before the rename, so a power cut leaves the old output
    or the new one whole under the name, never a renamed file whose data never landed."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_npy(tmp_path / "b.npy", np.arange(3))
    assert events == ["fsync", "rename", "fsync", "rename"]
    assert io.read_json(tmp_path / "a.json") == {"x": 1}


def test_a_json_output_that_is_not_utf8_is_damaged_not_a_decode_traceback(tmp_path):
    """Bytes that are not UTF-8 in an earlier stage's JSON (overwritten by something else)
    are a DamagedFileError naming the file and its stage, as a cut-short one is."""
    import pytest

    js = tmp_path / "generated.json"
    js.write_bytes(b'{"a": "caf\xe9"}')  # Latin-1
    with pytest.raises(io.DamagedFileError, match=r"generated.json is damaged \(UnicodeDecode"):
        io.read_json(js, made_by="caption")


def test_write_text_keeps_a_paths_undecodable_bytes(tmp_path):
    """A path whose bytes the locale cannot decode (lone surrogates in Python) is written as
    those bytes, not a UnicodeEncodeError."""
    io.write_text(tmp_path / "r.md", "/data/donn\udce9es\n")
    assert (tmp_path / "r.md").read_bytes() == b"/data/donn\xe9es\n"


def test_a_checkpoints_damaged_json_extras_are_an_error_naming_it(tmp_path):
    """The JSON extras (data-loader state, counters) of a step cut short since the save are
    the DamagedFileError naming the step, as its arrays are: not json's traceback."""
    import jax.numpy as jnp
    import pytest

    from tldr_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, {"w": jnp.ones((4, 4))}, extra={"loss": 1.0})
    (tmp_path / "ckpt" / "3" / "extra" / "metadata").write_text('{"loss": 1.')
    with pytest.raises(io.DamagedFileError, match=f"checkpoint {tmp_path / 'ckpt' / '3'} is dam"):
        ckpt.restore(3, {"w": jnp.zeros((4, 4))})
    ckpt.close()


def test_a_checkpoints_cut_short_manifest_is_an_error_naming_it(tmp_path):
    """The OCDBT manifest of the arrays cut short (TensorStore: `DATA_LOSS: Error opening
    "cast" driver: ... Error decoding manifest`) is the DamagedFileError naming the step too,
    not TensorStore's ValueError traceback."""
    import jax.numpy as jnp
    import pytest

    from tldr_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, {"w": jnp.ones((4, 4))})
    manifest = tmp_path / "ckpt" / "3" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    with pytest.raises(io.DamagedFileError, match=r"is damaged \(DATA_LOSS: Error opening"):
        ckpt.restore(3, {"w": jnp.zeros((4, 4))})
    # a data file overwritten in place, its size kept (no status code: "... Error decoding
    # b-tree node: ZSTD_decompressStream() failed: Data corruption detected")
    ckpt.save(5, {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)})
    data = sorted((tmp_path / "ckpt" / "5" / "state").rglob("d/*"))[0]
    raw = bytearray(data.read_bytes())
    quarter = len(raw) // 4
    raw[quarter : quarter + 2 * quarter] = np.random.default_rng(1).bytes(2 * quarter)
    data.write_bytes(bytes(raw))
    with pytest.raises(io.DamagedFileError, match="5.*is damaged"):
        ckpt.restore(5, {"w": jnp.zeros((64, 64))})
    ckpt.save(4, {"w": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="not compatible with the stored shape") as err:
        ckpt.restore(4, {"w": jnp.zeros((2, 4))})  # another structure: Orbax's own error
    assert not isinstance(err.value, io.DamagedFileError)
    ckpt.close()


def test_checkpoint_errors_are_read_through_the_errors_that_wrap_them(tmp_path, monkeypatch):
    """TensorStore's status under Orbax's own errors (raised from it, or while handling it):
    a damaged restore is told as one (DATA_LOSS too), and a failed save's OS error is an
    OSError with its errno naming the folder."""
    import errno

    import pytest

    from tldr_jax.train import checkpoint

    def during(inner: Exception) -> Exception:  # raised while handling `inner`: __context__
        try:
            try:
                raise inner
            except ValueError:
                raise RuntimeError("async restore failed")  # noqa: B904
        except RuntimeError as outer:
            return outer

    loss = ValueError('DATA_LOSS: Error reading "w/0.0" in OCDBT database')
    assert checkpoint._damage(loss) == str(loss)
    assert checkpoint._damage(during(loss)) == str(loss)
    assert checkpoint._damage(during(ValueError("shapes do not match"))) is None

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")

    def full(*a, **k):
        try:
            raise ValueError("INTERNAL: Error writing local file [os_error_code='28']")
        except ValueError as e:
            raise RuntimeError("save failed") from e

    monkeypatch.setattr(ckpt._mngr, "save", full)
    with pytest.raises(OSError, match="saving checkpoint step 5") as err:
        ckpt.save(5, {"w": np.ones(2)})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "ckpt")
    ckpt.close()
