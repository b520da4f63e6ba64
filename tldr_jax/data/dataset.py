"""In-memory image-text sets: every image decoded once to uint8, captions kept as text."""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from tldr_jax.config_lib import image_root_of, max_rows_of
from tldr_jax.data import imagestore, readers, world
from tldr_jax.data.imagestore import ImageRows
from tldr_jax.data.records import SKIP_REASONS, BadRowError, InputError, Record, Skips

log = logging.getLogger(__name__)

ROLES = ("train", "test", "clean")


def pair_ids(sample_id: str, num_captions: int) -> list[str]:
    """The ids of a row's (image, caption) pairs (`ImageTextSet.pairs`): the row's own id for
    one caption, `<id>/c<k>` for the k-th of several."""
    if num_captions == 1:
        return [sample_id]
    return [f"{sample_id}/c{k}" for k in range(num_captions)]


@dataclasses.dataclass
class ImageTextSet:
    """N images (uint8, decoded once) with their captions, in input order.

    ids: stable sample ids; images: uint8 (N, H, W, 3), an array or an `ImageRows` (rows
    sharing an image file share one decoded copy, possibly memory-mapped from
    data.cache_dir; index it like the array); captions: per image, one caption
    for a pre-training pair or several (Karpathy eval rows); image_keys: the image field as
    the input wrote it; rows_read: input rows read (good or bad); skipped: count per skip
    reason (every reason present, zeros included); source: where the set came from.
    """

    ids: list[str]
    images: np.ndarray | ImageRows
    captions: list[list[str]]
    image_keys: list[str]
    rows_read: int
    skipped: dict[str, int]
    source: str
    # Empty or non-UTF-8 captions dropped from kept rows (the row's other captions are used).
    captions_dropped: int = 0
    # Per input of several joined by commas (`input_counts`); [] for one input.
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def distinct_images(self, rows: Sequence[int] | np.ndarray | None = None) -> int:
        """How many distinct images `rows` (default: all) show. Rows sharing one decoded
        image count once: one file under any spelling of its path (`../a.jpg`,
        `/abs/a.jpg`), or samples with the same encoded bytes; without a shared store, the
        distinct image keys."""
        idx = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64).reshape(-1)
        if isinstance(self.images, ImageRows):
            return len(np.unique(self.images.index[idx]))
        return len({self.image_keys[i] for i in idx})

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageTextSet:
        """The rows at `indices`, in that order (counts and source are kept)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            ids=[self.ids[i] for i in idx],
            images=imagestore.take_rows(self.images, idx),
            captions=[self.captions[i] for i in idx],
            image_keys=[self.image_keys[i] for i in idx],
        )

    def pairs(self) -> tuple[ImageTextSet, np.ndarray]:
        """One row per (image, caption) pair, and each pair's row in this set.

        A row with several captions (Karpathy eval rows, Karpathy's `dataset_*.json`, TFDS
        `coco_captions`) becomes one row per caption, its image repeated, as a
        one-row-per-caption Karpathy train file gives them; the k-th caption's id is
        `<id>/c<k>` (a one-caption row keeps its id). A set whose rows all have one caption
        is returned as it is.
        """
        counts = np.array([len(c) for c in self.captions], np.int64)
        record = np.repeat(np.arange(len(self)), counts)
        if np.all(counts == 1):
            return self, record
        expanded = dataclasses.replace(
            self.subset(record),
            ids=[
                p
                for sid, caps in zip(self.ids, self.captions, strict=True)
                for p in pair_ids(sid, len(caps))
            ],
            captions=[[c] for caps in self.captions for c in caps],
        )
        if len(set(expanded.ids)) != len(expanded.ids):
            seen: set[str] = set()
            dup = next(i for i in expanded.ids if i in seen or seen.add(i))
            raise InputError(
                f"{self.source}: the pair id {dup!r} is given twice: a row with several "
                "captions makes pairs '<id>/c<k>', and another row has that id; rename it"
            )
        return expanded, record


def data_counts(train: ImageTextSet) -> dict[str, Any]:
    """What every stage's summary says about the training set it read: input rows read (good or
    bad, `rows_read` = `input_records` + the `skipped` total), the usable ones
    (`input_records`: a row with several captions is one record and several pairs), rows
    skipped per reason, and empty or non-UTF-8 captions dropped from rows that kept others;
    for a set read from several inputs joined by commas, `inputs`: what each gave."""
    skipped = dict(train.skipped)
    counts = {
        "rows_read": train.rows_read,
        "input_records": train.rows_read - sum(skipped.values()),
        "skipped": skipped,
        "captions_dropped": train.captions_dropped,
    }
    if train.inputs:  # several inputs joined by commas: what each gave
        counts["inputs"] = [dict(c) for c in train.inputs]
    return counts


def input_counts(
    parts: list[str], inputs: list[tuple[str, int]], records: Sequence[Record]
) -> list[dict[str, Any]]:
    """Per input of a set read from several joined by commas (`parts`, in order): {"input",
    "rows_read", "input_records"} (records kept after decoding; 0 rows for an input that
    max_rows stopped the reading before); [] for a single input. `inputs`: (input, rows
    read) of those read, from `readers.read_records`."""
    if len(parts) < 2:
        return []
    kept = collections.Counter(r.part for r in records)
    read = [n for _, n in inputs] + [0] * (len(parts) - len(inputs))
    return [
        {"input": path, "rows_read": n, "input_records": kept.get(i, 0)}
        for i, (path, n) in enumerate(zip(parts, read, strict=True))
    ]


_ROOT_KEYS = {
    "train": "data.image_root",
    "test": "data.test_image_root",
    "clean": "caption.image_root",
}
_SET_NAMES = {"train": "the training set", "test": "the test set", "clean": "the caption set"}


def check_every_input_used(
    per_input: list[dict[str, Any]], roots: list[str], role: str, skips: Skips, whole: int
) -> None:
    """An InputError where one of several inputs gave no usable row while the others did: a
    whole input lost to one image root, a wrong split or a broken export is a mistake to fix,
    not rows to skip in silence. Only the first `whole` inputs are checked (max_rows may
    have cut the set inside the next one, or before it)."""
    others = sum(c["input_records"] for c in per_input)
    empty = [c for c in per_input[:whole] if not c["input_records"]]
    if not empty or not others:
        return
    first = empty[0]
    where = f"{first['input']}: no usable rows for {_SET_NAMES.get(role, role)}"
    if not first["rows_read"]:
        raise InputError(f"{where}: it has no rows, while the inputs joined with it have {others}")
    root = roots[per_input.index(first)]  # `roots`: each input's, in the inputs' order
    joined = f"joined with the image root {root!r}" if root else "read beside the file"
    key = _ROOT_KEYS.get(role, "data.image_root")
    raise InputError(
        f"{where} ({first['rows_read']} read), while the other inputs joined with it have "
        f"{others}; its relative image paths were {joined}. Each input can have its own root: "
        f"{key}=ROOT1,ROOT2,... in the inputs' order (an empty entry: that file's own folder). "
        f"Skipped in all: {skips.as_dict()}, e.g. {skips.examples}"
    )


def _world_key(cfg: Any) -> str:
    return json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=2)
def _cached_world(key: str) -> world.World:
    # train, test and clean are usually loaded by the same run: build the world once.
    return world.make_world(ml_collections.ConfigDict(json.loads(key)))


PAD = -1  # padding of gathered id hashes (a real hash is >= 0)


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """A stable 63-bit hash (blake2b) of each sample id, as int64 >= 0."""
    out = np.empty(len(ids), np.int64)
    for i, sample_id in enumerate(ids):
        digest = hashlib.blake2b(sample_id.encode("utf-8", "surrogateescape"), digest_size=8)
        out[i] = int.from_bytes(digest.digest(), "little") >> 1
    return out


@dataclasses.dataclass(frozen=True)
class RowAgreement:
    """What every process keeps. keep: bool per local row (the rows every process read);
    rows_read: the most rows any process read; missing_on: local row index -> the processes
    that could not read it (one entry per dropped row, in input order)."""

    keep: np.ndarray
    rows_read: int
    missing_on: dict[int, tuple[int, ...]]


def missing_detail(procs: Sequence[int], image_key: str = "") -> str:
    """How a dropped row is described, in the skip count's example and in strict errors."""
    where = f"image {image_key}: " if image_key else ""
    return f"{where}process {', '.join(map(str, procs))} could not read it"


def agree_on_rows(
    ids: Sequence[str],
    hashes: np.ndarray,
    meta: np.ndarray,
    process: int,
    source: str,
    *,
    strict: bool = False,
    first_skip: str = "",
    image_keys: Sequence[str] | None = None,
) -> RowAgreement:
    """The rows every process keeps, decided from data every process holds (so every process
    reaches the same decision and none is left waiting in a collective).

    ids: this process's kept sample ids, in input order. hashes: (P, M) int64, row j the
    `id_hashes` of process j's kept ids padded with PAD; meta: (P, 3) int64, row j process
    j's (kept rows, rows read, rows skipped). first_skip: this process's first skip message.

    Keeps this process's rows that every process read, in input order. In strict mode any
    skipped row or disagreement anywhere raises BadRowError on every process, naming the file
    and row: this process's own first bad row, else its first row another process could not
    read. Processes that kept their common rows in different orders raise RuntimeError.
    """
    counts = meta[:, 0]
    rows = [hashes[j, : int(counts[j])] for j in range(len(meta))]
    local = rows[process]
    if len(local) != len(ids):
        raise ValueError(f"{len(ids)} ids but process {process} sent {len(local)} hashes")
    common = functools.reduce(np.intersect1d, rows)
    lacks = np.stack([~np.isin(local, r) for r in rows])  # (P, n): process j lacks row i
    keep = ~lacks.any(axis=0)
    missing_on = {
        int(i): tuple(int(j) for j in np.flatnonzero(lacks[:, i])) for i in np.flatnonzero(~keep)
    }
    first = rows[0][np.isin(rows[0], common)]
    if not all(np.array_equal(r[np.isin(r, common)], first) for r in rows):
        raise RuntimeError(
            f"{source}: processes read the rows they share in different orders; an input "
            "changed while they read it. Rerun once the input is stable."
        )
    differ = any(len(r) != len(common) for r in rows)  # ids are unique within a process
    if strict and (differ or (meta[:, 2] > 0).any()):
        if first_skip:
            raise BadRowError(f"{first_skip} [strict mode: every process stops]")
        if missing_on:
            i, procs = next(iter(missing_on.items()))
            detail = missing_detail(procs, image_keys[i] if image_keys else "")
            raise BadRowError(
                f"{source}, row {ids[i]}: unreadable_on_other_process ({detail}) [strict mode: "
                "every process stops]"
            )
        bad = [j for j in range(len(meta)) if meta[j, 2] > 0 or len(rows[j]) > len(common)]
        raise BadRowError(
            f"{source}: process {', '.join(map(str, bad))} skipped rows or read rows this "
            "process did not (see its log for the file and row) [strict mode: every process "
            "stops]"
        )
    return RowAgreement(keep=keep, rows_read=int(meta[:, 1].max()), missing_on=missing_on)


def _allgather_int64(x: np.ndarray) -> np.ndarray:
    """(P, *x.shape) int64 from every process's x (int64, same shape everywhere). Sent as int32
    pairs: with jax_enable_x64 off, JAX would truncate int64 to int32."""
    from jax.experimental import multihost_utils

    halves = np.ascontiguousarray(x, dtype="<i8").view("<i4")
    out = np.asarray(multihost_utils.process_allgather(halves))
    return np.ascontiguousarray(out, dtype="<i4").view("<i8").reshape(len(out), *x.shape)


def _failed_elsewhere(failed: np.ndarray, source: str) -> str:
    procs = ", ".join(str(int(j)) for j in np.flatnonzero(failed))
    return (
        f"{source}: process {procs} failed to load it (see its log); this process stops too "
        "rather than wait for it"
    )


def _read_strict(
    path: str,
    data_cfg: Any,
    skips: Skips,
    max_rows: int,
    role: str,
    source: str,
    inputs: list[tuple[str, int]],
) -> list[Record]:
    """Strict mode's reading: stops at the first unusable row in input order, whether its
    annotation or its image is what is wrong. The annotations are read leniently first; if
    one is bad, the images of the rows before it are decoded (strictly: the first bad one
    raises), then the bad annotation raises."""
    probe = Skips(strict=False)
    root = image_root_of(data_cfg, role)
    records = readers.read_records(path, root, probe, max_rows, role, inputs)
    if probe.total or probe.captions_dropped:
        before = records[: probe.first_records or 0]
        # Checked at 1 px (the same errors are raised; nothing large is kept).
        imagestore.decode_records(before, 1, int(data_cfg.decode_workers), skips, source)
        raise BadRowError(probe.first)
    return records


def load_set(path: str, data_cfg: ml_collections.ConfigDict | Any, role: str) -> ImageTextSet:
    """Loads `path` (any format `readers.read_records` knows) decoded at data.image_size.

    path "" is the embedded world's split for `role`: "train" the noisy pairs, "test" the
    clean 5-caption test images, "clean" the clean caption set. Uses data.image_root (for the
    test set data.test_image_root when given),
    data.strict, data.max_rows, data.decode_workers, data.cache_dir (a folder: decode once
    into a memory-mapped file there, reused by later loads; see `imagestore`) and data.world.
    From Python, build `data_cfg` with `config_lib.data_config(image_size=..., image_root=...)`.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    import jax

    strict = bool(data_cfg.strict)
    multi = jax.process_count() > 1
    # Several processes read non-strictly, then decide together (strict included), so a
    # process that meets a bad row never leaves the others waiting in a collective.
    skips = Skips(strict=strict and not multi)
    size = int(data_cfg.image_size)
    max_rows = max_rows_of(data_cfg, role)
    source = path or f"world:{role}"
    if not path and role == "test" and data_cfg.get("train", ""):
        log.warning(
            "data.train is %s but data.test is empty: evaluating on the embedded world's test "
            "split, not on your data (set data.test to a Karpathy eval JSON or split file)",
            data_cfg.train,
        )
    if not path and role == "clean" and data_cfg.get("train", ""):
        log.warning(
            "data.train is %s but caption.data is empty: the caption model learns from the "
            "embedded world's clean captions (coloured shapes), not from your domain, and its "
            "captions are added to yours (set caption.data to a clean caption set, e.g. a "
            "Karpathy COCO JSON, and caption.image_root)",
            data_cfg.train,
        )
    cache_dir = str(data_cfg.get("cache_dir", "") or "") if path else ""
    parts = readers.split_inputs(path) if path else []
    inputs: list[tuple[str, int]] = []  # (input, rows read) of each input read
    try:
        if cache_dir:
            key = imagestore.cache_key(path, data_cfg, role, skips.strict)
            cached = imagestore.load_cached(cache_dir, key, skips)
            if cached and "inputs" not in cached[0] and len(parts) > 1:
                # an entry from before per-input counts: read again, so each input is checked
                cached, skips = None, Skips(strict=skips.strict)
        if cache_dir and cached:
            meta, images = cached
            record_parts = meta.get("parts") or [0] * len(meta["ids"])
            records = [
                Record(i, "", tuple(c), k, part=p)
                for i, c, k, p in zip(
                    meta["ids"], meta["captions"], meta["image_keys"], record_parts, strict=True
                )
            ]
            rows_read = int(meta["rows_read"])
            inputs = [(str(p), int(n)) for p, n in meta.get("inputs", [])]
        else:
            if path and skips.strict:
                records = _read_strict(path, data_cfg, skips, max_rows, role, source, inputs)
            elif path:
                root = image_root_of(data_cfg, role)
                records = readers.read_records(path, root, skips, max_rows, role, inputs)
            else:
                records = getattr(_cached_world(_world_key(data_cfg.world)), role)
                records = records[:max_rows] if max_rows else records
            rows_read = len(records) + skips.total
            store = imagestore.MemmapStore(cache_dir, key, size) if cache_dir else None
            try:
                records, images = imagestore.decode_records(
                    records, size, int(data_cfg.decode_workers), skips, source, store
                )
                if store is not None:
                    meta = {
                        "source": source,
                        "ids": [r.sample_id for r in records],
                        "captions": [list(r.captions) for r in records],
                        "image_keys": [r.image_key for r in records],
                        "rows_read": rows_read,
                        "parts": [r.part for r in records],
                        "inputs": inputs,
                    }
                    images = imagestore.save_cached(store, images, meta, skips)
            finally:
                if store is not None and os.path.exists(store.tmp):
                    os.remove(store.tmp)
        error = None
    except Exception as e:
        if not multi:
            raise
        log.exception("%s: could not load it on process %d", source, jax.process_index())
        records, images, rows_read, error = [], None, 0, e
    ids = [r.sample_id for r in records]
    if multi:
        # The last column only decides strict mode: dropped captions stop it too.
        flaws = skips.total + skips.captions_dropped
        meta = np.array([error is not None, len(ids), rows_read, flaws], np.int64)
        gathered = _allgather_int64(meta)
        if gathered[:, 0].any():
            if error is not None:
                raise error  # this process's own error, raised once the others know
            raise RuntimeError(_failed_elsewhere(gathered[:, 0], source))
        width = max(1, int(gathered[:, 1].max()))  # no zero-size collective
        local = np.full(width, PAD, np.int64)
        local[: len(ids)] = id_hashes(ids)
        agreed = agree_on_rows(
            ids,
            _allgather_int64(local),
            gathered[:, 1:],
            jax.process_index(),
            source,
            strict=strict,
            first_skip=skips.first,
            image_keys=[r.image_key for r in records],
        )
        for i, procs in agreed.missing_on.items():
            detail = missing_detail(procs, records[i].image_key)
            skips.skip("unreadable_on_other_process", source, ids[i], detail)
        if agreed.missing_on:
            kept = np.flatnonzero(agreed.keep)
            records, images = [records[i] for i in kept], imagestore.take_rows(images, kept)
            ids = [r.sample_id for r in records]
        rows_read = agreed.rows_read
    if skips.total:
        log.warning("%s: skipped %s (e.g. %s)", source, skips.as_dict(), skips.examples)
    if skips.captions_dropped:
        log.warning(
            "%s: %d empty or non-UTF-8 captions dropped from rows that keep their other captions",
            source,
            skips.captions_dropped,
        )
    if not ids:
        why = f"skipped {skips.as_dict()}, e.g. {skips.first}" if skips.total else "it is empty"
        raise InputError(f"{source}: no usable rows for {role} ({rows_read} read; {why})")
    per_input = input_counts(parts, inputs, records)
    if per_input:
        # Inputs read whole: where max_rows cut the set, not the one it cut, nor any after.
        whole = len(inputs) - int(bool(max_rows and rows_read >= max_rows))
        roots = readers.input_roots(parts, image_root_of(data_cfg, role))
        check_every_input_used(per_input, roots, role, skips, whole)
    loaded = ImageTextSet(
        ids=ids,
        images=images,
        captions=[list(r.captions) for r in records],
        image_keys=[r.image_key for r in records],
        rows_read=rows_read,
        skipped={reason: skips.counts.get(reason, 0) for reason in SKIP_REASONS},
        source=source,
        captions_dropped=skips.captions_dropped,
        inputs=per_input,
    )
    if jax.process_index() == 0:
        log.info(
            "%s (%s): %d rows read, %d usable (%d image-caption pairs), %d skipped",
            source,
            role,
            rows_read,
            len(ids),
            sum(len(r.captions) for r in records),
            skips.total,
        )
    if role != "test":
        return loaded
    grouped = group_by_image(loaded)
    if len(grouped) < 10:  # the largest K of the recall keys
        log.warning(
            "%s: the test set has %d distinct images: text->image recall@K (ir_r<K>) for "
            "K >= %d is 100 by construction",
            source,
            len(grouped),
            len(grouped),
        )
    return grouped


def group_by_image(data: ImageTextSet) -> ImageTextSet:
    """One row per distinct image, holding the captions of every row that shows it, in input
    order (first row's id and image key). Retrieval counts an image's captions as its own
    (BLIP's evaluation), so a test set given one row per caption (a TSV, a webdataset, a
    Karpathy train-style JSON) must not evaluate the same image as several images each
    owning one caption: every caption but one would count as a wrong match for its image.
    Rows share an image when they name the same file or hold the same encoded bytes
    (`imagestore.image_identity`)."""
    if not isinstance(data.images, imagestore.ImageRows):
        return data
    group_of: dict[int, int] = {}  # stored image -> its group, numbered as first shown
    first_rows: list[int] = []
    captions: list[list[str]] = []
    for i, slot in enumerate(data.images.index.tolist()):
        g = group_of.setdefault(slot, len(first_rows))
        if g == len(first_rows):
            first_rows.append(i)
            captions.append([])
        captions[g].extend(data.captions[i])
    if len(first_rows) == len(data):
        return data
    log.info(
        "%s: %d rows show %d distinct images; evaluating each image once with all its "
        "captions (%d)",
        data.source,
        len(data),
        len(first_rows),
        sum(map(len, captions)),
    )
    return dataclasses.replace(data.subset(first_rows), captions=captions)
