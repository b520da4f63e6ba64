"""Atomic output writers: every file lands via temp file + rename, never half-written."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)  # read it (the only way) and put it back at once
    os.umask(mask)
    return mask


# Outputs get the permissions a plain open() would give (mkstemp's temp files are 0600).
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as e:
            if e.errno is None or e.filename is not None:
                raise
            # A write that failed for want of space or quota names no file: name the output.
            raise OSError(e.errno, e.strerror, str(path)) from e
        if tmp_path.is_file():
            os.chmod(tmp_path, _FILE_MODE)
            # On disk before the rename: after a power cut the name holds the old file or
            # the new one whole, never a renamed but still empty one (ext4/xfs delay writes).
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# `atomic_path`'s temporary names: ".<name>.<8 random chars>.tmp<suffix>" (<name>: the output).
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(\.[^/]*)?$")


def _remove_temps(folder: Path, names: Iterable[str], of: Callable[[str], bool]) -> int:
    """Removes the `atomic_path` temporaries among `names` in `folder` whose output's name
    passes `of`; returns how many."""
    removed = 0
    for name in names:
        match = _TEMP_NAME.match(name)
        if match and of(match["target"]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
                removed += 1
    return removed


def _file_names(folder: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return [e.name for e in os.scandir(folder) if e.is_file()]
    return []


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Removes `atomic_path` temporaries under `folder` (subfolders too) that a killed run
    left behind (kill -9 skips the clean-up); returns how many. Only for folders this
    process alone writes."""
    return sum(
        _remove_temps(Path(dirpath), filenames, lambda _: True)
        for dirpath, _, filenames in os.walk(folder)
    )


def remove_stale_temps_of(path: str | os.PathLike) -> int:
    """Removes the `atomic_path` temporaries of the one output `path` that a killed run left
    behind; returns how many. Only for outputs this process alone writes (a stage's, under
    its stage lock)."""
    path = Path(path)
    return _remove_temps(path.parent, _file_names(path.parent), lambda t: t == path.name)


def remove_stage_temps(
    workdir: str | os.PathLike,
    stage: str,
    folders: tuple[str, ...] | None = None,
    files: tuple[str, ...] = (),
) -> int:
    """A stage's sweep as it starts, under its stage lock: the `atomic_path` temporaries a
    killed run of it left in its `folders` under `workdir` (default: `<stage>`; subfolders
    too), beside its outputs `workdir/<stage>.*` / `workdir/<stage>_*` (its summary,
    signature, tables and plots; not another stage's whose name only starts alike: `eval` /
    `eval-distilled`) and beside its other outputs `files` in `workdir`; returns how many."""
    workdir = Path(workdir)
    removed = sum(
        remove_stale_temps(workdir / f) for f in ((stage,) if folders is None else folders)
    )

    def ours(target: str) -> bool:
        return target in files or target.startswith((f"{stage}.", f"{stage}_"))

    return removed + _remove_temps(workdir, _file_names(workdir), ours)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Writes JSON atomically (numpy/jax scalars and arrays converted), as UTF-8. A string
    that UTF-8 cannot hold (a path with bytes undecodable in the locale: Python keeps them as
    lone surrogates) makes the file all `\\uXXXX` escapes instead, which read back as the
    same string."""
    obj = _to_jsonable(obj)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        try:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
        except UnicodeEncodeError:
            f.seek(0)
            f.truncate()
            json.dump(obj, f, indent=indent, ensure_ascii=True)
        f.write("\n")


class DamagedFileError(ValueError):
    """An output of an earlier stage that is there but cannot be read (cut short, or not
    what it should be): our writes land whole, so something else damaged it."""


def damaged(path: str | os.PathLike, error: BaseException, made_by: str = "") -> DamagedFileError:
    redo = f"rerun `tldr-jax {made_by}` on this workdir" if made_by else "rerun the stage"
    return DamagedFileError(
        f"{path} is damaged ({type(error).__name__}: {error}): delete it and {redo}, which "
        "writes it again"
    )


def read_json(path: str | os.PathLike, made_by: str = "") -> Any:
    """JSON at `path`; `DamagedFileError` naming it where it is not valid JSON (`made_by`:
    the stage that writes it, for the message)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise damaged(path, e, made_by) from None


def npz_arrays(path: str | os.PathLike, *keys: str, made_by: str = "") -> tuple[np.ndarray, ...]:
    """The arrays `keys` of the `.npz` at `path`, read whole; `DamagedFileError` naming the
    file where it is cut short, not an `.npz` or lacks one of them (a missing file stays a
    FileNotFoundError)."""
    return tuple(read_npz(path, made_by, keys).values())


def read_npz(
    path: str | os.PathLike, made_by: str = "", keys: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Every array of the `.npz` at `path` (or those `keys`), as `npz_arrays`."""
    import zipfile

    try:
        with np.load(path) as z:
            return {k: np.asarray(z[k]) for k in (z.files if keys is None else keys)}
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
        raise damaged(path, e, made_by) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        # A path's bytes undecodable in the locale (lone surrogates) are written as they were.
        Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


class _Writes:
    """A file seen by numpy only through `write`: `np.save` then writes the array in chunks
    through it, and a full disk is an `OSError` with its errno (ENOSPC). To a real file it
    writes with `ndarray.tofile`, whose error on a full disk is "N requested and M written"
    with no errno and no file name."""

    def __init__(self, f: Any) -> None:
        self.write = f.write


def write_npy(path: str | os.PathLike, array: Any) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(_Writes(f), np.asarray(array))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Saves a matplotlib figure atomically as PNG and closes it. Characters its font lacks
    (captions in CJK scripts, emoji) are one log line, not two lines of warning for each."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(record=True) as seen, atomic_path(path, suffix=".png") as tmp:
        warnings.filterwarnings("always", _MISSING_GLYPH.pattern, UserWarning)  # `-W error` too
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    missing = set()
    for w in seen:
        glyph = _MISSING_GLYPH.match(str(w.message))
        if glyph and issubclass(w.category, UserWarning):
            missing.add(chr(int(glyph[1])))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if missing:
        logging.getLogger(__name__).warning(
            "%s: %d characters of its text are not in the font and show as boxes: %s",
            path,
            len(missing),
            "".join(sorted(missing))[:40],
        )


_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")
