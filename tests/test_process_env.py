"""The process environment a job runs in: closed or vanishing standard streams, an encoding
that cannot write a path, a removed current folder, a locale whose file names are not UTF-8,
an overlong workdir (tldr_jax.utils.streams, cli.workdir_path, io.write_json)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
from cli_run import run_cli

from tldr_jax import cli
from tldr_jax.config_check import ConfigError
from tldr_jax.data import readers
from tldr_jax.utils import io, streams

WORLD = ("make-world", "--config", "configs/tldr.py:tiny", "--workdir")


def test_pipe_safe_stream_drops_writes_once_the_reader_is_gone():
    read, write = os.pipe()
    raw = open(write, "w", buffering=1)  # noqa: SIM115
    stream = streams.PipeSafeStream(raw)
    stream.write("seen\n")
    assert os.read(read, 100) == b"seen\n"
    os.close(read)  # the reader goes away
    assert stream.write("lost\n") == 5  # no BrokenPipeError: the line goes to /dev/null
    stream.write("x" * 100_000)
    stream.flush()
    assert os.path.samestat(os.fstat(write), os.stat(os.devnull))
    assert stream.fileno() == write and not stream.isatty()  # the rest is the stream's
    raw.close()


def test_cli_runs_with_stdout_and_stderr_closed(tmp_path):
    r = run_cli(*WORLD, str(tmp_path / "w"), shell='"$@" <&- >&- 2>&-')
    assert r.returncode == 0
    assert json.loads((tmp_path / "w" / "make-world.json").read_text())["train_rows"] > 0


def test_cli_finishes_when_its_reader_goes_away(tmp_path):
    # `tldr-jax ... 2>&1 | head -1`: `true` stands for a reader that has gone before the
    # first line. The stage ran to its end and said so by its exit status, no traceback.
    r = run_cli(*WORLD, str(tmp_path / "w"), shell='"$@" 2>&1 | true; exit "${PIPESTATUS[0]}"')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "w" / "make-world.json").is_file()


def test_cli_writes_a_non_ascii_path_under_an_ascii_encoding(tmp_path):
    work = tmp_path / "données"
    r = run_cli(*WORLD, str(work), env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"tldr-jax make-world: wrote {tmp_path}/donn\\xe9es/make-world.json"


def test_a_relative_path_in_a_removed_current_folder_is_one_line(tmp_path, monkeypatch):
    def gone() -> str:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "getcwd", gone)
    with pytest.raises(ConfigError, match="current folder no longer exists"):
        cli.workdir_path("runs/w")
    assert cli.workdir_path(str(tmp_path)) == str(tmp_path)  # an absolute one is fine


def test_a_workdir_name_not_in_the_file_name_encoding_is_one_line():
    # Under LC_ALL=C with PYTHONUTF8=0, `/tmp/données` arrives as `/tmp/donn\udcc3\udca9es`.
    with pytest.raises(ConfigError, match="not text in this process's file name encoding"):
        cli.workdir_path("/tmp/donn\udcc3\udca9es")


def test_a_workdir_too_long_for_its_outputs_is_one_line(tmp_path):
    cli.check_workdir_length(str(tmp_path))
    with pytest.raises(ConfigError, match="bytes long: outputs up to"):
        cli.check_workdir_length(str(tmp_path) + ("/" + "d" * 200) * 20)


def test_json_with_undecodable_path_bytes_reads_back_the_same(tmp_path):
    value = {"image_root": "/data/donn\udcc3\udca9es", "caption": "café"}
    io.write_json(tmp_path / "s.json", value)
    assert io.read_json(tmp_path / "s.json") == value
    io.write_json(tmp_path / "t.json", {"caption": "café"})  # UTF-8 as before where it can
    assert "café" in (tmp_path / "t.json").read_text(encoding="utf-8")


def test_image_paths_are_judged_by_their_bytes():
    if sys.getfilesystemencoding() != "utf-8":
        pytest.skip("needs a UTF-8 file name encoding")
    assert not readers._bad_utf8_path("/data/données/a.png")
    assert not readers._bad_utf8_path("/data/donn\udcc3\udca9es/a.png")  # UTF-8 bytes
    assert readers._bad_utf8_path("/data/donn\udce9es/a.png")  # Latin-1 bytes


def test_missing_font_characters_are_one_log_line(tmp_path, caplog):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title("日本語のキャプション")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none escapes
        io.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    lines = [r.getMessage() for r in caplog.records if "not in the font" in r.getMessage()]
    assert len(lines) == 1 and "日" in lines[0]


def test_a_workdirs_length_is_counted_in_bytes(tmp_path):
    """PATH_MAX counts bytes: a non-ASCII workdir (2 bytes a letter here) short in characters
    but too long in bytes is refused."""
    work = str(tmp_path) + ("/" + "é" * 100) * 19  # ~1950 characters, ~3850 bytes
    assert len(work) + cli.OUTPUT_DEPTH_BYTES < 4096 < len(os.fsencode(work)) + 256
    with pytest.raises(ConfigError, match="bytes long: outputs up to"):
        cli.check_workdir_length(work)


def test_a_stage_refuses_a_workdir_too_long_before_making_it(tmp_path):
    from configs import tldr as tldr_config

    work = tmp_path / "/".join(["d" * 200] * 19)  # mkdir makes it; a checkpoint would not fit
    with pytest.raises(ConfigError, match="bytes long: outputs up to"):
        cli.run_stage("make-world", tldr_config.get_config("tiny"), str(work))
    assert list(tmp_path.iterdir()) == []


def test_a_relative_config_file_in_a_removed_current_folder_is_one_line(
    tmp_path, monkeypatch, capsys
):
    def gone() -> str:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "getcwd", gone)
    argv = ["tldr-jax", "make-world", "--config", "my/tldr.py:tiny", "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"tldr-jax make-world: error: config file my/tldr.py: {cli.CWD_GONE}"
    )


def test_the_file_systems_refusals_are_one_line_other_errors_tracebacks():
    """Permissions, a file where a folder should be, a full disk or quota, a read-only file
    system, a name too long, a link loop: the CLI's one line; an I/O error is a traceback."""
    import errno

    names = ("EACCES", "EPERM", "ENOTDIR", "EISDIR", "ENOSPC", "EDQUOT", "EFBIG", "EROFS")
    for name in (*names, "ENAMETOOLONG", "ELOOP"):
        assert cli.file_system_error(OSError(getattr(errno, name), "refused", "/w/x")), name
    assert not cli.file_system_error(OSError(errno.EIO, "I/O error"))
    assert not cli.file_system_error(OSError("no errno"))
