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
