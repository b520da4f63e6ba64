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
