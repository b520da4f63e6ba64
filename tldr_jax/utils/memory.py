"""Host memory housekeeping for long jitted loops on CPU hosts."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 (glibc only: musl and macOS have none)
    except (OSError, AttributeError, TypeError):
        return None
    return lib


def release_host_memory(clear_caches: bool = True) -> bool:
    """Returns freed heap to the OS after a big XLA compilation; True where it could.

    XLA's compiler can take several GB of host memory for a large program (a distillation step
    through a 16M-parameter student) and frees it into glibc's arenas, which keep it resident.
    `jax.clear_caches()` also drops the executables of one-off jitted helpers (e.g. a model's
    initialisers); the caller keeps its own compiled step. Call it once after compiling, not in
    a loop: re-used functions then compile again.
    """
    if clear_caches:
        jax.clear_caches()
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
