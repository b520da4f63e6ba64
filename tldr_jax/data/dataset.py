"""In-memory image-text sets: every image decoded once to uint8, captions kept as text."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np

from tldr_jax.data import images as images_lib
from tldr_jax.data import readers, world
from tldr_jax.data.records import SKIP_REASONS, Record, Skips

log = logging.getLogger(__name__)

ROLES = ("train", "test", "clean")


@dataclasses.dataclass
class ImageTextSet:
    """N images (uint8, decoded once) with their captions, in input order.

    ids: stable sample ids; images: uint8 (N, H, W, 3); captions: per image, one caption
    for a pre-training pair or several (Karpathy eval rows); image_keys: the image field as
    the input wrote it; rows_read: input rows read (good or bad); skipped: count per skip
    reason (every reason present, zeros included); source: where the set came from.
    """

    ids: list[str]
    images: np.ndarray
    captions: list[list[str]]
    image_keys: list[str]
    rows_read: int
    skipped: dict[str, int]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageTextSet:
        """The rows at `indices`, in that order (counts and source are kept)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            ids=[self.ids[i] for i in idx],
            images=self.images[idx],
            captions=[self.captions[i] for i in idx],
            image_keys=[self.image_keys[i] for i in idx],
        )


def _world_key(cfg: Any) -> str:
    return json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=2)
def _cached_world(key: str) -> world.World:
    # train, test and clean are usually loaded by the same run: build the world once.
    return world.make_world(ml_collections.ConfigDict(json.loads(key)))


def _decode_all(
    records: list[Record], size: int, workers: int, skips: Skips, source: str
) -> tuple[list[Record], np.ndarray]:
    """Decodes every record's image in parallel; bad images are skipped (or raise)."""
    # Several rows may share one image file (Karpathy train): decode each file once.
    unique: dict[Any, int] = {}
    order: list[int] = []
    srcs: list[Any] = []
    for r in records:
        key = r.image if isinstance(r.image, str) else id(r)
        if key not in unique:
            unique[key] = len(srcs)
            srcs.append(r.image)
        order.append(unique[key])

    def decode(src: Any) -> np.ndarray | images_lib.ImageError:
        try:
            return images_lib.decode_image(src, size)
        except images_lib.ImageError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = list(pool.map(decode, srcs))
    kept, arrays = [], []
    for r, j in zip(records, order, strict=True):
        result = decoded[j]
        if isinstance(result, images_lib.ImageError):
            skips.skip(result.reason, source, r.sample_id, str(result))
            continue
        kept.append(r)
        arrays.append(result)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return kept, images


def fingerprint(ids: list[str], rows_read: int) -> np.ndarray:
    """(rows_kept, rows_read, 48-bit digest of the kept ids in order) as int64."""
    digest = hashlib.sha256("\n".join(ids).encode("utf-8", "surrogateescape")).digest()
    return np.array([len(ids), rows_read, int.from_bytes(digest[:6], "little")], np.int64)


def disagreement(fingerprints: np.ndarray, source: str) -> str | None:
    """An error message if processes loaded different rows from `source`, else None.

    fingerprints: (num_processes, 3) rows of `fingerprint`. Processes that kept different
    rows (a file changed or became unreadable between their reads) would otherwise feed
    inconsistent global batches or wait forever in a collective.
    """
    if (fingerprints == fingerprints[0]).all():
        return None
    per = ", ".join(
        f"process {i}: {int(f[0])} of {int(f[1])} rows" for i, f in enumerate(fingerprints)
    )
    return (
        f"{source}: processes loaded different rows ({per}); an input file changed or became "
        "unreadable while they read it. Fix or remove it (strict=False skips and counts "
        "unreadable rows consistently once storage is stable) and rerun the same command."
    )


def _check_processes_agree(ids: list[str], rows_read: int, source: str) -> None:
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(fingerprint(ids, rows_read)))
    msg = disagreement(gathered.reshape(jax.process_count(), -1), source)
    if msg:
        raise RuntimeError(msg)


def load_set(path: str, data_cfg: ml_collections.ConfigDict | Any, role: str) -> ImageTextSet:
    """Loads `path` (any format `readers.read_records` knows) decoded at data.image_size.

    path "" is the embedded world's split for `role`: "train" the noisy pairs, "test" the
    clean 5-caption test images, "clean" the clean caption set. Uses data.image_root,
    data.strict, data.max_rows, data.decode_workers and data.world.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    skips = Skips(strict=bool(data_cfg.strict))
    size = int(data_cfg.image_size)
    max_rows = int(data_cfg.max_rows)
    if path:
        records = readers.read_records(path, data_cfg.image_root, skips, max_rows)
        source = path
    else:
        records = getattr(_cached_world(_world_key(data_cfg.world)), role)
        records = records[:max_rows] if max_rows else records
        source = f"world:{role}"
    rows_read = len(records) + skips.total
    records, images = _decode_all(records, size, int(data_cfg.decode_workers), skips, source)
    if skips.total:
        log.warning("%s: skipped %s (e.g. %s)", source, skips.as_dict(), skips.examples)
    _check_processes_agree([r.sample_id for r in records], rows_read, source)
    return ImageTextSet(
        ids=[r.sample_id for r in records],
        images=images,
        captions=[list(r.captions) for r in records],
        image_keys=[r.image_key for r in records],
        rows_read=rows_read,
        skipped={reason: skips.counts.get(reason, 0) for reason in SKIP_REASONS},
        source=source,
    )
