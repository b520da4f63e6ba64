"""Readers for every supported input format, all producing `records.Record` lists.

Formats (picked by `read_records` from the path):
  * BLIP pre-training JSON: a list of {"image", "caption": str}.
  * Karpathy train JSON: rows {"image", "caption": str, "image_id"}, one row per caption.
  * Karpathy eval JSON: rows {"image", "caption": [str, ...]}, one row per image.
  * Karpathy's original split file (`dataset_flickr30k.json`, `dataset_coco.json`, ...):
    {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}, one
    record per image with all its captions. The split comes from the role the file is read
    for (train and clean: "train" + "restval", test: "test"), or from a suffix naming it:
    `dataset_coco.json:val`, `dataset_coco.json:train+restval`. Images of other splits are
    not rows of this input (not read, not counted).
  * COCO's own captions file (`annotations/captions_train2014.json`: `images` with `id` +
    `file_name`, `annotations` with `image_id` + `caption`): one record per image with all
    its captions. Images are found in `data.image_root` or, COCO's own layout, the folder
    the file names (`train2014/`) below it or beside the annotation folder.
  * JSON lines of the same objects (also the fallback when a whole .json file fails to parse;
    a file that starts as one JSON array and does not parse is an error naming where it
    breaks). A UTF-8 byte-order mark is ignored (JSON and TSV).
  * CC3M-style TSV: `caption<TAB>image_path` per line (no other column), optional header
    line; a header that names a caption column (`caption`, `text`, ...) and an image column
    (`image_path`, `url`, `filepath`, ...) picks those columns, in any order among others
    (a local path column over a URL column beside it).
    A `.csv` file is read the same way with comma-separated fields. A field may be quoted
    as csv.writer and pandas write it (RFC 4180: holding the separator, `""` for a quote,
    line breaks: such a row runs over several lines); in a TSV, a field that is not quoted
    that way is the text up to the next tab, quotes and all.
  * A directory of img2dataset webdataset shards `*.tar` / `*.tar.gz` (`KEY.jpg` + `KEY.txt` +
    `KEY.json`), one shard file, or a pattern naming shards as webdataset does:
    `/data/{00000..00331}.tar`, `/data/part-*/*.tar` (a shard the braces name that is not
    there counts as `unreadable_shard`). A shard cut short is counted once as
    `unreadable_shard`; its samples before the cut are read. Images of uncompressed shards
    are not kept in memory: a record points at the bytes in the shard (`ShardMember`), read
    when the image is decoded.
  * A folder without shards holding images with caption files beside them (`KEY.jpg` +
    `KEY.txt` and/or `KEY.json`): img2dataset's default `files` output, subfolders included.
    Sample ids are the keys (`00000/000000001`), image keys the paths below the folder.
  * `tfds:NAME[:split]`: a TFDS data source the user already prepared (never downloads);
    images are read from it again when decoded (`TfdsImage`), not held as bytes.

Several inputs joined by commas (`a.json,b.tsv,shards/`) are read in turn as one set.

Sample ids are stable and unique: an explicit `sample_id` / `id` / `image_id` field when the
row has one, else `<file stem>:<row>` (JSON list: 0-based element index; line formats:
1-based number of the line the row starts on), for webdataset `<shard stem>/<__key__>`. A
repeated id gets `#k` appended for its k-th repeat (Karpathy train rows share their image's
`image_id`).

Relative image paths are joined with `image_root`, or with the annotation file's folder when
`image_root` is empty; several inputs may each have their own root (`input_roots`). Images
are not opened here: decoding (and the missing / truncated /
not-an-image accounting) happens once, in `dataset.load_set`.
"""

from __future__ import annotations

import bz2
import collections
import csv
import glob
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import tarfile
import tempfile
import threading
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tldr_jax.data.records import (
    InputError,
    Record,
    ShardMember,
    Skips,
    TfdsImage,
    clean_caption,
)

_ID_FIELDS = ("sample_id", "id", "image_id")
_TSV_HEADER_CAPTION = {"caption", "captions", "text", "title"}
_TSV_HEADER_PATH = {"image_path", "filepath", "path", "file", "image", "file_name", "filename"}
_TSV_HEADER_IMAGE = {*_TSV_HEADER_PATH, "url", "image_url"}
_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
# An image file name at the end of a field (Flickr8k's `1000268201.jpg#0` too).
_IMAGE_NAME = re.compile(rf"\.(?:{'|'.join(_WDS_IMAGE_EXTS)})(?:#\d+)?$", re.I)
_TFDS_CAPTION_FIELDS = ("captions/text", "caption", "captions", "text", "caption/text")
_TFDS_ID_FIELDS = ("image/id", "id", "image_id")
_KARPATHY_ID_FIELDS = ("cocoid", "imgid")
# Splits of Karpathy's original files read for each role (`dataset.ROLES`) without a suffix.
# clean: the captioner's clean caption set (SPEC A.5: Karpathy COCO train).
KARPATHY_SPLITS = {
    "train": ("train", "restval"),
    "test": ("test",),
    "clean": ("train", "restval"),
}


class _Limit(Exception):
    """Raised internally when max_rows input rows have been read."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_bad_utf8(*texts: str) -> bool:
    # Text decoded with errors="surrogateescape" keeps undecodable bytes as lone surrogates;
    # a JSON escape (`"\\ud83d"`) or a file name in another encoding gives them too. None
    # can be written as UTF-8 (summaries, manifests, the tokenizer).
    return any(_SURROGATE.search(t) for t in texts)


def _bad_utf8_path(path: str) -> bool:
    """Whether the bytes of file path `path` (as the file system has them) are not UTF-8. In a
    UTF-8 locale the same as `_has_bad_utf8`; in another (`LC_ALL=C` with `PYTHONUTF8=0`)
    a folder such as `--config.data.image_root=/data/données` reaches Python with its
    non-ASCII bytes as lone surrogates, and is UTF-8 all the same."""
    try:
        os.fsencode(path).decode("utf-8")
    except (UnicodeError, ValueError):
        return True
    return False


def _utf8_only(raw: list[str]) -> tuple[list[str], int]:
    """The texts of `raw` that are UTF-8, and how many are not (dropped from a row that keeps
    its other captions, as empty ones are)."""
    good = [t for t in raw if not _has_bad_utf8(t)]
    return good, len(raw) - len(good)


def _clean_all(raw: list[str]) -> tuple[str, ...]:
    return tuple(c for c in map(clean_caption, raw) if c)


def annotation_folder(path: str) -> str:
    """Where a file's relative image paths resolve when `data.image_root` is empty."""
    return os.path.dirname(os.path.abspath(path))


def input_identity(path: str) -> str:
    """`path` as it names the same input from any working folder: absolute for files and
    shard folders (a `:split` suffix kept), `tfds:` / `world:` names as they are; several
    inputs (`split_inputs`) each so, joined by commas."""
    parts = split_inputs(path)
    if len(parts) > 1:
        return ",".join(input_identity(p) for p in parts)
    return path if path.startswith(("tfds:", "world:")) else os.path.abspath(path)


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
URL_DETAIL = (
    "the image is a URL; images are read from disk, never downloaded: fetch them first "
    "(e.g. img2dataset to webdataset shards) and point data.train at the shard folder"
)


def file_url_path(text: str) -> str | None:
    """The local path a `file:` URL names (`file:///a/b`, `file://localhost/a/b`,
    `file:/a/b`; %-escapes decoded), or None for anything else."""
    if text[:5].lower() != "file:":
        return None
    rest = text[5:]
    if rest.startswith("//"):
        rest = rest[2:]
        host, slash, path = rest.partition("/")
        if host.lower() not in ("", "localhost"):
            return None  # another host's file: not a path on this machine
        rest = slash + path
    return urllib.parse.unquote(rest)


def _resolve(image: str, image_root: str, base_dir: str) -> str:
    local = file_url_path(image)
    if local is not None:
        image = local
    if os.path.isabs(image):
        return image
    return os.path.join(image_root or base_dir, image)


def _is_remote(image: str) -> bool:
    return bool(_URL.match(image)) and file_url_path(image) is None


def _captions(value: Any) -> tuple[str, ...] | None:
    """Cleaned non-empty captions of a str or list-of-str field; None if malformed."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        return None
    return _clean_all(value)


class _RecordSink:
    """Collects records, enforces max_rows over rows read, and makes ids unique."""

    def __init__(self, skips: Skips, max_rows: int):
        self.skips = skips
        self.max_rows = max_rows
        self.rows_read = 0
        self.records: list[Record] = []
        self._ids: set[str] = set()
        self._next_suffix: dict[str, int] = {}
        # The input being read (one of several joined by commas): a record's file where its
        # reader names no other, so an image that does not decode is reported at it; `part`
        # its position among the inputs.
        self.input = ""
        self.part = 0
        self.limited = False  # max_rows stopped the reading

    def row(self) -> None:
        """Counts one input row; call before handling it."""
        if self.max_rows and self.rows_read >= self.max_rows:
            self.limited = True
            raise _Limit
        self.rows_read += 1
        self.skips.records_before = len(self.records)

    def add(
        self,
        sample_id: str,
        image: Any,
        captions: tuple[str, ...],
        key: str,
        row: int | str = "",
        file: str = "",
    ) -> bool:
        """Adds the record; False where it is unusable after all (counted as skipped): ids,
        keys, paths or captions that are not UTF-8, a NUL byte in an image path."""
        where = file or self.input
        # The image path joins the data folder (from the config: a path, judged by its bytes)
        # to the name the input gives (`key`, judged as text with the ids and captions).
        path_bad = isinstance(image, str) and _bad_utf8_path(image)
        if path_bad or _has_bad_utf8(sample_id, key, *captions):
            self.skips.skip("non_utf8", where, row, "a name or caption that is not UTF-8")
            return False
        if isinstance(image, str) and "\x00" in image:
            self.skips.skip("malformed_row", where, row, "a NUL byte in the image path")
            return False
        k = self._next_suffix.get(sample_id, 0)
        unique = f"{sample_id}#{k}" if k else sample_id
        while unique in self._ids:
            k += 1
            unique = f"{sample_id}#{k}"
        self._next_suffix[sample_id] = k + 1
        self._ids.add(unique)
        self.records.append(Record(unique, image, captions, key, row, where, self.part))
        return True


def _json_row(
    row: Any, file: str, where: int, default_id: str, image_root: str, sink: _RecordSink
) -> None:
    skips = sink.skips
    if not isinstance(row, dict):
        return skips.skip("malformed_row", file, where, f"not an object: {type(row).__name__}")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        url = next((row[k] for k in ("url", "image_url") if isinstance(row.get(k), str)), "")
        if _is_remote(url):  # BLIP's CapFilt files: [{"url", "caption"}]
            return skips.skip("missing_image", file, where, URL_DETAIL)
        return skips.skip("malformed_row", file, where, "no 'image' string")
    if row.get("caption") is None:
        return skips.skip("no_caption", file, where)
    captions = _captions(row["caption"])
    if captions is None:
        return skips.skip("malformed_row", file, where, "'caption' is not a str or list of str")
    raw = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
    good, bad = _utf8_only(raw)
    if _has_bad_utf8(image) or (bad and not good):
        return skips.skip("non_utf8", file, where)
    captions = _clean_all(good) if bad else captions
    if not captions:
        return skips.skip("empty_caption", file, where)
    if _is_remote(image):
        return skips.skip("missing_image", file, where, URL_DETAIL)
    sample_id = next((str(row[k]) for k in _ID_FIELDS if row.get(k) not in (None, "")), "")
    base_dir = annotation_folder(file)
    resolved = _resolve(image, image_root, base_dir)
    if sink.add(sample_id or default_id, resolved, captions, image, where):
        skips.drop_captions(file, where, len(good) - len(captions), len(raw), bad)


def _karpathy_image(
    row: Any, file: str, where: int, stem: str, image_root: str, sink: _RecordSink
) -> None:
    """One image entry of a Karpathy `dataset_*.json` (already known to be in the split)."""
    skips = sink.skips
    name = row.get("filename")
    if not isinstance(name, str) or not name:
        return skips.skip("malformed_row", file, where, "no 'filename' string")
    folder = row.get("filepath") or ""
    if not isinstance(folder, str):
        return skips.skip("malformed_row", file, where, "'filepath' is not a string")
    sentences = row.get("sentences")
    if not sentences:
        return skips.skip("no_caption", file, where)
    if not isinstance(sentences, list) or not all(isinstance(x, dict) for x in sentences):
        return skips.skip("malformed_row", file, where, "'sentences' is not a list of objects")
    raw = []
    for x in sentences:
        text = x.get("raw")
        if text is None and isinstance(x.get("tokens"), list):
            text = " ".join(t for t in x["tokens"] if isinstance(t, str))
        if not isinstance(text, str):
            return skips.skip("malformed_row", file, where, "a sentence without 'raw' text")
        raw.append(text)
    image = os.path.join(folder, name)
    good, bad = _utf8_only(raw)
    if _has_bad_utf8(image) or (bad and not good):
        return skips.skip("non_utf8", file, where)
    captions = _clean_all(good)
    if not captions:
        return skips.skip("empty_caption", file, where)
    sample_id = next((str(row[k]) for k in _KARPATHY_ID_FIELDS if row.get(k) not in (None, "")), "")
    base_dir = annotation_folder(file)
    resolved = _resolve(image, image_root, base_dir)
    if sink.add(sample_id or f"{stem}:{where}", resolved, captions, image, where):
        skips.drop_captions(file, where, len(good) - len(captions), len(raw), bad)


def _read_karpathy(
    images: list, path: str, splits: tuple[str, ...], image_root: str, sink: _RecordSink
) -> None:
    stem = Path(path).stem
    for i, row in enumerate(images):
        split = row.get("split") if isinstance(row, dict) else None
        if isinstance(split, str) and split not in splits:
            continue  # another split's image: not a row of this input
        sink.row()
        if not isinstance(row, dict):
            sink.skips.skip("malformed_row", path, i, f"not an object: {type(row).__name__}")
        elif not isinstance(split, str):
            sink.skips.skip("malformed_row", path, i, f"no 'split' string: {split!r}")
        else:
            _karpathy_image(row, path, i, stem, image_root, sink)


def _is_coco(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def _coco_image_folder(path: str, image_root: str, images: list) -> str:
    """Where a COCO captions file's `file_name`s are. COCO's own layout keeps
    `annotations/captions_val2014.json` beside `val2014/`, and a data root shared by train
    and test (BLIP's `image_root`) holds both image folders, so the folder named by the
    file (`val2014`) is tried under `image_root` (or beside the annotation folder) as well
    as that root itself: the first where one of the first images exists."""
    root = image_root or annotation_folder(path)
    match = re.fullmatch(r"captions_(\w+)", Path(path).stem)
    candidates = [root]
    if match:
        named = match[1]
        candidates += [os.path.join(root, named)]
        if not image_root:
            candidates += [os.path.join(os.path.dirname(root), named)]
    names = [r["file_name"] for r in images[:8] if isinstance(r, dict) and r.get("file_name")]
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, str(n))) for n in names):
            return folder
    return root


def coco_image_folder(path: str, image_root: str) -> str | None:
    """The folder a COCO captions file's images resolve against (`_coco_image_folder`);
    None when `path` is not one."""
    if Path(path).suffix.lower() != ".json" or not os.path.isfile(path):
        return None
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    return _coco_image_folder(path, image_root, data["images"]) if _is_coco(data) else None


def _read_coco(data: dict, path: str, image_root: str, sink: _RecordSink) -> None:
    """COCO's own captions file (`captions_train2014.json`): one record per entry of
    `images` ({"id", "file_name"}) with the captions of every `annotations` entry
    ({"image_id", "caption"}) naming it, in file order. An annotation that cannot be used
    (no such image, a caption that is not a string or not UTF-8) counts as a row of its own;
    the image keeps its other captions."""
    skips = sink.skips
    stem = Path(path).stem
    base_dir = _coco_image_folder(path, image_root, data["images"])
    captions: dict[str, list[str]] = {}
    not_utf8: dict[str, int] = {}  # per image id, its annotations that are not UTF-8
    bad: list[tuple[int, str, str]] = []
    image_ids = {str(r.get("id")) for r in data["images"] if isinstance(r, dict)}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            bad.append((i, "malformed_row", "an annotation without a 'caption' string"))
        elif str(ann.get("image_id")) not in image_ids:
            bad.append((i, "missing_image", f"image_id {ann.get('image_id')!r} is not in 'images'"))
        elif _has_bad_utf8(ann["caption"]):
            bad.append((i, "non_utf8", f"image_id {ann.get('image_id')!r}: a caption not UTF-8"))
            image_id = str(ann["image_id"])
            not_utf8[image_id] = not_utf8.get(image_id, 0) + 1
        else:
            captions.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    for i, row in enumerate(data["images"]):
        sink.row()
        if not isinstance(row, dict):
            skips.skip("malformed_row", path, i, f"not an object: {type(row).__name__}")
            continue
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            skips.skip("malformed_row", path, i, "no 'file_name' string")
            continue
        raw = captions.get(str(row.get("id")), [])
        if not raw and (n_bad := not_utf8.get(str(row.get("id")))):
            skips.skip("non_utf8", path, i, f"its {n_bad} annotation(s) are not UTF-8")
            continue
        if not raw:
            skips.skip("no_caption", path, i, f"no annotation names image id {row.get('id')!r}")
            continue
        if _has_bad_utf8(name):
            skips.skip("non_utf8", path, i)
            continue
        cleaned = _clean_all(raw)
        if not cleaned:
            skips.skip("empty_caption", path, i)
            continue
        sample_id = str(row["id"]) if row.get("id") not in (None, "") else f"{stem}:{i}"
        if sink.add(sample_id, _resolve(name, "", base_dir), cleaned, name, i):
            skips.drop_captions(path, i, len(raw) - len(cleaned), len(raw))
    for i, reason, detail in bad:
        sink.row()
        skips.skip(reason, path, f"annotations[{i}]", detail)


def _is_karpathy(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and "image" not in data


def _read_json(
    path: str,
    image_root: str,
    sink: _RecordSink,
    splits: tuple[str, ...] | None = None,
    split_suffix: bool = False,
) -> None:
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors)
    stem = Path(path).stem
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            # One JSON array that does not parse (a trailing comma, a cut file): its rows
            # cannot be told apart, so say where it breaks rather than read it as lines.
            raise InputError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from e
        data = None
    if _is_coco(data):
        if split_suffix:
            raise InputError(f"{path}: a COCO captions file is one split; it takes no suffix")
        return _read_coco(data, path, image_root, sink)
    if _is_karpathy(data):
        if splits is None:
            raise InputError(
                f"{path}: a Karpathy split file (an 'images' list): say which split to read "
                f"with a suffix, e.g. {path}:test"
            )
        present = {
            r["split"]
            for r in data["images"]
            if isinstance(r, dict) and isinstance(r.get("split"), str)
        }
        if split_suffix and not present.intersection(splits):
            names = ", ".join(sorted(str(x) for x in present))
            raise InputError(
                f"{path}: no images of split {'+'.join(splits)} (splits in the file: {names})"
            )
        return _read_karpathy(data["images"], path, splits, image_root, sink)
    if split_suffix:
        raise InputError(f"{path}: a ':split' suffix is only for Karpathy split files")
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list):
        for i, row in enumerate(data):
            sink.row()
            _json_row(row, path, i, f"{stem}:{i}", image_root, sink)
        return
    # Not one JSON list: read it as JSON lines, one object per line.
    # LF, CRLF or CR (which JSON strings cannot hold unescaped), not str.splitlines: that
    # also breaks at U+2028, U+2029 and U+0085, which JSON strings may hold.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        sink.row()
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            reason = "non_utf8" if _has_bad_utf8(line) else "malformed_row"
            sink.skips.skip(reason, path, lineno, f"line {lineno}: {e.msg}")
            continue
        _json_row(row, path, lineno, f"{stem}:{lineno}", image_root, sink)


def _tsv_header(fields: list[str]) -> tuple[int, int] | None:
    """(caption column, image column) when the first line is a header naming both (any
    order, other columns around them), else None."""
    names = [f.strip().lower() for f in fields]
    caption = next((i for i, n in enumerate(names) if n in _TSV_HEADER_CAPTION), None)
    # A local path column wins over a URL column kept beside it (`caption url filepath`).
    image = next((i for i, n in enumerate(names) if n in _TSV_HEADER_PATH), None)
    if image is None:
        image = next((i for i, n in enumerate(names) if n in _TSV_HEADER_IMAGE), None)
    return None if caption is None or image is None else (caption, image)


# A quoted field runs over at most this many lines: past it (or at the end of the file) the
# quote is taken as one that is never closed, and its line is read on its own.
_MAX_ROW_LINES = 64
_MORE = object()  # the text ends inside a quoted field: the row goes on on the next line
_ONE_LINE = object()  # no quoted field runs over the lines: the first line is the row


def _tsv_quoted(text: str, i: int, more: bool) -> Any:
    """(value, index after its closing quote) of the quoted TSV field opening at `text[i]`;
    None when it does not close as one (`_tsv_fields`); `_MORE` when `more` and the text
    ends inside it."""
    parts, j = [], i + 1
    while True:
        q = text.find('"', j)
        if q < 0:
            return _MORE if more else None
        parts.append(text[j:q])
        if text.startswith('"', q + 1):  # "" inside: one quote
            parts.append('"')
            j = q + 2
        elif q + 1 == len(text) or text[q + 1] == "\t":
            return "".join(parts), q + 1
        else:  # a quote inside the text: not a quoted field
            return None


def _tsv_fields(text: str, more: bool) -> Any:
    """The fields of a TSV row. A field is quoted only when it is one the csv module or
    pandas writes (`"` ... `"` right before a tab or the row's end, `""` for a quote, tabs
    and line breaks inside); any other field is the text up to the next tab as it is, quotes
    and all (CC3M captions hold quotes). `more`: `text` is lines joined by `\\n` and may go
    on; gives `_MORE` when it ends inside a quoted field, `_ONE_LINE` when a line break is
    outside one. Without `more` (one line), an unclosed quoted field is text as it is."""
    fields: list[str] = []
    i = 0
    while True:
        if text.startswith('"', i):
            quoted = _tsv_quoted(text, i, more)
            if quoted is _MORE:
                return _MORE
            if quoted is not None:
                value, end = quoted
                fields.append(value)
                if end == len(text):
                    return fields
                i = end + 1  # past the tab
                continue
        tab = text.find("\t", i)
        field = text[i:] if tab < 0 else text[i:tab]
        if "\n" in field:
            return _ONE_LINE
        fields.append(field)
        if tab < 0:
            return fields
        i = tab + 1


def _csv_spans(text: str) -> Any:
    """`_MORE` when `text` (lines joined by `\\n`) ends inside a quoted CSV field, as the
    csv module reads it (excel dialect: a field opening with `"` is quoted up to a `"` not
    doubled; after it, and in a field not opening with `"`, quotes are text); `_ONE_LINE`
    when a quoted field holding a line break does not close right before a comma or the
    row's end (a quote never closed, not a field over several lines); else None."""
    i, n = 0, len(text)
    while i < n:  # at the start of a field
        if text[i] == '"':
            j = i + 1
            while True:
                q = text.find('"', j)
                if q < 0:
                    return _MORE
                if not text.startswith('"', q + 1):
                    break
                j = q + 2
            if q + 1 < n and text[q + 1] != "," and "\n" in text[i:q]:
                return _ONE_LINE
            i = q + 1
        comma = text.find(",", i)
        if comma < 0:
            return None
        i = comma + 1
    return None


def _csv_fields(text: str, more: bool) -> Any:
    """The fields of a CSV row as the csv module reads it (`more`: as for `_tsv_fields`)."""
    spans = _csv_spans(text) if more else None
    return spans if spans is not None else next(csv.reader([text]), [])


def _cr_lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary file whose lines end in CR alone, read a chunk at a time."""
    rest = b""
    while data := f.read(chunk):
        *lines, rest = (rest + data).split(b"\r")
        yield from lines
    if rest:
        yield rest


def _tsv_rows(path: str, sep: str) -> Iterator[tuple[int, int, str, Any]]:
    """(first line, last line, text, fields) of each row of a TSV (`sep` tab) or CSV file,
    lines numbered from 1, read line by line (never the whole file at once); blank lines
    between rows are not rows. A quoted field may hold line breaks: its row runs over
    several lines, joined by `\\n` in `text` (at most `_MAX_ROW_LINES`: a quote not closed
    by then, or by the end of the file, is text, read as a line without quoted fields).
    Text is UTF-8; undecodable bytes are kept as lone surrogates (`_has_bad_utf8`).
    `fields` is a list of str, or a `csv.Error` the row's text raised."""
    split = _tsv_fields if sep == "\t" else _csv_fields
    pending: list[tuple[int, str]] = []  # lines read ahead for a row they were not part of

    def lines() -> Iterator[tuple[int, str]]:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(0)
            # Classic Mac OS line endings (CR only): one line per CR, else the file is one row.
            cr_only = b"\r" in head and b"\n" not in head
            for lineno, raw in enumerate(_cr_lines(f) if cr_only else f, start=1):
                raw = raw.rstrip(b"\n").rstrip(b"\r")
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                yield lineno, raw.decode("utf-8", errors="surrogateescape")

    source = lines()

    def next_line() -> tuple[int, str] | None:
        return pending.pop() if pending else next(source, None)

    while (line := next_line()) is not None:
        start, first = line
        if not first.strip():
            continue
        rows = [first]
        try:
            if '"' not in first:  # most rows: split as they are
                yield start, start, first, first.split(sep) if sep == "\t" else split(first, False)
                continue
            while True:
                fields = split("\n".join(rows), True)
                if fields is _MORE and len(rows) < _MAX_ROW_LINES:
                    line = next_line()
                    if line is not None:
                        rows.append(line[1])
                        continue
                if fields is _MORE or fields is _ONE_LINE:
                    # Not a row over several lines: its first line on its own, the lines
                    # read ahead read again as rows of their own.
                    pending += [(start + k, rows[k]) for k in range(len(rows) - 1, 0, -1)]
                    rows = [first]
                    fields = split(first, False)
                yield start, start + len(rows) - 1, "\n".join(rows), fields
                break
        except csv.Error as e:  # a line break in an unquoted field, a field too large
            yield start, start + len(rows) - 1, "\n".join(rows), e


def _read_tsv(path: str, image_root: str, sink: _RecordSink, sep: str = "\t") -> None:
    """TSV (`sep` tab) or CSV (`sep=","`) rows (`_tsv_rows`): `caption<TAB>image_path`, or
    the columns a header line names. A row's number is the line it starts on."""
    stem = Path(path).stem
    base_dir = annotation_folder(path)
    skips = sink.skips
    header: tuple[int, int] | None = None
    caption_col, image_col = 0, 1  # `caption<TAB>image_path` unless a header says otherwise
    expected = "caption<TAB>image_path" if sep == "\t" else f"caption{sep}image_path"
    for lineno, last, text, fields in _tsv_rows(path, sep):
        # A row over several lines (a quoted field holding line breaks) says which.
        lines = f"; the row is lines {lineno}-{last}" if last > lineno else ""
        if _has_bad_utf8(text):
            sink.row()
            skips.skip("non_utf8", path, lineno, lines.removeprefix("; "))
            continue
        if isinstance(fields, csv.Error):
            sink.row()
            skips.skip("malformed_row", path, lineno, f"not a CSV row: {fields}{lines}")
            continue
        if lineno == 1:
            header = _tsv_header(fields)
            if header is not None:
                caption_col, image_col = header
                expected = "the header's columns"
                continue
        sink.row()
        if len(fields) <= max(caption_col, image_col) or not fields[image_col].strip():
            skips.skip("malformed_row", path, lineno, f"expected {expected}{lines}")
            continue
        image_field = fields[image_col].strip()
        if header is None and any(f.strip() for f in fields[2:]):
            # Without a header a row is two columns: a third is not a caption or an image.
            detail = f"expected {expected}, not {len(fields)} columns (without a header line"
            skips.skip("malformed_row", path, lineno, f"{detail} naming the columns){lines}")
            continue
        first = fields[0].strip()
        # Read the other way round only where it is plain: a first column that is one word (a
        # URL, a file name), a second that names no image file (a caption; a path that exists
        # is read as one, whatever the caption looks like).
        swapped = False
        if (
            header is None
            and _one_word(first)
            and not _IMAGE_NAME.search(image_field)
            and not os.path.exists(_resolve(image_field, image_root, base_dir))
        ):
            if _is_remote(first):  # CC12M's own cc12m.tsv: url<TAB>caption, no header
                detail = f"{URL_DETAIL} (the URL is the first column: url<TAB>caption){lines}"
                skips.skip("missing_image", path, lineno, detail)
                continue
            # Flickr8k's token file: `1000268201.jpg#0<TAB>A child in a pink dress .`
            words = not _one_word(image_field) and "/" not in image_field
            swapped = bool(_IMAGE_NAME.search(first)) and words
        if swapped:
            detail = (
                "the first column looks like an image file and the second like a caption: "
                f"expected {expected}, or a header line naming the columns{lines}"
            )
            skips.skip("malformed_row", path, lineno, detail)
            continue
        caption, image = clean_caption(fields[caption_col]), image_field
        if not caption:
            skips.skip("empty_caption", path, lineno, lines.removeprefix("; "))
            continue
        if _is_remote(image):
            skips.skip("missing_image", path, lineno, URL_DETAIL + lines)
            continue
        resolved = _resolve(image, image_root, base_dir)
        sink.add(f"{stem}:{lineno}", resolved, (caption,), image, lineno)


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _one_word(text: str) -> bool:
    return bool(text) and not any(c.isspace() for c in text)


def _shard_stem(shard: Path) -> str:
    """`00001.tar` -> `00001`; `part-1/00001.tar.gz` -> `part-1/00001`."""
    name = shard.as_posix()
    return next(name[: -len(x)] for x in _SHARD_SUFFIXES if name.endswith(x))


# Images of uncompressed shards as `ShardMember`s; `benchmarks/data_memory.py --webdataset`
# turns it off in one of its processes to measure the loader that held every image's bytes.
LAZY_SHARD_IMAGES = True


# A webdataset sample whose group holds the same extension twice: skipped as malformed
# (webdataset itself raises "duplicate file name in tar file").
_DUPLICATE_EXT = "\x00duplicate"


class _LastRead:
    """A file object that remembers what its last `read` returned: after tarfile's member
    loop, the block it took for the next header. Python's tarfile also ends that loop
    without an error where a shard was cut at a block boundary or inside a header, or holds
    a block of garbage there (no end-of-archive zeros); that block tells which it was, in a
    compressed shard too, without reading the stream again."""

    def __init__(self, f: Any):
        self._f = f
        self.last = b""

    def read(self, n: int = -1) -> bytes:
        self.last = self._f.read(n)
        return self.last

    def seek(self, *args: int) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()


def _open_shard(f: Any) -> tuple[Any, bool]:
    """The shard's (decompressed) byte stream over the open file `f`, and whether it is
    compressed (gzip, bzip2 or xz, by their leading bytes, as tarfile.open("r") detects)."""
    head = f.read(6)
    f.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f, mode="rb"), True
    if head.startswith(b"BZh"):
        return bz2.BZ2File(f), True
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f), True
    return f, False


def _shard_samples(
    shard: Path,
) -> tuple[list[tuple[str, dict[str, bytes | ShardMember]]], Exception | None]:
    """(key, {extension: bytes}) per sample in the shard's own order (webdataset: key = name
    up to the first dot of the basename; consecutive files with one key are one sample, a
    key met again later starts another), and the error that stopped the reading, if any: a
    shard cut short keeps the samples before the cut, less the last one (its other files
    may be in the lost tail). In an uncompressed shard an image is a `ShardMember` (where
    its bytes are, read again when it is decoded), so a set is never held whole as encoded
    bytes. A sample holding one extension twice carries `_DUPLICATE_EXT`."""
    samples: list[tuple[str, dict[str, bytes | ShardMember]]] = []
    try:
        with open(shard, "rb") as raw:
            stream, compressed = _open_shard(raw)
            lazy = LAZY_SHARD_IMAGES and not compressed
            source = _LastRead(stream)
            # Over a file object it does not own, a TarFile holds nothing that needs closing.
            tar = tarfile.open(fileobj=source, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                files = samples[-1][1]
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                ext = ext.lower()
                if ext in files:
                    files[_DUPLICATE_EXT] = ext.encode()
                if lazy and ext in _WDS_IMAGE_EXTS and len(data) == member.size:
                    digest = hashlib.sha1(data).digest()
                    files[ext] = ShardMember(str(shard), member.offset_data, member.size, digest)
                else:
                    files[ext] = data
            if source.last != tarfile.NUL * tarfile.BLOCKSIZE:
                where = "cut short" if len(source.last) < tarfile.BLOCKSIZE else "a broken header"
                raise tarfile.ReadError(f"{where} at byte {tar.offset} (no end-of-archive block)")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        return samples[:-1], e
    return samples, None


_BRACE = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTER_RANGE = re.compile(r"^([a-zA-Z])\.\.([a-zA-Z])$")
_GLOB_CHARS = re.compile(r"[*?[]")


def _brace_values(body: str) -> list[str] | None:
    """The words one `{...}` (no braces inside) stands for; None when it expands to nothing
    (a literal brace, as a shell leaves `{x}`)."""
    m = _NUMERIC_RANGE.match(body)
    if m:
        lo, hi = int(m[1]), int(m[2])
        step = abs(int(m[3] or 1)) or 1
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-")[0] == "0" for x in m.groups()[:2])
        width = max(len(m[1]), len(m[2])) if padded else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _LETTER_RANGE.match(body)
    if m:
        lo, hi = ord(m[1]), ord(m[2])
        values = range(lo, hi + 1) if lo <= hi else range(lo, hi - 1, -1)
        return [chr(v) for v in values]
    return body.split(",") if "," in body else None


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset / the shell write shard lists: `{00000..00331}` (zero
    padded as written; `{0..10..2}` steps), `{a..e}`, `{train,val}`; nested braces expand
    from the innermost. Words come in written order, each once; a brace with neither `..`
    nor `,` is kept as it is."""
    for m in _BRACE.finditer(pattern):
        values = _brace_values(m[1])
        if values is None:
            continue
        out: list[str] = []
        for v in values:
            out += expand_braces(pattern[: m.start()] + v + pattern[m.end() :])
        return list(dict.fromkeys(out))
    return [pattern]


def is_shard_pattern(path: str) -> bool:
    """Whether `path` names webdataset shards by a pattern (`/data/{00000..00099}.tar`,
    `/data/part-*/*.tar`) rather than being a file or folder that exists."""
    if not path or path.startswith("tfds:") or os.path.exists(path):
        return False
    return expand_braces(path) != [path] or bool(_GLOB_CHARS.search(path))


def _is_shard_name(name: str) -> bool:
    base = os.path.basename(name)
    return base.endswith(_SHARD_SUFFIXES) and not base.startswith(".")


def is_shard_input(path: str) -> bool:
    """Whether `path` is read as webdataset shards: one shard file, a folder holding
    shards, or a shard pattern."""
    if os.path.isfile(path):
        return _is_shard_name(path)
    return (os.path.isdir(path) and bool(shard_paths(path))) or is_shard_pattern(path)


def shard_listing(path: str) -> tuple[Path, list[Path], list[str]]:
    """(root, shards, missing) of a shard folder or pattern. A folder: every shard under it
    (`shard_paths`), each once (a symlink to one of them is not read again). A pattern:
    brace words in written order, each glob's matches sorted, a word or match that is a
    folder standing for the shards under it, each shard once; `missing` = shard files the
    braces name that do not exist. Sample ids and image keys are relative to `root`: the
    folder, or the pattern's folder above its first wildcard."""
    root, entries = shard_entries(path)
    shards = [e for e in entries if isinstance(e, Path)]
    return root, shards, [e for e in entries if isinstance(e, str)]


def shard_entries(path: str) -> tuple[Path, list[Path | str]]:
    """`shard_listing`'s shards and missing names in one list, in the order the pattern
    names them (a missing shard is its name, a str), so a reader meets a gap where the
    input has it."""
    if os.path.isdir(path):  # a folder's shards, a symlink to one of them read once too
        return Path(path), _each_shard_once(shard_paths(path))
    if os.path.isfile(path):  # one shard file
        return Path(os.path.dirname(path) or "."), [Path(path)]
    first = min((i for i in (path.find(c) for c in "{*?[") if i >= 0), default=len(path))
    root = Path(os.path.dirname(path[:first]) or ".")
    entries: list[Path | str] = []
    for word in expand_braces(path):
        if _GLOB_CHARS.search(word):
            found = sorted(glob.glob(word))
            found = [f for f in found if os.path.isdir(f) or _is_shard_name(f)]
        elif os.path.isdir(word) or os.path.isfile(word):
            found = [word]
        else:
            entries.append(word)
            continue
        for f in found:
            if os.path.isdir(f):
                entries += shard_paths(f)
            elif _is_shard_name(f):
                entries.append(Path(f))
            else:
                raise InputError(f"{path}: {f} is not a .tar / .tar.gz shard")
    return root, _each_shard_once(entries)


def _each_shard_once(entries: Sequence[Path | str]) -> list[Path | str]:
    """Each shard once, where it is first named (a pattern naming it twice, a symlink)."""
    seen: set[str] = set()
    unique: list[Path | str] = []
    for e in entries:
        real = os.path.realpath(e) if isinstance(e, Path) else None
        if real is not None and real in seen:
            continue
        if real is not None:
            seen.add(real)
        unique.append(e)
    return unique


def _walk_files(folder: str | Path) -> list[Path]:
    """Every file under `folder`, subfolders included, in order of its path below it;
    hidden files and folders are left out, a symlinked folder loop is walked once."""
    root = Path(folder)
    found = []
    seen: set[str] = set()  # real paths walked
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Real folders before symlinks to them, in name order: which of a folder and a link
        # to it is walked (names the samples) does not depend on the filesystem's order.
        dirnames[:] = sorted(
            (d for d in dirnames if not d.startswith(".")),
            key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d),
        )
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def shard_paths(folder: str | Path) -> list[Path]:
    """The webdataset shards under `folder`, subfolders included (a download split into
    parts), in order of their path below it; hidden files and folders are left out."""
    return [f for f in _walk_files(folder) if f.name.endswith(_SHARD_SUFFIXES)]


def folder_samples(folder: str | Path) -> dict[str, dict[str, Path]]:
    """img2dataset's `files` output (its default) and any folder of images with caption
    files beside them: key (path below `folder` less the file's extension, e.g.
    `00000/000000001`, `trips/photo.2019` for `photo.2019.jpg` + `photo.2019.txt`) ->
    {extension: file}. A key is a sample when it has an image or a `.txt` file;
    img2dataset's per-shard `.parquet` and `_stats.json` files are not. (Inside a `.tar`
    shard the key ends at the first dot of the name, as webdataset groups files.) A key with
    two images (`x.jpg` + `x.png`, `x.jpg` + `x.JPG`) or two caption files of one kind is
    marked with `_DUPLICATE_EXT`: which one the caption describes is unknown."""
    groups: dict[str, dict[str, Path]] = {}
    for f in _walk_files(folder):
        relative = f.relative_to(folder)
        stem, dot, ext = relative.name.rpartition(".")
        if not dot:  # no extension: not an image or a caption file
            continue
        group = groups.setdefault((relative.parent / stem).as_posix(), {})
        ext = ext.lower()
        image = ext in _WDS_IMAGE_EXTS
        if ext in group or (image and any(e in group for e in _WDS_IMAGE_EXTS)):
            group[_DUPLICATE_EXT] = f
        group.setdefault(ext, f)
    return {
        key: files
        for key, files in groups.items()
        if "txt" in files or any(e in files for e in _WDS_IMAGE_EXTS)
    }


def _sample_caption(files: dict[str, Any], read: Any) -> tuple[str, str]:
    """(caption, "") of a webdataset-style sample, from `KEY.txt`, else the `caption` of
    `KEY.json`; or ("", skip reason). `read(ext)` gives that file's bytes."""
    if "txt" in files:
        caption_bytes = read("txt")
    else:
        try:
            meta = json.loads(read("json").decode("utf-8-sig")) if "json" in files else {}
        except UnicodeDecodeError:
            return "", "non_utf8"
        except json.JSONDecodeError:
            return "", "malformed_row"
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if cap is None:
            return "", "no_caption"
        if not isinstance(cap, str):
            return "", "malformed_row"
        caption_bytes = cap.encode("utf-8", "surrogatepass")
    try:
        caption = clean_caption(caption_bytes.decode("utf-8-sig"))  # a byte-order mark off
    except UnicodeDecodeError:
        return "", "non_utf8"
    return (caption, "") if caption else ("", "empty_caption")


def _read_image_folder(path: str, sink: _RecordSink) -> None:
    samples = folder_samples(path)
    if not samples:
        raise FileNotFoundError(
            f"{path}: no .tar shards, and no images or .txt captions (img2dataset 'files' output)"
        )
    skips = sink.skips
    for key, files in samples.items():
        sink.row()
        ext = next((e for e in _WDS_IMAGE_EXTS if e in files), None)
        where = str(next(iter(files.values())))
        if _DUPLICATE_EXT in files:
            names = ", ".join(sorted({f.name for f in files.values()}))
            skips.skip(
                "malformed_row", where, key, f"several images or captions for one key: {names}"
            )
            continue
        if ext is None:
            skips.skip("missing_image", where, key, "no image file for this key")
            continue
        try:
            caption, reason = _sample_caption(files, lambda e, f=files: f[e].read_bytes())
        except OSError as e:  # a caption file that cannot be read (permissions, I/O error)
            caption_file = files["txt"] if "txt" in files else files["json"]
            skips.skip("no_caption", str(caption_file), key, f"cannot read: {e}")
            continue
        if reason:
            skips.skip(reason, str(files[ext]), key)
            continue
        image = files[ext]
        relative = image.relative_to(path).as_posix()
        sink.add(key, str(image), (caption,), relative, row=key, file=str(image))


def _no_image_detail(files: dict[str, Any], repeated: bool) -> str:
    """Why a webdataset sample has no image: its files are split up in the shard (its key
    comes back later), or img2dataset's json says the download failed."""
    if repeated:
        return (
            "no image file among this key's files here: its files are not consecutive in the "
            "shard (webdataset reads a sample's files together; write it with tar --sort=name)"
        )
    detail = "no image file for this key in the shard"
    try:
        meta = json.loads(files["json"]) if isinstance(files.get("json"), bytes) else {}
    except ValueError:
        meta = {}
    status = meta.get("status") if isinstance(meta, dict) else None
    if isinstance(status, str) and status != "success":
        error = meta.get("error_message")
        why = f": {error}" if isinstance(error, str) and error else ""
        detail += f" (img2dataset status {status}{why})"
    return detail


def _read_webdataset(path: str, sink: _RecordSink) -> None:
    root, entries = shard_entries(path)
    if not entries and os.path.isdir(path):
        return _read_image_folder(path, sink)
    if not any(isinstance(e, Path) for e in entries):
        gap = f" (none of the {len(entries)} it names exists: {entries[0]}, ...)" if entries else ""
        raise FileNotFoundError(f"{path}: no .tar shards{gap}")
    skips = sink.skips
    for shard in entries:
        if isinstance(shard, str):  # named by the pattern, not on disk (a download's gap)
            sink.row()
            skips.skip("unreadable_shard", shard, "-", "no such shard file")
            continue
        samples, error = _shard_samples(shard)
        if error is not None:
            # Counted once: how many rows the unread tail held is unknown.
            sink.row()
            kept = f"; the {len(samples)} samples before it are read" if samples else ""
            skips.skip("unreadable_shard", str(shard), "-", f"{error}{kept}")
        repeated = {k for k, n in collections.Counter(k for k, _ in samples).items() if n > 1}
        for key, files in samples:
            sink.row()
            if _DUPLICATE_EXT in files:
                ext = files[_DUPLICATE_EXT].decode()  # type: ignore[union-attr]
                skips.skip("malformed_row", str(shard), key, f"two .{ext} files in one sample")
                continue
            if key.startswith("/") or posixpath.normpath(key).split("/")[0] == "..":
                # A name like ../../x.jpg: it would be written outside the output folder.
                skips.skip("malformed_row", str(shard), key, "a member path that leaves the shard")
                continue
            ext = next((e for e in _WDS_IMAGE_EXTS if e in files), None)
            if ext is None:
                skips.skip(
                    "missing_image", str(shard), key, _no_image_detail(files, key in repeated)
                )
                continue
            caption, reason = _sample_caption(files, files.get)
            if reason:
                skips.skip(reason, str(shard), key)
                continue
            relative = Path(os.path.relpath(shard, root))
            sink.add(
                f"{_shard_stem(relative)}/{key}",
                files[ext],
                (caption,),
                f"{relative.as_posix()}/{key}.{ext}",
                row=key,
                file=str(shard),
            )


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _tfds_builder(tfds: Any, name: str, data_dir: str) -> Any:
    """`tfds.builder`, with the empty `tmp*tfds` folder that TFDS makes (and never removes)
    for a dataset not prepared on disk made inside a scratch folder that is removed."""
    before = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="tldr-jax-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            return tfds.builder(name, data_dir=data_dir or None)
        finally:
            tempfile.tempdir = before


def _read_tfds(spec: str, data_dir: str, sink: _RecordSink) -> None:
    """`tfds:NAME[:split]` via `tfds.data_source` (array_record files already prepared under
    `data_dir`, else TFDS_DATA_DIR or ~/tensorflow_datasets). Images stay encoded, in the
    source: a record's image is a `TfdsImage`, read again when it is decoded."""
    import tensorflow_datasets as tfds

    name, _, split = spec.removeprefix("tfds:").partition(":")
    split = split or "train"
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        builder = _tfds_builder(tfds, name, data_dir)
        if not (builder.data_path / "dataset_info.json").exists():
            raise InputError(
                f"{spec}: TFDS knows the dataset but it is not prepared under {where} "
                f"(no {builder.data_dir}). Prepare it first with `tfds build "
                f"{name} --file_format=array_record --data_dir DIR` "
                "(random access needs array_record files), or point data.image_root at its "
                "data_dir"
            )
        features = builder.info.features.items()
        image_keys = [k for k, f in features if isinstance(f, tfds.features.Image)]
        if not image_keys:
            raise InputError(f"{spec}: the dataset has no Image feature")
        image_key = image_keys[0]
        decoders = {image_key: tfds.decode.SkipDecoding()}
        source = builder.as_data_source(split=split, decoders=decoders)
    except InputError:
        raise
    except Exception as e:  # TFDS's own: not found, not prepared, a format it cannot index
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(
            f"{spec}: cannot read it as a prepared TFDS data source under {where} "
            f"({type(e).__name__}: {first[:300]}). Prepare it first with "
            "`tfds build NAME --file_format=array_record` (random access needs array_record "
            "files), or point data.image_root at its data_dir"
        ) from None
    skips = sink.skips
    lock = threading.Lock()  # the images are read again, from the decoding threads
    for i in range(len(source)):
        sink.row()
        example = dict(_flatten(source[i]))
        field = next((k for k in _TFDS_CAPTION_FIELDS if k in example), None)
        if field is None:
            skips.skip("no_caption", spec, i)
            continue
        value = example[field]
        raw = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
        texts = [
            v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in raw
        ]
        texts, bad = _utf8_only(texts)
        if bad and not texts:
            skips.skip("non_utf8", spec, i)
            continue
        captions = _clean_all(texts)
        if not captions:
            skips.skip("empty_caption", spec, i)
            continue
        explicit = next((example[k] for k in _TFDS_ID_FIELDS if k in example), None)
        sample_id = str(explicit) if explicit is not None else f"{name}:{split}:{i}"
        filename = example.get(f"{image_key}/filename", example.get("image/filename"))
        if isinstance(filename, bytes):
            filename = filename.decode("utf-8", "replace")
        encoded = bytes(example[image_key])
        image = TfdsImage(source, i, image_key, lock, hashlib.sha1(encoded).digest())
        if sink.add(sample_id, image, captions, filename or f"{spec}:{i}", i):
            skips.drop_captions(spec, i, len(texts) - len(captions), len(texts) + bad, bad)


def split_suffix_of(path: str) -> tuple[str, tuple[str, ...] | None]:
    """`FILE:SPLIT[+SPLIT]` (FILE exists, the whole string does not) -> (FILE, splits); any
    other input -> (path, None)."""
    if path.startswith("tfds:") or os.path.exists(path) or ":" not in path:
        return path, None
    base, _, suffix = path.rpartition(":")
    if not os.path.isfile(base):
        return path, None
    splits = tuple(x for x in suffix.split("+") if x)
    if not splits:
        raise InputError(f"{path}: empty split suffix")
    return base, splits


def split_inputs(path: str) -> list[str]:
    """Several inputs joined by commas (BLIP's list of pre-training files:
    `coco.json,vg.json,cc3m.json`; any formats mixed) -> their paths; one input -> [path].
    Commas inside a brace pattern (`{train,val}.tar`) and in a path that exists do not
    split."""
    if "," not in path or os.path.exists(path):
        return [path]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(path[start:i])
            start = i + 1
    parts = [p.strip() for p in [*parts, path[start:]] if p.strip()]
    return parts if len(parts) > 1 else [path]


def split_roots(image_root: str) -> list[str]:
    """An image root, or several joined by commas (one per input of a comma-joined set, an
    empty entry: that input's own folder) -> the roots; a root that exists is one root."""
    if "," not in image_root or os.path.exists(image_root):
        return [image_root]
    return [r.strip() for r in image_root.split(",")]


def normal_roots(image_root: str) -> str:
    """`image_root` as it names the same folders from any working folder: each root absolute
    ("" stays "")."""
    return ",".join(os.path.abspath(r) if r else "" for r in split_roots(image_root))


def input_roots(inputs: list[str], image_root: str) -> list[str]:
    """The image root of each of `inputs` (`split_inputs`): `image_root` for all, or the k-th of
    several roots joined by commas for the k-th input."""
    roots = split_roots(image_root)
    if len(roots) == 1:
        return roots * len(inputs)
    if len(roots) != len(inputs):
        raise InputError(
            f"the image root {image_root!r} names {len(roots)} roots for {len(inputs)} "
            f"input(s) ({','.join(inputs)}): give one root for all, or one per input in the "
            "same order (an empty entry: that input's own folder; the test set takes "
            "data.test_image_root when it is set)"
        )
    return roots


def _read_one(path: str, image_root: str, sink: _RecordSink, role: str) -> None:
    path, suffix_splits = split_suffix_of(path)
    sink.input = path
    split_suffix = suffix_splits is not None
    splits = suffix_splits if split_suffix else KARPATHY_SPLITS.get(role)
    if path.startswith("tfds:"):
        _read_tfds(path, image_root, sink)
    elif os.path.isdir(path) or is_shard_pattern(path) or is_shard_input(path):
        _read_webdataset(path, sink)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no such input: {path}")
    elif split_suffix or Path(path).suffix.lower() in (".json", ".jsonl"):
        # A suffix is for Karpathy split files: any other file (a TSV too) is an error.
        _read_json(path, image_root, sink, splits, split_suffix)
    elif Path(path).suffix.lower() in (".tsv", ".txt"):
        _read_tsv(path, image_root, sink)
    elif Path(path).suffix.lower() == ".csv":
        _read_tsv(path, image_root, sink, sep=",")
    else:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head[:1] in (b"[", b"{"):
            _read_json(path, image_root, sink, splits)
        else:
            _read_tsv(path, image_root, sink)


def read_records(
    path: str,
    image_root: str,
    skips: Skips,
    max_rows: int = 0,
    role: str = "",
    inputs: list[tuple[str, int]] | None = None,
) -> list[Record]:
    """Reads one input (file, shard directory or pattern, image folder or `tfds:` spec), or
    several joined by commas (`split_inputs`, read in turn as one set), into records, in
    input order.

    Bad rows are counted in `skips` (or raise `BadRowError` when `skips.strict`); at most
    `max_rows` input rows (good or bad) are read when it is positive. `image_root` is one
    root, or one per input joined by commas (`input_roots`). For `tfds:` inputs a non-empty
    root is used as the TFDS data_dir. `role` ("train", "test", "clean") picks the split of a
    Karpathy split file read without a `:split` suffix. `inputs`, when given, gets (input,
    rows read) for each input read; a record's `part` is its input's position.
    """
    sink = _RecordSink(skips, max_rows)
    parts = split_inputs(path)
    try:
        for i, (part, root) in enumerate(zip(parts, input_roots(parts, image_root), strict=True)):
            sink.part, before = i, sink.rows_read
            try:
                _read_one(part, root, sink, role)
            finally:
                # an input max_rows stopped before its first row is not one that was read
                if inputs is not None and (sink.rows_read > before or not sink.limited):
                    inputs.append((part, sink.rows_read - before))
    except _Limit:
        pass
    return sink.records
