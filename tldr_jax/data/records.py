"""One record type for every input format, caption cleaning, and bad-row accounting."""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
from typing import Any

import numpy as np

# Reasons a row is skipped; the keys of every summary's `skipped` block.
SKIP_REASONS = (
    "missing_image",
    "truncated_image",
    "not_an_image",
    "empty_caption",
    "no_caption",
    "malformed_row",
    "non_utf8",
    "unreadable_shard",
    # Multi-process runs keep only the rows every process could read; a row this process
    # read but another could not (a shard unreadable there) is dropped and counted here.
    "unreadable_on_other_process",
)


class InputError(ValueError):
    """An input that cannot be used as given (no usable rows, a broken JSON array, a missing
    split, ...): the message names the file. The CLI prints it in one line and exits 2."""


class BadRowError(InputError):
    """Raised in strict mode: names the file, the row and the reason."""


class LazyImage:
    """Encoded image bytes that stay where they are until the image is decoded (a set of
    millions of samples is not held in memory as encoded bytes). `digest`: SHA-1 of the
    bytes, taken when the input was read (`imagestore.image_identity`)."""

    digest: bytes

    def read(self) -> bytes:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ShardMember(LazyImage):
    """An image file inside an uncompressed webdataset shard."""

    shard: str
    offset: int
    size: int
    digest: bytes

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"{self.shard} ends before the image at byte {self.offset}")
        return data


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsImage(LazyImage):
    """The encoded image of example `index` of a TFDS data source (random access; one lock
    per source, as its readers are not documented as thread-safe)."""

    source: Any
    index: int
    key: str
    lock: threading.Lock
    digest: bytes

    def read(self) -> bytes:
        with self.lock:
            value = self.source[self.index][self.key]
        return bytes(value)


@dataclasses.dataclass(frozen=True)
class Record:
    """One image with its captions.

    sample_id: stable id, unique within a set (never a file-order position).
    image: a path (absolute, already joined with the image root), encoded bytes (TFDS, a
      compressed webdataset shard), a `LazyImage` (an uncompressed webdataset shard's
      `ShardMember`, a `TfdsImage`) or an HxWx3 uint8 array (embedded world).
    captions: cleaned captions (one for pre-training rows, five for Karpathy eval rows).
    image_key: the image field as the input wrote it, so outputs keep the user's paths.
    row: where the input has it (JSON array index, line number, TFDS index, webdataset key;
      "" = not known), and `file` the file that holds it when that is not the input path itself
      (a webdataset shard), so a skip found later (an image that does not decode) names the
      same file and row as the readers' skips.
    """

    sample_id: str
    image: str | bytes | LazyImage | np.ndarray
    captions: tuple[str, ...]
    image_key: str = ""
    row: int | str = ""
    file: str = ""
    # Which of several inputs joined by commas the row came from (0 for a single input).
    part: int = 0

    @property
    def where(self) -> str:
        """The row as skip messages name it: `420`, `420 (id 1420)`, or the id."""
        if self.row == "":
            return self.sample_id
        base = self.sample_id.split("#", 1)[0]
        if base.endswith((f":{self.row}", f"/{self.row}")):
            return str(self.row)
        return f"{self.row} (id {self.sample_id})"


class Skips:
    """Counts skipped rows per reason; in strict mode raises instead of skipping."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.first = ""  # the first skip's message (what strict mode would have raised)
        # Set by the readers: records kept before the row being read; `first_records`: its
        # value at the first skip (the records that come before the first bad row).
        self.records_before = 0
        self.first_records: int | None = None
        # Empty captions dropped from rows that keep others (a Karpathy image with one empty
        # sentence of five): the row is kept, so these are not row skips.
        self.captions_dropped = 0

    def skip(self, reason: str, file: str, row: int | str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        where = f"{file}, row {row}"
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadRowError(msg)
        self.counts[reason] += 1
        self.examples.setdefault(reason, msg)
        if not self.first:
            self.first, self.first_records = msg, self.records_before

    def drop_captions(
        self, file: str, row: int | str, dropped: int, total: int, non_utf8: int = 0
    ) -> None:
        """`dropped` of a kept row's `total` captions were empty after cleaning and
        `non_utf8` were not UTF-8: counted together (in strict mode an error naming the file
        and row)."""
        if not dropped and not non_utf8:
            return
        if non_utf8:
            empty = f", {dropped} empty" if dropped else ""
            why = f"non_utf8 ({non_utf8} of its {total} captions not UTF-8{empty})"
        else:
            why = f"empty_caption ({dropped} of its {total} captions empty)"
        msg = f"{file}, row {row}: {why}"
        if self.strict:
            raise BadRowError(msg)
        self.captions_dropped += dropped + non_utf8
        if not self.first:  # what strict mode stops at, when it reads leniently first
            self.first, self.first_records = msg, self.records_before

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


_STRIP = re.compile(r"[.!\"()*#:;~]")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's pre_caption: lower-case, strip .!"()*#:;~, squeeze spaces, at most max_words.

    Unlike BLIP, every whitespace run (a lone newline or tab of a multi-line CSV field
    included) becomes one space, so a caption is always one line of space-separated words.
    """
    caption = _STRIP.sub(" ", caption.lower())
    caption = re.sub(r"\s+", " ", caption).strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
