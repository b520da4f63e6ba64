"""Decoded images, stored once per file, and an on-disk cache of a decoded set.

`ImageRows` is what `ImageTextSet.images` holds: row i is `store[index[i]]`. Rows that share
an image file (Karpathy train files: one row per caption; `ImageTextSet.pairs()`) share one
decoded copy, and subsets are views, so a set costs its distinct images once.

With `data.cache_dir` set, the store is a memory-mapped `.npy` file written there: a set
larger than host memory decodes once, page by page, and every later stage (compress runs six
that read the training set) maps it instead of decoding again. The cache is keyed on the
input's annotation file(s) (path, size, modification time), the image root, the image size,
`max_rows`, strict mode and the role; it does not look at every image file, so delete the
folder after changing images in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tldr_jax.config_lib import image_root_of, max_rows_of
from tldr_jax.data import images as images_lib
from tldr_jax.data import readers
from tldr_jax.data.records import LazyImage, Record, Skips
from tldr_jax.utils import io as io_lib
from tldr_jax.utils import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 2: rows with the same encoded bytes share one stored image; 3: counts
# the empty captions dropped from kept rows; 4: one file under differently spelled paths is
# stored once
_CHUNK = 2048  # images decoded per batch of thread-pool work (bounds the queued futures)


class ImageRows:
    """Uint8 images (N, H, W, 3) as rows of a store of distinct images.

    Indexing returns NumPy arrays like the (N, H, W, 3) array it stands for; `take` returns a
    view on the same store; `np.asarray(rows)` materialises every row.
    """

    def __init__(self, store: np.ndarray, index: Sequence[int] | np.ndarray):
        self.store = store
        self.index = np.asarray(index, np.int64).reshape(-1)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.store.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.store.dtype

    @property
    def ndim(self) -> int:
        return self.store.ndim

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])] if key else np.asarray(self)
        rows = self.index[key]
        if np.ndim(rows) == 0:
            return np.array(self.store[int(rows)])
        if isinstance(self.store, np.memmap):
            # Read each needed image once, in file order, then put the rows in place.
            unique, inverse = np.unique(rows, return_inverse=True)
            return np.asarray(self.store[unique])[inverse]
        return self.store[rows]

    def take(self, indices: Sequence[int] | np.ndarray) -> ImageRows:
        """The rows at `indices`, without copying any image."""
        return ImageRows(self.store, self.index[np.asarray(indices, np.int64).reshape(-1)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        kind = "memmap" if isinstance(self.store, np.memmap) else "array"
        return f"ImageRows(shape={self.shape}, distinct={len(self.store)}, {kind})"


class NormalizedRows:
    """The CLIP-normalised float32 view of uint8 rows: indexing normalises only the rows it
    returns, so a set's float copy (4x its bytes, once per caption) is never held whole."""

    def __init__(self, rows: np.ndarray | ImageRows):
        self.rows = rows

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape)

    dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return images_lib.normalize(self.rows[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = images_lib.normalize(np.asarray(self.rows))
        return out if dtype is None else out.astype(dtype)


def take_rows(images: np.ndarray | ImageRows, indices: np.ndarray) -> np.ndarray | ImageRows:
    """`images[indices]`, a view when images is an ImageRows."""
    if isinstance(images, ImageRows):
        return images.take(indices)
    return images[indices]


def image_identity(image: Any) -> Any:
    """What makes two rows' images the same image: the absolute path of a file, the SHA-1
    of encoded bytes (a webdataset with one sample per caption repeats each image's bytes);
    None for a decoded array (never shared)."""
    if isinstance(image, str):
        return os.path.abspath(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return hashlib.sha1(image).digest()
    if isinstance(image, LazyImage):
        return image.digest  # the same SHA-1, taken when the input was read
    return None


def decode_records(
    records: list[Record],
    size: int,
    workers: int,
    skips: Skips,
    source: str,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> tuple[list[Record], ImageRows]:
    """Decodes each distinct image of `records` (`image_identity`) once, in parallel, into
    a store.

    allocate(n) returns the (n, size, size, 3) uint8 store (default: in memory). Rows whose
    image cannot be used are skipped and counted under the image error's reason (or raise in
    strict mode); the rest are returned with an ImageRows over the store, in input order.
    """
    unique: dict[Any, int] = {}
    order: list[int] = []
    srcs: list[Any] = []
    for r in records:
        key = image_identity(r.image)
        if key is None:
            key = id(r)
        if key not in unique:
            unique[key] = len(srcs)
            srcs.append(r.image)
        order.append(unique[key])
    n = len(srcs)
    shape = (n, size, size, 3)
    store = allocate(n) if allocate else np.empty(shape, np.uint8)
    if store.shape != shape or store.dtype != np.uint8:
        raise ValueError(f"store is {store.dtype}{store.shape}, want uint8{shape}")
    errors: dict[int, images_lib.ImageError] = {}

    def decode(j: int) -> None:
        try:
            store[j] = images_lib.decode_image(srcs[j], size)
        except images_lib.ImageError as e:
            errors[j] = e

    bar = progress.bar(total=n, desc=f"decode {source}", unit="img", disable=n < 20 * _CHUNK)
    with ThreadPoolExecutor(max(1, workers)) as pool, bar:
        for start in range(0, n, _CHUNK):
            chunk = range(start, min(n, start + _CHUNK))
            list(pool.map(decode, chunk))
            bar.update(len(chunk))
    kept, index = [], []
    for r, j in zip(records, order, strict=True):
        if j in errors:
            skips.skip(errors[j].reason, r.file or source, r.where, str(errors[j]))
            continue
        kept.append(r)
        index.append(j)
    return kept, ImageRows(store, np.asarray(index, np.int64))


# ----------------------------------------------------------------------------- disk cache


def _fingerprint(path: str) -> list[Any]:
    """What identifies the input at `path`: (name, size, mtime) of the file, or of every
    webdataset shard under the folder or named by the pattern (and the names of those it
    names that are missing), or of every sample file of an image folder. A `tfds:` name
    stands for itself."""
    parts = readers.split_inputs(path)
    if len(parts) > 1:
        return [_fingerprint(p) for p in parts]
    if path.startswith("tfds:"):
        return [path]
    file = readers.split_suffix_of(path)[0]  # a Karpathy split file's ":split" suffix off
    if os.path.isdir(file) or readers.is_shard_pattern(file):
        root, shards, missing = readers.shard_listing(file)
        if not shards and not missing and os.path.isdir(file):  # an image folder
            shards = [f for files in readers.folder_samples(file).values() for f in files.values()]
        out: list[Any] = []
        for shard in shards:
            st = shard.stat()
            name = os.path.relpath(shard, root).replace(os.sep, "/")
            out.append([name, st.st_size, st.st_mtime_ns])
        return out + [[name, None, None] for name in missing]
    if os.path.isfile(file):
        st = os.stat(file)
        return [[os.path.abspath(file), st.st_size, st.st_mtime_ns]]
    return [path]  # not there: the reader names it in its error


def cache_key(path: str, data_cfg: Any, role: str, strict: bool) -> str:
    """The cache entry's name for `path` read with `data_cfg` (data.*) as `role`."""
    spec = {
        "version": CACHE_VERSION,
        "path": readers.input_identity(path),
        "inputs": _fingerprint(path),
        "image_root": readers.normal_roots(image_root_of(data_cfg, role)),
        "image_size": int(data_cfg.image_size),
        "max_rows": max_rows_of(data_cfg, role),
        "strict": bool(strict),
        "role": role,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return f"{role}-{digest}"


def _paths(cache_dir: str, key: str) -> tuple[str, str, str]:
    base = os.path.join(cache_dir, key)
    return base + ".images.npy", base + ".index.npy", base + ".json"


def load_cached(cache_dir: str, key: str, skips: Skips) -> tuple[dict[str, Any], ImageRows] | None:
    """The cached set under `key` (its metadata and images, memory-mapped), or None.

    The skip counts, examples and first message are restored into `skips`.
    """
    images_path, index_path, meta_path = _paths(cache_dir, key)
    if not os.path.exists(meta_path):  # written last: its presence means the entry is whole
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        store = np.load(images_path, mmap_mode="r")
        index = np.load(index_path)
    except (OSError, ValueError, EOFError) as e:
        log.warning("decode cache %s unreadable (%s); decoding again", meta_path, e)
        return None
    if meta.get("version") != CACHE_VERSION or len(index) != len(meta["ids"]):
        return None
    skips.counts.update(meta["skipped"])
    for reason, msg in meta["examples"].items():
        skips.examples.setdefault(reason, msg)
    skips.first = skips.first or meta["first"]
    skips.captions_dropped += int(meta.get("captions_dropped", 0))
    log.info("%s: %d rows from the decode cache %s", meta["source"], len(index), meta_path)
    return meta, ImageRows(store, index)


class MemmapStore:
    """`allocate` for `decode_records` that writes a cache entry's images: a memory-mapped
    .npy under a temporary name, which `save_cached` renames into place once the whole set is
    decoded (an interrupted decode leaves no entry)."""

    def __init__(self, cache_dir: str, key: str, size: int):
        self.cache_dir, self.key, self.size = cache_dir, key, size
        # unique per writer: processes on several hosts may share the folder
        images_path = _paths(cache_dir, key)[0]
        tag = _writer_tag()
        self.tmp = f"{images_path}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}-{tag or 'unknown'}"
        if tag:  # where this process's pids can be told apart from other writers'
            remove_dead_writers(images_path, tag)

    def __call__(self, n: int) -> np.ndarray:
        os.makedirs(self.cache_dir, exist_ok=True)
        shape = (n, self.size, self.size, 3)
        array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=shape)
        # The file is sparse: its blocks are reserved now, so that a full disk is an error
        # here and not a SIGBUS (the process killed, no message) when a decoded image is
        # stored into a page the file system has no room for.
        with open(self.tmp, "r+b") as f:
            nbytes = os.fstat(f.fileno()).st_size
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # cannot reserve: sparse
                    return array
                del array
                raise OSError(
                    e.errno,
                    f"{os.strerror(e.errno)}: reserving {nbytes / 2**20:.1f} MiB for the "
                    "decoded images in data.cache_dir (free space there, or set another)",
                    self.tmp,
                ) from None
        return array


def _writer_tag() -> str | None:
    """Where this process's pid means something, as a temp-name part: the host's name, its
    kernel's boot id (hosts may share a name) and the PID namespace (containers on one
    host need not share pids); None where either cannot be read."""
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            boot = re.sub(r"[^0-9a-f]", "", f.read().lower())
    except OSError:
        return None
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{host}.{boot}.{ns}" if ns and boot else None


def remove_dead_writers(images_path: str, tag: str) -> int:
    """Removes the temporaries of the cache entry `images_path` that a writer with this
    `_writer_tag` left and whose process is gone (kill -9 skips the clean-up, and each is as
    large as the entry); returns how many. Other hosts' or namespaces', and live processes',
    are left alone."""
    pattern = re.compile(re.escape(os.path.basename(images_path)) + r"\.tmp(\d+)-[0-9a-f]{8}-(.+)$")
    folder = os.path.dirname(images_path) or "."
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            match = pattern.match(name)
            if not match or match.group(2) != tag or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
                removed += 1
                log.info("removed a killed decode's temporary cache file %s", name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save_cached(
    store: MemmapStore, rows: ImageRows, meta: dict[str, Any], skips: Skips
) -> ImageRows:
    """Finishes the cache entry `store` wrote: flushes and renames the images into place,
    writes the row index, then the metadata (last, atomically: an entry without it is never
    read). Returns the rows over the renamed file."""
    images_path, index_path, meta_path = _paths(store.cache_dir, store.key)
    if isinstance(rows.store, np.memmap):
        rows.store.flush()
    os.replace(store.tmp, images_path)
    io_lib.write_npy(index_path, rows.index)
    meta = dict(
        meta,
        version=CACHE_VERSION,
        skipped=dict(skips.counts),
        examples=dict(skips.examples),
        first=skips.first,
        captions_dropped=skips.captions_dropped,
    )
    # ensure_ascii: sample ids may hold the surrogate escapes of non-UTF-8 file names.
    with io_lib.atomic_path(meta_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=True)
    return ImageRows(np.load(images_path, mmap_mode="r"), rows.index)
