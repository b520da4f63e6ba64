"""Readers, image decoding and bad-row accounting, on tiny files written per test."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tldr_jax.config_lib import data_config
from tldr_jax.data import images as images_lib
from tldr_jax.data import readers
from tldr_jax.data.dataset import ImageTextSet, load_set
from tldr_jax.data.readers import read_records
from tldr_jax.data.records import (
    SKIP_REASONS,
    BadRowError,
    InputError,
    Skips,
    clean_caption,
)


def _image(seed: int, shape: tuple[int, int] = (12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _write_images(root: Path, n: int, fmt: str = "PNG") -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img/{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        (root / name).write_bytes(_encode(_image(i), fmt))
        names.append(name)
    return names


def _cfg(**kw):
    return data_config(image_size=8, decode_workers=2, **kw)


def _resized(seed: int, size: int = 8) -> np.ndarray:
    return np.asarray(Image.fromarray(_image(seed)).resize((size, size), Image.BICUBIC))


# --- images -----------------------------------------------------------------------------


def test_decode_image_formats(tmp_path):
    a = _image(0)
    want = _resized(0)
    np.testing.assert_array_equal(images_lib.decode_image(_encode(a), 8), want)
    (tmp_path / "a.png").write_bytes(_encode(a))
    np.testing.assert_array_equal(images_lib.decode_image(tmp_path / "a.png", 8), want)
    np.testing.assert_array_equal(images_lib.decode_image(a, 8), want)
    same = images_lib.decode_image(_image(1, (8, 8)), 8)
    np.testing.assert_array_equal(same, _image(1, (8, 8)))
    jpeg = images_lib.decode_image(_encode(a, "JPEG"), 8)
    assert jpeg.shape == (8, 8, 3) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - want).mean() < 40  # lossy, but the same picture
    grey = Image.fromarray(a[..., 0])
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    out = images_lib.decode_image(buf.getvalue(), 8)
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()


def test_decode_image_errors(tmp_path):
    with pytest.raises(images_lib.MissingImageError):
        images_lib.decode_image(tmp_path / "nope.png", 8)
    with pytest.raises(images_lib.NotAnImageError):
        images_lib.decode_image(b"this is text, not an image", 8)
    for fmt in ("PNG", "JPEG"):
        data = _encode(_image(0, (40, 40)), fmt)
        with pytest.raises(images_lib.TruncatedImageError):
            images_lib.decode_image(data[: len(data) // 2], 8)
    assert images_lib.TruncatedImageError.reason == "truncated_image"
    assert images_lib.MissingImageError.reason == "missing_image"


def test_normalize_roundtrip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    y = images_lib.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0, 1], (1 / 255 - images_lib.MEAN) / images_lib.STD, 1e-6)
    np.testing.assert_array_equal(images_lib.denormalize(y), x)


# --- formats ------------------------------------------------------------------------------


def test_blip_json(tmp_path):
    names = _write_images(tmp_path / "root", 3)
    rows = [{"image": n, "caption": f"A Photo #{i} of: things!"} for i, n in enumerate(names)]
    (tmp_path / "blip.json").write_text(json.dumps(rows))
    skips = Skips()
    recs = read_records(str(tmp_path / "blip.json"), str(tmp_path / "root"), skips)
    assert [r.sample_id for r in recs] == ["blip:0", "blip:1", "blip:2"]
    assert recs[1].captions == ("a photo 1 of things",)
    assert recs[1].image == str(tmp_path / "root" / "img/1.png")
    assert recs[1].image_key == "img/1.png"
    ds = load_set(str(tmp_path / "blip.json"), _cfg(image_root=str(tmp_path / "root")), "train")
    assert len(ds) == 3 and ds.rows_read == 3 and sum(ds.skipped.values()) == 0
    assert set(ds.skipped) == set(SKIP_REASONS)
    np.testing.assert_array_equal(ds.images[2], _resized(2))
    assert ds.captions[0] == ["a photo 0 of things"]
    sub = ds.subset([2, 0])
    assert sub.ids == ["blip:2", "blip:0"] and (sub.images[0] == ds.images[2]).all()


def test_captions_are_cleaned_as_blips_pre_caption():
    words = " ".join(f"W{i}." for i in range(40))
    assert clean_caption(words) == " ".join(f"w{i}" for i in range(30))
    assert clean_caption(" ".join(f"w{i}" for i in range(30))).split() == [
        f"w{i}" for i in range(30)
    ]
    assert clean_caption('A "Dog"!  (on\tthe) #mat; ~x: *y') == "a dog on the mat x y"


def test_image_paths_default_to_annotation_folder(tmp_path):
    names = _write_images(tmp_path, 1)
    (tmp_path / "a.json").write_text(json.dumps([{"image": names[0], "caption": "x"}]))
    recs = read_records(str(tmp_path / "a.json"), "", Skips())
    assert recs[0].image == str(tmp_path / names[0])


def test_karpathy_train_rows_are_pairs(tmp_path):
    names = _write_images(tmp_path, 2)
    rows = [
        {"image": names[0], "caption": "first a", "image_id": "7"},
        {"image": names[0], "caption": "first b", "image_id": "7"},
        {"image": names[1], "caption": "second", "image_id": 9},
    ]
    (tmp_path / "k.json").write_text(json.dumps(rows))
    ds = load_set(str(tmp_path / "k.json"), _cfg(image_root=str(tmp_path)), "train")
    assert ds.ids == ["7", "7#1", "9"]
    assert ds.captions == [["first a"], ["first b"], ["second"]]
    np.testing.assert_array_equal(ds.images[0], ds.images[1])
    np.testing.assert_array_equal(ds.images[2], _resized(1))


def test_karpathy_eval(tmp_path):
    names = _write_images(tmp_path, 2)
    rows = [
        {"image": n, "caption": [f"cap {i} {j}." for j in range(5)]} for i, n in enumerate(names)
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    ds = load_set(str(tmp_path / "test.json"), _cfg(image_root=str(tmp_path)), "test")
    assert ds.ids == ["test:0", "test:1"]
    assert ds.captions[1] == [f"cap 1 {j}" for j in range(5)]
    assert ds.image_keys == names


def _karpathy_split_file(tmp_path: Path) -> list[str]:
    """Karpathy's original `dataset_coco.json` layout: an 'images' list, split per image."""
    names = _write_images(tmp_path / "val2014", 5)
    splits = ["train", "restval", "test", "val", "train"]
    images = []
    for i, (name, split) in enumerate(zip(names, splits, strict=True)):
        sentences = [{"raw": f"Cap {i} {j}.", "tokens": ["cap"]} for j in range(3)]
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "sentences": sentences,
                "imgid": i,
                "cocoid": 1000 + i,
            }
        )
    # Bad rows, all in the train split.
    images.append({"filepath": "val2014", "split": "train", "sentences": [{"raw": "x"}]})
    images.append({"filename": names[0], "split": "train", "sentences": []})
    images.append({"filename": names[0], "split": "train", "sentences": [{"raw": " .. "}]})
    images.append({"filename": "val2014/gone.png", "split": "train", "sentences": [{"raw": "y"}]})
    images.append({"filename": names[1], "sentences": [{"raw": "no split"}]})
    tokens_only = [{"tokens": ["a", "b"]}]
    images.append(
        {"filepath": "val2014", "filename": names[1], "split": "train", "sentences": tokens_only}
    )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return names


def test_karpathy_split_file(tmp_path):
    names = _karpathy_split_file(tmp_path)
    path = str(tmp_path / "dataset_coco.json")
    train = load_set(path, _cfg(), "train")
    # train + restval, one record per image with all its captions; the image paths joined
    # as filepath/filename under the file's folder; ids from cocoid (imgid when it is absent).
    assert train.ids[:3] == ["1000", "1001", "1004"]
    assert train.captions[0] == [f"cap 0 {j}" for j in range(3)]
    assert train.image_keys[:3] == [f"val2014/{names[i]}" for i in (0, 1, 4)]
    np.testing.assert_array_equal(train.images[2], _resized(4))
    assert train.captions[3] == ["a b"]  # a sentence with tokens only
    assert train.ids[3] == "dataset_coco:10"  # neither cocoid nor imgid: file stem + index
    # The other splits' images are not rows of this input; the bad train rows are counted.
    assert train.rows_read == 3 + 6
    assert dict(train.skipped) == {
        "malformed_row": 2,  # no filename; no split
        "no_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
    } | {
        k: 0
        for k in SKIP_REASONS
        if k not in ("malformed_row", "no_caption", "empty_caption", "missing_image")
    }
    test = load_set(path, _cfg(), "test")
    # The row without a split is a bad row of every role that reads the file.
    assert test.ids == ["1002"] and test.rows_read == 2 and test.skipped["malformed_row"] == 1
    val = load_set(path + ":val", _cfg(), "test")  # a suffix names the split(s)
    assert val.ids == ["1003"]
    both = load_set(path + ":val+test", _cfg(), "train")
    assert both.ids == ["1002", "1003"]
    with pytest.raises(BadRowError, match=r"dataset_coco\.json, row 5: malformed_row"):
        load_set(path, _cfg(strict=True), "train")
    with pytest.raises(ValueError, match="say which split"):
        read_records(path, "", Skips())  # no role and no suffix
    (tmp_path / "blip.json").write_text(json.dumps([{"image": names[0], "caption": "a"}]))
    with pytest.raises(ValueError, match="only for Karpathy split files"):
        read_records(str(tmp_path / "blip.json") + ":train", "", Skips())
    (tmp_path / "cc.tsv").write_text(f"a cap\t{names[0]}\n")
    with pytest.raises(ValueError, match="only for Karpathy split files"):
        read_records(str(tmp_path / "cc.tsv") + ":train", "", Skips())


def test_karpathy_other_splits_are_not_rows_and_clean_reads_train_and_restval(tmp_path):
    _karpathy_split_file(tmp_path)
    path = str(tmp_path / "dataset_coco.json")
    # Images of another split are not rows: not counted as read, not under max_rows.
    inputs: list[tuple[str, int]] = []
    recs = read_records(path, "", Skips(), role="train", inputs=inputs)
    assert inputs == [(path, 3 + 6)] and len(recs) == 5  # images not decoded yet
    cut = read_records(path, "", Skips(), max_rows=3, role="train")
    assert [r.sample_id for r in cut] == ["1000", "1001", "1004"]
    # The caption set (role clean) reads Karpathy train + restval, as train does.
    clean = load_set(path, _cfg(), "clean")
    assert clean.ids[:3] == ["1000", "1001", "1004"] and clean.rows_read == 3 + 6


def test_pairs_one_row_per_caption():

    images = np.stack([_image(i, (4, 4)) for i in range(3)])
    ds = ImageTextSet(
        ids=["a", "b", "c"],
        images=images,
        captions=[["a0"], ["b0", "b1", "b2"], ["c0", "c1"]],
        image_keys=["a.png", "b.png", "c.png"],
        rows_read=4,
        skipped={"missing_image": 1},
        source="x",
    )
    pairs, record = ds.pairs()
    assert pairs.ids == ["a", "b/c0", "b/c1", "b/c2", "c/c0", "c/c1"]
    assert pairs.captions == [["a0"], ["b0"], ["b1"], ["b2"], ["c0"], ["c1"]]
    np.testing.assert_array_equal(record, [0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(pairs.images, images[record])
    assert pairs.image_keys == ["a.png", "b.png", "b.png", "b.png", "c.png", "c.png"]
    assert (pairs.rows_read, pairs.skipped, pairs.source) == (4, {"missing_image": 1}, "x")
    single = ds.subset([0])
    assert single.pairs()[0] is single  # one caption per row: the set itself


def test_json_lines_fallback(tmp_path):
    names = _write_images(tmp_path, 2)
    lines = [
        json.dumps({"image": names[0], "caption": "one"}),
        '{"image": "broken',
        "",
        json.dumps({"image": names[1], "caption": "two", "id": "b"}),
    ]
    (tmp_path / "rows.json").write_text("\n".join(lines))
    skips = Skips()
    recs = read_records(str(tmp_path / "rows.json"), "", skips)
    assert [r.sample_id for r in recs] == ["rows:1", "b"]
    assert skips.as_dict() == {"malformed_row": 1}
    with pytest.raises(BadRowError, match=r"rows\.json, row 2: malformed_row"):
        read_records(str(tmp_path / "rows.json"), "", Skips(strict=True))


def test_tsv_with_and_without_header(tmp_path):
    names = _write_images(tmp_path, 2)
    body = f"A Cat!\t{names[0]}\nA dog\t{names[1]}\n"
    (tmp_path / "cc.tsv").write_text("caption\turl\n" + body)
    (tmp_path / "plain.tsv").write_text(body)
    a = read_records(str(tmp_path / "cc.tsv"), str(tmp_path), Skips())
    b = read_records(str(tmp_path / "plain.tsv"), str(tmp_path), Skips())
    assert [r.captions for r in a] == [("a cat",), ("a dog",)] == [r.captions for r in b]
    assert [r.sample_id for r in a] == ["cc:2", "cc:3"]
    assert [r.sample_id for r in b] == ["plain:1", "plain:2"]
    ds = load_set(str(tmp_path / "cc.tsv"), _cfg(image_root=str(tmp_path)), "train")
    np.testing.assert_array_equal(ds.images[1], _resized(1))
    # a header naming the columns picks them, in any order, among others
    rows = f"id\tfilepath\tsplit\ttitle\n7\t{names[1]}\ttrain\tA dog\n8\t{names[0]}\ttrain\n"
    (tmp_path / "cols.tsv").write_text(rows)
    skips = Skips()
    c = read_records(str(tmp_path / "cols.tsv"), str(tmp_path), skips)
    assert [(r.captions, r.image_key) for r in c] == [(("a dog",), names[1])]
    assert skips.as_dict() == {"malformed_row": 1}
    assert "expected the header's columns" in skips.first
    # CSV: the same rules, quoted fields (open_clip's `filepath,title` files)
    rows = f'filepath,title\n{names[0]},"A cat, asleep"\n{names[1]},A dog\n'
    (tmp_path / "oc.csv").write_text(rows)
    (tmp_path / "plain.csv").write_text(f"A dog,{names[1]}\nno image here\n")
    d = read_records(str(tmp_path / "oc.csv"), str(tmp_path), Skips())
    assert [(r.captions, r.image_key) for r in d] == [
        (("a cat, asleep",), names[0]),
        (("a dog",), names[1]),
    ]
    skips = Skips()
    e = read_records(str(tmp_path / "plain.csv"), str(tmp_path), skips)
    assert [(r.captions, r.image_key) for r in e] == [(("a dog",), names[1])]
    assert "expected caption,image_path" in skips.first


def _rows(path, sep):
    """(first line, last line, fields) of each row of a TSV / CSV file, as the reader splits it."""
    return [(a, b, fields) for a, b, _, fields in readers._tsv_rows(str(path), sep)]


def test_quoted_fields_hold_line_breaks_separators_and_quotes(tmp_path):
    """csv.writer / pandas quote a field holding the separator, a quote or a line break
    (RFC 4180, what open_clip's pandas reads): such a row is one row over several lines."""
    names = _write_images(tmp_path, 2)
    caption = 'a "blue"\tsquare\nwith newline, with comma'
    with open(tmp_path / "oc.csv", "w", newline="") as f:  # \r\n line ends, as csv writes them
        w = csv.writer(f)
        w.writerows([["filepath", "title"], [names[0], caption], [names[1], "a dog"]])
    with open(tmp_path / "cc.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerows([[caption, names[0]], ['a "dog"', names[1]]])
    assert _rows(tmp_path / "oc.csv", ",") == [
        (1, 1, ["filepath", "title"]),
        (2, 3, [names[0], caption]),
        (4, 4, [names[1], "a dog"]),
    ]
    assert _rows(tmp_path / "cc.tsv", "\t") == [
        (1, 2, [caption, names[0]]),
        (3, 3, ['a "dog"', names[1]]),
    ]
    want = ("a blue square with newline, with comma",)  # clean_caption: whitespace -> " "
    for name, ids in (("oc.csv", ["oc:2", "oc:4"]), ("cc.tsv", ["cc:1", "cc:3"])):
        skips = Skips()
        recs = read_records(str(tmp_path / name), str(tmp_path), skips)
        assert [r.captions for r in recs] == [want, ("a dog",)], name
        assert [r.image_key for r in recs] == names and [r.sample_id for r in recs] == ids
        assert skips.total == 0
        ds = load_set(str(tmp_path / name), _cfg(image_root=str(tmp_path), strict=True), "train")
        assert ds.rows_read == 2 and len(ds) == 2, name
    # Doubled quotes: `""` is one quote and does not close the field, even before a separator
    # or at a line's end; a quoted image path is the path.
    (tmp_path / "q.csv").write_text(
        f'{names[0]},"say ""cheese"",\n""now"""\n"{names[1]}","x ""\n"" y"\n'
    )
    assert _rows(tmp_path / "q.csv", ",") == [
        (1, 2, [names[0], 'say "cheese",\n"now"']),
        (3, 4, [names[1], 'x "\n" y']),
    ]
    (tmp_path / "q.tsv").write_text(f'"say ""cheese""\t\n""now"""\t"{names[0]}"\n')
    assert _rows(tmp_path / "q.tsv", "\t") == [(1, 2, ['say "cheese"\t\n"now"', names[0]])]
    recs = read_records(str(tmp_path / "q.tsv"), str(tmp_path), Skips())
    assert [(r.captions, r.image_key) for r in recs] == [(("say cheese now",), names[0])]


def test_multi_line_rows_in_strict_mode_and_bad_rows(tmp_path):
    """A row's number is the line it starts on; a bad row over several lines says which."""
    names = _write_images(tmp_path, 1)
    text = (
        "filepath,title\n"
        f'{names[0]},"two\nlines"\n'  # lines 2-3
        f"{names[0]},good\n"  # line 4
        "\n"
        f'{names[0]},"three\n\nlines"\n'  # lines 6-8: a blank line inside the field
        "no image here\n"  # line 9
        f'{names[0]},"...\n!"\n'  # lines 10-11: empty once cleaned
    )
    (tmp_path / "s.csv").write_text(text)
    skips = Skips()
    recs = read_records(str(tmp_path / "s.csv"), str(tmp_path), skips)
    assert [r.sample_id for r in recs] == ["s:2", "s:4", "s:6"]
    assert [r.captions for r in recs] == [("two lines",), ("good",), ("three lines",)]
    assert skips.as_dict() == {"malformed_row": 1, "empty_caption": 1}
    assert skips.examples["malformed_row"].endswith(
        "s.csv, row 9: malformed_row (expected the header's columns)"
    )
    assert "row 10: empty_caption (the row is lines 10-11)" in skips.examples["empty_caption"]
    with pytest.raises(BadRowError, match=r"s\.csv, row 9: malformed_row"):
        load_set(str(tmp_path / "s.csv"), _cfg(image_root=str(tmp_path), strict=True), "train")
    # an image that is not there, found when decoding: named by its row's first line
    (tmp_path / "m.csv").write_text(text.split("no image")[0] + 'nowhere.png,"a\nb"\n')
    with pytest.raises(BadRowError, match=r"m\.csv, row 9: missing_image"):
        load_set(str(tmp_path / "m.csv"), _cfg(image_root=str(tmp_path), strict=True), "train")
    # Non-UTF-8 bytes in a row over several lines: one non_utf8 row, at its first line.
    raw = f'"caf\xe9\nau lait",{names[0]}\nok,{names[0]}\n'.encode("latin-1")
    (tmp_path / "u.csv").write_bytes(raw)
    skips = Skips()
    assert [r.sample_id for r in read_records(str(tmp_path / "u.csv"), str(tmp_path), skips)] == [
        "u:3"
    ]
    assert (
        skips.as_dict() == {"non_utf8": 1}
        and "u.csv, row 1: non_utf8 (the row is lines 1-2)" in skips.first
    )


def test_quotes_in_unquoted_fields_read_as_before(tmp_path):
    """A TSV field that is not quoted the way csv.writer quotes is the text up to the next
    tab, quotes and all (CC3M captions hold quotes), as `line.split("\t")` always read it;
    a CSV line keeps the csv module's reading of it (a quote inside a field is text, an
    unclosed one ends with the line) unless its quoted field closes on a later line."""
    names = _write_images(tmp_path, 2)
    lines = [
        f'"Best day ever\t{names[0]}',  # a quote never closed
        f'he said "wow" loudly\t{names[1]}',
        f'"quoted" start\t{names[0]}',  # closes, but not before a tab: text
        f'a 12" pizza\t{names[1]}',
        f'""\t"{names[0]}',  # an empty quoted caption; an unclosed quote in the path
        f'a "b"\t{names[1]}',  # a quote not right before a tab closes nothing
    ]
    (tmp_path / "q.tsv").write_text("\n".join(lines) + "\n")
    want = [line.split("\t") for line in lines]
    want[4][0] = ""
    assert _rows(tmp_path / "q.tsv", "\t") == [(i, i, w) for i, w in enumerate(want, start=1)]
    # a quote that no later line closes, with more lines after it than a row may run over
    body = "".join(f"cap {i}\t{names[i % 2]}\n" for i in range(readers._MAX_ROW_LINES + 5))
    (tmp_path / "long.tsv").write_text(f'"open\t{names[0]}\n' + body)
    skips = Skips()
    recs = read_records(str(tmp_path / "long.tsv"), str(tmp_path), skips)
    assert len(recs) == readers._MAX_ROW_LINES + 6 and skips.total == 0
    assert recs[0].captions == ("open",) and recs[0].image_key == f"{names[0]}"
    csv_lines = [
        f'{names[0]},a "quoted" word',
        f'{names[1]},"Best day',  # closed on line 5, but not before a comma: not a field
        f"{names[0]},a cat",
        "",
        f'{names[1]},"ok" yes',
        f'{names[0]},"never closed',
    ]
    (tmp_path / "q.csv").write_text("\n".join(csv_lines) + "\n")
    old = [(i, i, next(csv.reader([line]))) for i, line in enumerate(csv_lines, start=1) if line]
    assert _rows(tmp_path / "q.csv", ",") == old
    # a carriage return inside an unquoted CSV field: a bad row, not a crash
    (tmp_path / "cr.csv").write_bytes(f"a\rb,{names[0]}\nok,{names[1]}\n".encode())
    skips = Skips()
    assert len(read_records(str(tmp_path / "cr.csv"), str(tmp_path), skips)) == 1
    assert (
        skips.as_dict() == {"malformed_row": 1}
        and "row 1: malformed_row (not a CSV row" in skips.first
    )


def test_headerless_rows_are_two_columns(tmp_path):
    """Without a header a row is `caption<TAB>image_path`: a third column is a bad row, not
    a caption with the second column taken for the image."""
    names = _write_images(tmp_path, 1)
    (tmp_path / "t.tsv").write_text(f"a\tb\tc\ngood\t{names[0]}\t\nx\t{names[0]}\ty\n")
    skips = Skips()
    recs = read_records(str(tmp_path / "t.tsv"), str(tmp_path), skips)
    assert [(r.sample_id, r.image_key) for r in recs] == [("t:2", names[0])]  # a trailing tab
    assert skips.as_dict() == {"malformed_row": 2}
    assert "row 1: malformed_row (expected caption<TAB>image_path, not 3 columns" in skips.first
    (tmp_path / "t.csv").write_text(f"a photo, with a comma,{names[0]}\n")
    skips = Skips()
    assert read_records(str(tmp_path / "t.csv"), str(tmp_path), skips) == []
    assert "expected caption,image_path, not 3 columns" in skips.first


def test_url_images_are_named_as_urls_and_file_urls_are_paths(tmp_path):
    """CC3M's own TSV holds URLs: say so (nothing is downloaded), not 'no such file'."""
    names = _write_images(tmp_path, 2)
    lines = [
        "a cat\thttps://example.com/cat.jpg",
        f"a dog\tfile://{tmp_path / names[0]}",
        f"a cow\t{names[1]}",
    ]
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")
    rows = [{"image": "http://x/y.png", "caption": "a"}, {"image": names[1], "caption": "b"}]
    (tmp_path / "blip.json").write_text(json.dumps(rows))
    skips = Skips()
    ds = load_set(str(tmp_path / "cc.tsv"), _cfg(), "train")
    assert ds.captions == [["a dog"], ["a cow"]] and ds.skipped["missing_image"] == 1
    np.testing.assert_array_equal(ds.images[0], _resized(0))
    recs = read_records(str(tmp_path / "blip.json"), "", skips)
    assert [r.captions for r in recs] == [("b",)] and skips.as_dict() == {"missing_image": 1}
    assert "row 0: missing_image (the image is a URL" in skips.first
    with pytest.raises(BadRowError, match=r"cc\.tsv, row 1: missing_image \(the image is a URL"):
        load_set(str(tmp_path / "cc.tsv"), _cfg(strict=True), "train")
    (tmp_path / "urls.tsv").write_text(lines[0] + "\n")
    with pytest.raises(InputError, match="no usable rows.*never downloaded"):
        load_set(str(tmp_path / "urls.tsv"), _cfg(), "train")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    meta = json.dumps({"url": "http://x", "key": "k"}).encode()
    # Written out of name order: shards must still be read sorted by name.
    _write_shard(shards / "00001.tar", {"000010000": {"jpg": _encode(_image(2)), "txt": b"C"}})
    _write_shard(
        shards / "00000.tar",
        {
            "000000000": {"jpg": _encode(_image(0)), "txt": b"A cat.", "json": meta},
            "000000001": {"png": _encode(_image(1)), "json": b'{"caption": "from json"}'},
        },
    )
    (shards / "00000.parquet").write_bytes(b"ignored")
    recs = read_records(str(shards), "", Skips())
    assert [r.sample_id for r in recs] == ["00000/000000000", "00000/000000001", "00001/000010000"]
    assert [r.captions for r in recs] == [("a cat",), ("from json",), ("c",)]
    assert recs[1].image_key == "00000.tar/000000001.png"
    ds = load_set(str(shards), _cfg(), "train")
    np.testing.assert_array_equal(ds.images[1], _resized(1))


def test_max_rows(tmp_path):
    names = _write_images(tmp_path, 3)
    rows = [{"image": n, "caption": "x"} for n in names]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = load_set(str(tmp_path / "a.json"), _cfg(max_rows=2), "train")
    assert ds.ids == ["a:0", "a:1"] and ds.rows_read == 2


# --- bad rows -------------------------------------------------------------------------------


def _bad_json(tmp_path: Path, bad_row: object) -> Path:
    names = _write_images(tmp_path, 1)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": names[0], "caption": "good"}, bad_row]))
    return path


def _bad_file(tmp_path: Path, reason: str) -> tuple[Path, str]:
    """A file with one good row and one bad row of `reason`; and what the strict error
    must name (the row)."""
    if reason in ("missing_image", "truncated_image", "not_an_image"):
        data = {
            "missing_image": None,
            "truncated_image": _encode(_image(5, (40, 40)))[:300],
            "not_an_image": b"plain text",
        }[reason]
        if data is not None:
            (tmp_path / "x.png").write_bytes(data)
        return _bad_json(tmp_path, {"image": "x.png", "caption": "bad"}), "bad.json, row 1:"
    if reason == "empty_caption":
        return _bad_json(tmp_path, {"image": "img/0.png", "caption": " ...!"}), "row 1"
    if reason == "no_caption":
        return _bad_json(tmp_path, {"image": "img/0.png"}), "row 1"
    if reason == "malformed_row":
        return _bad_json(tmp_path, ["not", "an", "object"]), "row 1"
    if reason == "non_utf8":
        names = _write_images(tmp_path, 1)
        path = tmp_path / "bad.tsv"
        path.write_bytes(f"good\t{names[0]}\n".encode() + b"caf\xe9\timg/0.png\n")
        return path, "row 2"
    assert reason == "unreadable_shard"
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", {"0": {"png": _encode(_image(0)), "txt": b"good"}})
    (shards / "00001.tar").write_bytes(b"\x00garbage" * 100)
    return shards, "00001.tar"


# Reasons a single process can meet (unreadable_on_other_process needs several processes:
# tested through agree_on_rows below and in test_multihost.py).
ONE_PROCESS_REASONS = tuple(r for r in SKIP_REASONS if r != "unreadable_on_other_process")


@pytest.mark.parametrize("reason", ONE_PROCESS_REASONS)
def test_bad_rows_counted(tmp_path, reason):
    path, _ = _bad_file(tmp_path, reason)
    ds = load_set(str(path), _cfg(image_root=str(tmp_path)), "train")
    assert len(ds) == 1 and ds.captions == [["good"]]
    assert ds.skipped == {r: int(r == reason) for r in SKIP_REASONS}
    assert ds.rows_read == 2


@pytest.mark.parametrize("reason", ONE_PROCESS_REASONS)
def test_bad_rows_strict(tmp_path, reason):
    path, where = _bad_file(tmp_path, reason)
    with pytest.raises(BadRowError) as err:
        load_set(str(path), _cfg(image_root=str(tmp_path), strict=True), "train")
    msg = str(err.value)
    assert path.name in msg and where in msg and reason in msg, msg


def test_more_malformed_rows(tmp_path):
    names = _write_images(tmp_path, 1)
    rows = [
        {"image": names[0], "caption": "good"},
        {"caption": "no image"},
        {"image": names[0], "caption": 5},
        {"image": names[0], "caption": ["ok", 3]},
        {"image": names[0], "caption": None},
        {"image": names[0], "caption": ["", "..."]},
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.tsv").write_text(f"good\t{names[0]}\nno tab here\n\t{names[0]}\n")
    skips = Skips()
    assert len(read_records(str(tmp_path / "m.json"), str(tmp_path), skips)) == 1
    assert skips.as_dict() == {"malformed_row": 3, "no_caption": 1, "empty_caption": 1}
    skips = Skips()
    assert len(read_records(str(tmp_path / "m.tsv"), str(tmp_path), skips)) == 1
    assert skips.as_dict() == {"malformed_row": 1, "empty_caption": 1}
    # Non-UTF-8 bytes inside a JSON list are caught per row, the rest of the file is read.
    raw = json.dumps([{"image": names[0], "caption": "XX"}, {"image": names[0], "caption": "b"}])
    (tmp_path / "u.json").write_bytes(raw.encode().replace(b"XX", b"\xff\xfe"))
    skips = Skips()
    assert [r.captions for r in read_records(str(tmp_path / "u.json"), "", skips)] == [("b",)]
    assert skips.as_dict() == {"non_utf8": 1}


def test_tfds_source(tmp_path, monkeypatch):
    """A TFDS dataset prepared locally as array_record (no TensorFlow, no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    # TFDS leaves an empty tmp*tfds folder for a builder made before its data is prepared
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "image/id": np.int64,
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                captions = {"text": [f"Caption {i} A.", f"caption {i} b"]}
                image = io.BytesIO(_encode(_image(i)))
                yield i, {"image": image, "image/id": 100 + i, "captions": captions}
            # one caption that is not UTF-8 is dropped (counted); with none left, the record
            for i, texts in [(3, [b"caption 3 a", b"\xff bad"]), (4, [b"\xfe"])]:
                image = io.BytesIO(_encode(_image(i)))
                yield i, {"image": image, "image/id": 100 + i, "captions": {"text": texts}}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _cfg(image_root=str(tmp_path))
    ds = load_set("tfds:tiny_captions:train", cfg, "train")
    # the images stay in the source until decoded (a COCO-size source is ~19 GB of JPEGs)
    from tldr_jax.data.records import TfdsImage

    recs = read_records("tfds:tiny_captions:train", str(tmp_path), Skips())
    assert all(isinstance(r.image, TfdsImage) for r in recs)
    default = read_records("tfds:tiny_captions", str(tmp_path), Skips())  # the train split
    assert [r.sample_id for r in default] == [r.sample_id for r in recs]
    assert recs[0].image.read() == _encode(_image(int(recs[0].sample_id) - 100))
    assert sorted(ds.ids) == ["100", "101", "102", "103"]
    assert ds.skipped["non_utf8"] == 1 and ds.captions_dropped == 1
    for sid, caps, image in zip(ds.ids, ds.captions, ds.images, strict=True):
        i = int(sid) - 100
        assert caps == ([f"caption {i} a", f"caption {i} b"] if i < 3 else ["caption 3 a"])
        np.testing.assert_array_equal(image, _resized(i))
    ds = ds.subset([ds.ids.index(f"{100 + i}") for i in range(3)])

    # TL;DR's stages take it as (image, caption) pairs, and `write` finds every pair's image.
    import ml_collections

    from tldr_jax.compress.write import materialise_encoded_images

    pairs, record = ds.pairs()
    assert sorted(pairs.ids) == [f"{100 + i}/c{k}" for i in range(3) for k in range(2)]
    config = ml_collections.ConfigDict({"data": {"train": "tfds:tiny_captions:train"}})
    config.data.image_root = str(tmp_path)
    paths = materialise_encoded_images(config, pairs.ids[:3], tmp_path / "out")
    assert sorted(paths) == sorted(pairs.ids[:3])
    for sid in pairs.ids[:3]:
        image = images_lib.decode_image(tmp_path / "out" / paths[sid], 8)
        np.testing.assert_array_equal(image, pairs.images[pairs.ids.index(sid)])


def _gathered(per_process: list[list[str]], skipped: list[int], rows_read: list[int]):
    """What `load_set` gathers from every process: padded id hashes and (kept, read, skipped)."""
    from tldr_jax.data.dataset import PAD, id_hashes

    width = max(1, *map(len, per_process))
    hashes = np.full((len(per_process), width), PAD, np.int64)
    for j, ids in enumerate(per_process):
        hashes[j, : len(ids)] = id_hashes(ids)
    meta = np.array(
        [[len(ids), r, k] for ids, r, k in zip(per_process, rows_read, skipped, strict=True)]
    )
    return hashes, meta


def test_id_hashes_are_stable_63_bit():
    import hashlib

    from tldr_jax.data.dataset import id_hashes

    h = id_hashes(["00000/000000000", "00000/000000001", "caf\udce9"])
    assert h.dtype == np.int64 and (h >= 0).all() and len(set(h.tolist())) == 3
    # blake2b, not Python's per-process salted hash(): the same in every process and run.
    digest = hashlib.blake2b(b"00000/000000000", digest_size=8).digest()
    assert h[0] == int.from_bytes(digest, "little") >> 1


def test_processes_keep_the_rows_every_process_read():
    from tldr_jax.data.dataset import agree_on_rows

    ids = [f"00000/{i}" for i in range(4)] + [f"00001/{i}" for i in range(3)]
    # Process 1 found shard 00001 unreadable: 4 rows kept, 1 skipped (the shard), 5 read.
    hashes, meta = _gathered([ids, ids[:4]], skipped=[0, 1], rows_read=[7, 5])
    a0 = agree_on_rows(ids, hashes, meta, 0, "shards")
    assert a0.keep.tolist() == [True] * 4 + [False] * 3
    assert a0.missing_on == {4: (1,), 5: (1,), 6: (1,)} and a0.rows_read == 7
    a1 = agree_on_rows(ids[:4], hashes, meta, 1, "shards")
    assert a1.keep.tolist() == [True] * 4 and a1.missing_on == {} and a1.rows_read == 7
    # Three processes, each missing different rows: only rows all three read survive.
    p2 = [ids[0], ids[2], ids[3], ids[4]]
    hashes, meta = _gathered([ids, ids[:4], p2], skipped=[0, 1, 3], rows_read=[7, 5, 7])
    a = agree_on_rows(p2, hashes, meta, 2, "x")
    assert a.keep.tolist() == [True, True, True, False] and a.missing_on == {3: (1,)}
    a = agree_on_rows(ids, hashes, meta, 0, "x")
    assert np.flatnonzero(a.keep).tolist() == [0, 2, 3]
    assert a.missing_on == {1: (2,), 4: (1,), 5: (1, 2), 6: (1, 2)}
    # Everyone agrees: everything kept, nothing dropped, even in strict mode.
    hashes, meta = _gathered([ids, ids], skipped=[0, 0], rows_read=[7, 7])
    a = agree_on_rows(ids, hashes, meta, 1, "x", strict=True)
    assert a.keep.all() and a.missing_on == {} and a.rows_read == 7
    # Nobody kept anything (zero-size rows padded to width 1).
    hashes, meta = _gathered([[], []], skipped=[2, 2], rows_read=[2, 2])
    assert agree_on_rows([], hashes, meta, 0, "x").keep.tolist() == []


def test_process_disagreement_in_strict_mode_stops_every_process():
    from tldr_jax.data.dataset import agree_on_rows

    ids = ["00000/0", "00000/1", "00001/7", "00001/8"]
    keys = ["00000.tar/0.jpg", "00000.tar/1.jpg", "00001.tar/7.jpg", "00001.tar/8.jpg"]
    hashes, meta = _gathered([ids, ids[:2]], skipped=[0, 1], rows_read=[4, 3])
    # Process 0 read every row: it names the first row process 1 could not read, and its file.
    with pytest.raises(BadRowError) as err:
        agree_on_rows(ids, hashes, meta, 0, "shards", strict=True, image_keys=keys)
    msg = str(err.value)
    assert msg.startswith("shards, row 00001/7: unreadable_on_other_process"), msg
    assert "00001.tar/7.jpg" in msg and "process 1 could not read it" in msg
    # Process 1 raises its own first bad row (what 1-process strict mode raises).
    own = "shards/00001.tar, row -: unreadable_shard (unexpected end of data)"
    with pytest.raises(BadRowError, match="^shards/00001.tar, row -: unreadable_shard"):
        agree_on_rows(ids[:2], hashes, meta, 1, "shards", strict=True, first_skip=own)
    # A process that neither skipped nor holds extra rows still stops, naming the others.
    hashes, meta = _gathered([ids[:2], ids[:2], ids], skipped=[1, 0, 0], rows_read=[3, 2, 4])
    with pytest.raises(BadRowError, match="^shards: process 0, 2 skipped rows"):
        agree_on_rows(ids[:2], hashes, meta, 1, "shards", strict=True)
    # Non-strict, the same data is kept consistently instead.
    assert agree_on_rows(ids[:2], hashes, meta, 1, "shards").keep.all()


def test_processes_reading_shared_rows_in_different_orders_is_an_error():
    from tldr_jax.data.dataset import agree_on_rows

    ids = ["a", "b", "c"]
    hashes, meta = _gathered([ids, ids[::-1]], skipped=[0, 0], rows_read=[3, 3])
    with pytest.raises(RuntimeError, match="different orders"):
        agree_on_rows(ids, hashes, meta, 0, "x")


# --- awkward but valid inputs, and inputs that cannot be read -------------------------------


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "float.tif")
    want = np.asarray(
        Image.fromarray((ramp / 257).round().astype(np.uint8)).resize((8, 8), Image.BICUBIC)
    )
    for name in ("deep.png", "float.tif"):
        got = images_lib.decode_image(str(tmp_path / name), 8)
        assert got.std() > 30, name  # clipping made these solid white
        np.testing.assert_allclose(got[..., 0], want, atol=2)


def test_thirty_two_bit_images_within_eight_bits_are_kept_not_darkened(tmp_path):
    # Mode "I" holding 0..255 is already 8-bit data: only values past 255 are scaled down.
    ramp = np.tile(np.arange(256, dtype=np.int32), (4, 1))
    for top, scale in ((255, 1.0), (256, 257.0)):
        Image.fromarray(np.minimum(ramp + (top - 255), top)).save(tmp_path / "int.tif")
        got = images_lib.decode_image(str(tmp_path / "int.tif"), 8)
        want = np.asarray(
            Image.fromarray(
                np.rint(np.minimum(ramp + (top - 255), top) / scale).astype(np.uint8)
            ).resize((8, 8), Image.BICUBIC)
        )
        np.testing.assert_allclose(got[..., 0], want, atol=1, err_msg=str(top))


def test_byte_order_marks_are_ignored(tmp_path):
    names = _write_images(tmp_path, 2)
    rows = [{"image": n, "caption": f"pic {i}"} for i, n in enumerate(names)]
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode())
    tsv = "caption\turl\n" + "".join(f"pic {i}\t{n}\n" for i, n in enumerate(names))
    (tmp_path / "a.tsv").write_bytes(b"\xef\xbb\xbf" + tsv.encode())
    for name in ("a.json", "a.tsv"):
        ds = load_set(str(tmp_path / name), _cfg(), "train")
        assert ds.captions == [["pic 0"], ["pic 1"]] and ds.rows_read == 2, name
        assert sum(ds.skipped.values()) == 0, name


def test_broken_json_array_says_where(tmp_path):
    names = _write_images(tmp_path, 2)
    text = json.dumps([{"image": n, "caption": "x"} for n in names], indent=2)
    (tmp_path / "a.json").write_text(text.replace("}\n]", "},\n]"))  # a trailing comma
    for strict in (False, True):
        with pytest.raises(
            ValueError, match=r"a.json: not valid JSON at line 10, column 1: Expect"
        ):
            load_set(str(tmp_path / "a.json"), _cfg(strict=strict), "train")


def test_missing_split_and_empty_sets_are_clear_errors(tmp_path):
    names = _write_images(tmp_path, 1)
    split_file = {"images": [{"filename": names[0], "split": "test", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "dataset_x.json").write_text(json.dumps(split_file))
    with pytest.raises(ValueError, match="no images of split bogus .splits in the file: test"):
        load_set(str(tmp_path / "dataset_x.json:bogus"), _cfg(), "train")
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "gone.png", "caption": "x"}]))
    with pytest.raises(
        ValueError, match=r"no usable rows for test \(1 read; skipped .*missing_image"
    ):
        load_set(str(tmp_path / "bad.json"), _cfg(), "test")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no usable rows for train .0 read; it is empty"):
        load_set(str(tmp_path / "empty.json"), _cfg(), "train")


def test_pair_ids_that_collide_are_an_error():
    ds = ImageTextSet(
        ids=["a", "a/c0"],
        images=np.zeros((2, 4, 4, 3), np.uint8),
        captions=[["x", "y"], ["z"]],
        image_keys=["1.png", "2.png"],
        rows_read=2,
        skipped={},
        source="rows.json",
    )
    with pytest.raises(ValueError, match="rows.json: the pair id 'a/c0' is given twice"):
        ds.pairs()


def test_shard_cut_short_keeps_the_samples_before_the_cut_and_gz_shards_read(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = {str(k): {"png": _encode(_image(k)), "txt": f"cap {k}".encode()} for k in range(4)}
    _write_shard(shards / "00000.tar", samples)
    with tarfile.open(shards / "00000.tar") as tar:
        cut = tar.getmember("3.png").offset_data + 100  # inside sample 3's image
    data = (shards / "00000.tar").read_bytes()
    (shards / "00000.tar").write_bytes(data[:cut])
    with tarfile.open(shards / "00001.tar.gz", "w:gz") as tar:
        _add(tar, "9.png", _encode(_image(9)))
        _add(tar, "9.txt", b"gz cap")
    ds = load_set(str(shards), _cfg(), "train")
    assert ds.ids == ["00000/0", "00000/1", "00000/2", "00001/9"]
    assert ds.captions[-1] == ["gz cap"] and ds.rows_read == 5
    assert ds.skipped == {r: int(r == "unreadable_shard") for r in SKIP_REASONS}
    np.testing.assert_array_equal(ds.images[3], _resized(9))


@pytest.mark.parametrize(
    "where", ["block_boundary", "inside_header", "no_end_blocks", "garbage_header"]
)
@pytest.mark.parametrize("gz", [False, True])
def test_shard_cut_between_members_is_counted_and_strict_stops(tmp_path, where, gz):
    """Python's tarfile ends without an error where a shard is cut at a 512-byte block
    boundary or inside a member's header: such a shard lost rows silently."""
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = {str(k): {"png": _encode(_image(k)), "txt": f"cap {k}".encode()} for k in range(4)}
    _write_shard(tmp_path / "whole.tar", samples)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    data = (tmp_path / "whole.tar").read_bytes()
    end = members["3.txt"].offset_data + 512  # the last member's data, padded to a block
    cut = {
        "block_boundary": members["3.png"].offset,  # samples 0-2 whole, nothing of 3
        "inside_header": members["3.png"].offset + 100,
        "no_end_blocks": end,  # every member, but no end-of-archive blocks
        "garbage_header": len(data),
    }[where]
    name = "00000.tar.gz" if gz else "00000.tar"
    bad = data[:cut]
    if where == "garbage_header":  # sample 3's header block overwritten, the rest intact
        at = members["3.png"].offset
        bad = data[:at] + bytes(range(1, 256)) * 2 + b"xy" + data[at + 512 :]
    (shards / name).write_bytes(gzip.compress(bad) if gz else bad)
    ds = load_set(str(shards), _cfg(), "train")
    # The last sample before a cut may have lost files to it: dropped with the shard counted.
    kept = 3 if where == "no_end_blocks" else 2
    assert ds.ids == [f"00000/{k}" for k in range(kept)]
    assert ds.skipped == {r: int(r == "unreadable_shard") for r in SKIP_REASONS}
    what = "a broken header" if where == "garbage_header" else "cut short"
    with pytest.raises(BadRowError, match=rf"{name}, row -: unreadable_shard \({what}"):
        load_set(str(shards), _cfg(strict=True), "train")
    (shards / name).write_bytes(gzip.compress(data) if gz else data)  # the whole shard
    whole = load_set(str(shards), _cfg(strict=True), "train")
    assert whole.ids == [f"00000/{k}" for k in range(4)]


def test_shard_key_met_again_is_another_sample_and_a_repeated_file_is_malformed(tmp_path):
    """webdataset groups consecutive files by key: a key met again later is a new sample
    (it used to be merged into the first, one image paired with the other's caption), and
    two files of one extension in one sample are a malformed row."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in [
            ("a.png", _encode(_image(0))),
            ("a.txt", b"first a"),
            ("b.png", _encode(_image(1))),
            ("b.txt", b"b"),
            ("a.png", _encode(_image(2))),
            ("a.txt", b"second a"),
            ("c.png", _encode(_image(3))),
            ("c.txt", b"c one"),
            ("c.txt", b"c two"),
        ]:
            _add(tar, name, data)
    ds = load_set(str(shards), _cfg(), "train")
    assert ds.ids == ["00000/a", "00000/b", "00000/a#1"]
    assert ds.captions == [["first a"], ["b"], ["second a"]]
    np.testing.assert_array_equal(ds.images[2], _resized(2))
    assert ds.rows_read == 4
    assert ds.skipped == {r: int(r == "malformed_row") for r in SKIP_REASONS}
    with pytest.raises(BadRowError, match=r"00000.tar, row c: malformed_row \(two .txt files"):
        load_set(str(shards), _cfg(strict=True), "train")


def test_an_empty_caption_among_a_rows_captions_is_counted_and_strict_stops(tmp_path):
    _write_images(tmp_path, 2)
    rows = [
        {"image": "img/0.png", "caption": ["a dog", "  ", "a brown dog"]},
        {"image": "img/1.png", "caption": ["a cat"]},
    ]
    (tmp_path / "blip.json").write_text(json.dumps(rows))
    karpathy = {
        "images": [
            {"filename": f"{i}.png", "filepath": "img", "split": "train", "sentences": s}
            for i, s in enumerate([[{"raw": ""}, {"raw": "A dog."}], [{"raw": "A cat."}]])
        ]
    }
    (tmp_path / "dataset_x.json").write_text(json.dumps(karpathy))
    for name, row in [("blip.json", 0), ("dataset_x.json", 0)]:
        ds = load_set(str(tmp_path / name), _cfg(), "train")
        assert len(ds) == 2 and ds.captions_dropped == 1 and sum(ds.skipped.values()) == 0
        with pytest.raises(BadRowError, match=rf"{name}, row {row}: empty_caption \(1 of its"):
            load_set(str(tmp_path / name), _cfg(strict=True), "train")


def test_uncompressed_shards_are_indexed_not_held_in_memory(tmp_path):
    """A .tar shard's images are `ShardMember`s (offset, size, SHA-1), read when decoded; a
    .tar.gz shard's are bytes. A shard changed between reading and decoding is counted."""
    import hashlib

    from tldr_jax.data.imagestore import decode_records
    from tldr_jax.data.records import ShardMember

    shards = tmp_path / "shards"
    shards.mkdir()
    samples = {str(k): {"png": _encode(_image(k)), "txt": f"cap {k}".encode()} for k in range(3)}
    _write_shard(shards / "00000.tar", samples)
    with tarfile.open(shards / "00001.tar.gz", "w:gz") as tar:
        _add(tar, "9.png", _encode(_image(9)))
        _add(tar, "9.txt", b"gz cap")
    records = read_records(str(shards), "", Skips())
    assert [type(r.image) for r in records] == [ShardMember] * 3 + [bytes]
    for k, r in enumerate(records[:3]):
        assert r.image.read() == samples[str(k)]["png"]
        assert r.image.digest == hashlib.sha1(samples[str(k)]["png"]).digest()
    kept, rows = decode_records(records, 8, 2, Skips(), "shards")
    for i, k in enumerate((0, 1, 2, 9)):
        np.testing.assert_array_equal(rows[i], _resized(k))
    # cut inside sample 2's image after indexing, then the shard removed
    data = (shards / "00000.tar").read_bytes()
    (shards / "00000.tar").write_bytes(data[: records[2].image.offset + 10])
    skips = Skips()
    kept, _ = decode_records(records, 8, 2, skips, "shards")
    assert len(kept) == 3 and skips.as_dict() == {"truncated_image": 1}
    assert "00000.tar, row 2: truncated_image" in skips.first
    (shards / "00000.tar").unlink()
    skips = Skips()
    kept, _ = decode_records(records, 8, 2, skips, "shards")
    assert len(kept) == 1 and skips.as_dict() == {"missing_image": 3}


def test_strict_mode_stops_at_the_first_bad_row_in_input_order(tmp_path):
    names = _write_images(tmp_path, 3)
    rows = [
        {"image": names[0], "caption": "fine"},
        {"image": "img/gone.png", "caption": "its image is missing"},
        {"image": names[1], "caption": " ..."},  # empty once cleaned
        {"image": names[2], "caption": "fine"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowError, match=r"a.json, row 1: missing_image"):
        load_set(str(tmp_path / "a.json"), _cfg(strict=True), "train")
    # A row with its own id: the image error names the row and the id.
    rows[1]["id"] = "img-77"
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowError, match=r"a.json, row 1 \(id img-77\): missing_image"):
        load_set(str(tmp_path / "a.json"), _cfg(strict=True), "train")
    del rows[1]["id"]
    rows[1]["image"] = names[0]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(BadRowError, match=r"a.json, row 2: empty_caption"):
        load_set(str(tmp_path / "a.json"), _cfg(strict=True), "train")


def test_cli_unusable_input_is_one_line(tmp_path):
    """An input with no usable rows or a JSON array that does not parse: no traceback, one
    error line, exit 2."""
    from cli_run import run_cli

    (tmp_path / "rows.txt").write_text("hello\n")
    (tmp_path / "cut.json").write_text('[{"image": "a.png", "caption": "x"},]')
    expected = {
        "rows.txt": "rows.txt: no usable rows for train (1 read; skipped {'malformed_row': 1}",
        "cut.json": "cut.json: not valid JSON at line 1, column 37: Expecting value",
    }
    for name, message in expected.items():
        r = run_cli(
            "pretrain",
            "--config",
            "configs/pretrain.py:tiny",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.data.train={tmp_path / name}",
            timeout=300,
        )
        last = r.stderr.strip().splitlines()[-1]  # after the load's skip warning, if any
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert last.startswith("tldr-jax pretrain: error: ") and message in last


def test_an_undecodable_shard_image_names_the_shard_and_key(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", {"0": {"png": _encode(_image(0)), "txt": b"good"}})
    _write_shard(shards / "00001.tar", {"7": {"png": b"not a png", "txt": b"bad"}})
    ds = load_set(str(shards), _cfg(), "train")
    assert ds.ids == ["00000/0"] and ds.skipped["not_an_image"] == 1
    with pytest.raises(BadRowError, match=r"shards/00001.tar, row 7: not_an_image"):
        load_set(str(shards), _cfg(strict=True), "train")


def test_shards_in_subfolders_are_read_in_path_order(tmp_path):
    """A download split into parts: shards below the folder, same names in each part."""
    from tldr_jax.compress.write import materialise_encoded_images

    root = tmp_path / "wds"
    for part, seeds in (("part-1", (2, 3)), ("part-0", (0, 1))):
        (root / part).mkdir(parents=True)
        samples = {"000000000": {"png": _encode(_image(seeds[0])), "txt": b"first"}}
        samples["000000001"] = {"png": _encode(_image(seeds[1])), "txt": b"second"}
        _write_shard(root / part / "00000.tar", samples)
    (root / "part-1" / "loop").symlink_to(root, target_is_directory=True)  # walked once
    (root / ".hidden").mkdir()
    _write_shard(root / ".hidden" / "00000.tar", {"x": {"png": b"", "txt": b"no"}})
    ds = load_set(str(root), _cfg(cache_dir=str(tmp_path / "cache")), "train")
    assert ds.ids == [f"part-{p}/00000/00000000{k}" for p in (0, 1) for k in (0, 1)]
    assert ds.rows_read == 4 and sum(ds.skipped.values()) == 0  # nothing read from .hidden
    assert ds.image_keys[2] == "part-1/00000.tar/000000000.png"
    for i in range(4):
        np.testing.assert_array_equal(ds.images[i], _resized(i))
    import ml_collections

    config = ml_collections.ConfigDict({"data": {"train": str(root), "image_root": ""}})
    paths = materialise_encoded_images(config, ds.ids, tmp_path / "out")
    assert len(set(paths.values())) == 4
    for i, sid in enumerate(ds.ids):
        image = images_lib.decode_image(tmp_path / "out" / paths[sid], 8)
        np.testing.assert_array_equal(image, _resized(i))
    # a changed shard in a part is a changed input (the decode cache is keyed on it)
    _write_shard(
        root / "part-1" / "00000.tar", {"000000009": {"png": _encode(_image(9)), "txt": b"x"}}
    )
    os.utime(root / "part-1" / "00000.tar", ns=(1, 1))
    again = load_set(str(root), _cfg(cache_dir=str(tmp_path / "cache")), "train")
    assert again.ids[-1] == "part-1/00000/000000009"


def test_expand_braces_as_webdataset_writes_shard_lists():
    from tldr_jax.data.readers import expand_braces, is_shard_pattern

    assert expand_braces("/d/{00008..00011}.tar") == [f"/d/{k:05d}.tar" for k in range(8, 12)]
    assert expand_braces("{1..10..3}") == ["1", "4", "7", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("p{a..c}-{1,2}") == ["pa-1", "pa-2", "pb-1", "pb-2", "pc-1", "pc-2"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]  # nested: innermost first, once each
    assert expand_braces("x{y}z{0,1}") == ["x{y}z0", "x{y}z1"]  # `{y}` is literal
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert is_shard_pattern("/nowhere/{0..3}.tar") and is_shard_pattern("/nowhere/*.tar")
    assert not is_shard_pattern("/nowhere/a.json") and not is_shard_pattern("tfds:coco*")
    assert not is_shard_pattern("")


def test_shards_named_by_a_brace_or_glob_pattern(tmp_path):
    """`data.train=/data/{00000..00003}.tar` (webdataset / open_clip style): the shards in the
    order written, ids relative to the pattern's folder, a named shard that is not there
    counted (strict: an error naming it), the decode cache keyed on the shards it names."""
    from tldr_jax.compress.write import materialise_encoded_images

    root = tmp_path / "wds"
    (root / "part-b").mkdir(parents=True)
    for k in (0, 1, 3):
        _write_shard(root / f"{k:05d}.tar", {"0": {"png": _encode(_image(k)), "txt": b"c"}})
    _write_shard(root / "part-b" / "00000.tar", {"7": {"png": _encode(_image(7)), "txt": b"d"}})
    (root / "notes.json").write_text("{}")

    pattern = str(root / "{00003,{00000..00002}}.tar")
    skips = Skips()
    recs = read_records(pattern, "", skips)
    assert [r.sample_id for r in recs] == ["00003/0", "00000/0", "00001/0"]
    assert recs[0].image_key == "00003.tar/0.png"
    assert skips.as_dict() == {"unreadable_shard": 1}
    assert "00002.tar" in skips.first and "no such shard file" in skips.first
    with pytest.raises(BadRowError, match=r"00002\.tar.*unreadable_shard"):
        read_records(pattern, "", Skips(strict=True))

    # a glob (matches sorted; a folder it matches stands for the shards under it)
    recs = read_records(str(root / "*"), "", Skips())
    ids = ["00000/0", "00001/0", "00003/0", "part-b/00000/7"]
    assert [r.sample_id for r in recs] == ids
    cfg = _cfg(cache_dir=str(tmp_path / "cache"))
    ds = load_set(str(root / "*"), cfg, "train")
    assert ds.ids == ids
    for i, k in enumerate((0, 1, 3, 7)):
        np.testing.assert_array_equal(ds.images[i], _resized(k))
    import ml_collections

    config = ml_collections.ConfigDict({"data": {"train": str(root / "*"), "image_root": ""}})
    paths = materialise_encoded_images(config, ds.ids, tmp_path / "out")
    assert paths["part-b/00000/7"] == "images/part-b/00000/7.png"

    # the missing shard appears: a changed input, not the cached one
    ds = load_set(pattern, cfg, "train")
    assert ds.skipped["unreadable_shard"] == 1 and len(ds) == 3
    _write_shard(root / "00002.tar", {"0": {"png": _encode(_image(2)), "txt": b"e"}})
    ds = load_set(pattern, cfg, "train")
    assert ds.skipped["unreadable_shard"] == 0 and ds.ids[-1] == "00002/0"

    with pytest.raises(FileNotFoundError, match=r"no \.tar shards \(none of the 2 it names"):
        read_records(str(root / "{00010..00011}.tar"), "", Skips())
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        read_records(str(root / "*.tgz"), "", Skips())
    with pytest.raises(InputError, match="notes.json is not a .tar"):
        read_records(str(root / "{notes.json,00000.tar}"), "", Skips())


def test_image_folder_with_caption_files_as_img2dataset_files_output(tmp_path):
    """img2dataset's default `files` output: `00000/000000000.jpg` + `.txt` / `.json` beside
    it, `00000.parquet` and `00000_stats.json` next to the folders (not samples)."""
    import ml_collections

    from tldr_jax.compress.write import image_root_for, materialise_encoded_images

    root = tmp_path / "cc"
    (root / "00000").mkdir(parents=True)
    (root / "00001").mkdir()
    a = root / "00000"
    (a / "000000000.jpg").write_bytes(_encode(_image(0), "JPEG"))
    (a / "000000000.txt").write_text("A cat.")
    (a / "000000000.json").write_text(json.dumps({"caption": "ignored: .txt wins"}))
    (a / "000000001.png").write_bytes(_encode(_image(1)))
    (a / "000000001.json").write_text(json.dumps({"caption": "From JSON"}))
    (a / "000000002.txt").write_text("no image")
    (a / "000000003.png").write_bytes(_encode(_image(3)))
    (a / "000000004.png").write_bytes(_encode(_image(4)))
    (a / "000000004.json").write_text(json.dumps({"caption": ["a", "list"]}))
    (root / "00001" / "000010000.png").write_bytes(_encode(_image(5)))
    (root / "00001" / "000010000.txt").write_text("a dog")
    (root / "00000.parquet").write_bytes(b"PAR1")
    (root / "00000_stats.json").write_text("{}")

    skips = Skips()
    recs = read_records(str(root), "", skips)
    assert [(r.sample_id, r.captions, r.image_key) for r in recs] == [
        ("00000/000000000", ("a cat",), "00000/000000000.jpg"),
        ("00000/000000001", ("from json",), "00000/000000001.png"),
        ("00001/000010000", ("a dog",), "00001/000010000.png"),
    ]
    assert skips.as_dict() == {"missing_image": 1, "no_caption": 1, "malformed_row": 1}
    with pytest.raises(BadRowError, match=r"000000002\.txt, row 00000/000000002: missing_image"):
        read_records(str(root), "", Skips(strict=True))
    cfg = _cfg(cache_dir=str(tmp_path / "cache"))
    ds = load_set(str(root), cfg, "train")
    assert ds.rows_read == 6 and len(ds) == 3
    np.testing.assert_array_equal(ds.images[1], _resized(1))
    np.testing.assert_array_equal(ds.images[2], _resized(5))
    # a changed caption file changes the input (the decode cache is keyed on every file)
    (a / "000000003.txt").write_text("now captioned")
    ds = load_set(str(root), cfg, "train")
    assert len(ds) == 4 and ds.captions[2] == ["now captioned"]
    # compress keeps the paths and says where they resolve
    config = ml_collections.ConfigDict(
        {"data": {"train": str(root), "image_root": str(tmp_path / "elsewhere")}}
    )
    assert materialise_encoded_images(config, ds.ids, tmp_path / "out") is None
    assert Path(image_root_for(config, tmp_path / "w"), ds.image_keys[0]).is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards, and no images"):
        read_records(str(tmp_path / "empty"), "", Skips())


def test_webdataset_json_caption_that_is_not_a_string_is_a_malformed_row(tmp_path):
    (tmp_path / "s").mkdir()
    samples = {
        "0": {"png": _encode(_image(0)), "json": b'{"caption": 7}'},
        "1": {"png": _encode(_image(1)), "json": b'{"caption": "ok"}'},
    }
    _write_shard(tmp_path / "s" / "00000.tar", samples)
    skips = Skips()
    recs = read_records(str(tmp_path / "s"), "", skips)
    assert [r.captions for r in recs] == [("ok",)] and skips.as_dict() == {"malformed_row": 1}


def _coco_file(tmp_path: Path, annotations: list[dict], more_images: tuple = ()) -> Path:
    """A COCO `captions_train2014.json` over three images, ids 10-12 (`train2014/`)."""
    (tmp_path / "train2014").mkdir()
    images = []
    for k in (0, 1, 2):
        (tmp_path / "train2014" / f"COCO_{k}.png").write_bytes(_encode(_image(k)))
        images.append({"id": 10 + k, "file_name": f"COCO_{k}.png"})
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_train2014.json"
    data = {"info": {}, "images": images + list(more_images), "annotations": annotations}
    path.write_text(json.dumps(data))
    return path


def test_coco_captions_file(tmp_path):
    """COCO's own `captions_*.json`: one record per image with every caption naming it;
    unusable images and annotations counted, each under its reason."""
    annotations = [  # image 12 has none
        {"image_id": 11, "id": 1, "caption": "A dog."},
        {"image_id": 10, "id": 2, "caption": "A cat."},
        {"image_id": 10, "id": 3, "caption": "A cat, sleeping"},
        {"image_id": 99, "id": 4, "caption": "orphan"},
        {"image_id": 11, "id": 5, "caption": None},
    ]
    path = _coco_file(tmp_path, annotations, more_images=({"id": 13},))
    skips = Skips()
    recs = read_records(str(path), str(tmp_path / "train2014"), skips)
    assert [(r.sample_id, r.captions, r.image_key) for r in recs] == [
        ("10", ("a cat", "a cat, sleeping"), "COCO_0.png"),
        ("11", ("a dog",), "COCO_1.png"),
    ]
    assert skips.as_dict() == {"no_caption": 1, "malformed_row": 2, "missing_image": 1}
    assert (
        "row annotations[3]: missing_image (image_id 99 is not in 'images')"
        in (skips.examples["missing_image"])
    )
    with pytest.raises(BadRowError, match=r"captions_train2014\.json, row 2: no_caption"):
        read_records(str(path), str(tmp_path / "train2014"), Skips(strict=True))
    with pytest.raises(InputError, match="COCO captions file is one split"):
        read_records(f"{path}:val", "", Skips())
    cfg = _cfg(image_root=str(tmp_path / "train2014"))
    test = load_set(str(path), cfg, "test")
    assert test.ids == ["10", "11"] and test.captions[0] == ["a cat", "a cat, sleeping"]
    np.testing.assert_array_equal(test.images[1], _resized(1))
    assert test.rows_read == 6 and sum(test.skipped.values()) == 4
    # COCO's layout found without data.image_root, and under a data root shared with others
    import ml_collections

    from tldr_jax.compress.write import image_root_for

    for root in ("", str(tmp_path)):
        again = load_set(str(path), _cfg(image_root=root), "train")
        assert again.ids == ["10", "11"]
        np.testing.assert_array_equal(again.images[0], _resized(0))
        config = ml_collections.ConfigDict({"data": {"train": str(path), "image_root": root}})
        assert image_root_for(config, tmp_path / "w") == str(tmp_path / "train2014")


def test_coco_empty_caption_among_an_images_captions_is_counted_and_strict_stops(tmp_path):
    anns = [{"image_id": 10 + k, "caption": f"A dog {k}."} for k in (0, 1, 2)]
    anns.insert(1, {"image_id": 10, "caption": " ... "})
    path = str(_coco_file(tmp_path, anns))
    skips = Skips()
    recs = read_records(path, "", skips)
    assert [r.captions for r in recs] == [("a dog 0",), ("a dog 1",), ("a dog 2",)]
    assert skips.total == 0 and skips.captions_dropped == 1
    with pytest.raises(BadRowError, match=r"captions_train2014\.json, row 0: empty_caption"):
        read_records(path, "", Skips(strict=True))


def test_coco_unusable_annotations_count_under_max_rows(tmp_path):
    anns = [{"image_id": 10 + k, "caption": f"A dog {k}."} for k in (0, 1, 2)]
    anns += [{"image_id": 99, "caption": "orphan"}, {"image_id": 10, "caption": None}]
    path = str(_coco_file(tmp_path, anns))
    skips, inputs = Skips(), []
    assert len(read_records(path, "", skips, inputs=inputs)) == 3
    assert inputs == [(path, 5)] and skips.total == 2  # each bad annotation is a row
    for max_rows in (3, 4):
        skips, inputs = Skips(), []
        recs = read_records(path, "", skips, max_rows=max_rows, inputs=inputs)
        assert len(recs) == 3 and inputs == [(path, max_rows)]
        assert skips.total == max_rows - 3  # rows past max_rows are not read, nor counted


def test_test_set_images_under_their_own_root(tmp_path):
    """data.test_image_root: a test set whose relative paths resolve elsewhere than the
    training set's (CC3M training pairs, a COCO Karpathy test set); "" = data.image_root."""
    train_root, test_root = tmp_path / "cc3m", tmp_path / "coco"
    names = _write_images(train_root, 1)
    test_names = _write_images(test_root, 2)
    (tmp_path / "test.json").write_text(
        json.dumps([{"image": n, "caption": ["a", "b"]} for n in test_names])
    )
    cfg = _cfg(image_root=str(train_root), test_image_root=str(test_root))
    test = load_set(str(tmp_path / "test.json"), cfg, "test")
    assert len(test) == 2 and sum(test.skipped.values()) == 0
    (tmp_path / "train.tsv").write_text(f"a cat\t{names[0]}\n")
    assert len(load_set(str(tmp_path / "train.tsv"), cfg, "train")) == 1
    shared = load_set(str(tmp_path / "test.json"), _cfg(image_root=str(test_root)), "test")
    np.testing.assert_array_equal(shared.images[1], test.images[1])


def test_several_inputs_joined_by_commas_are_one_set(tmp_path):
    """BLIP's list of pre-training files (`coco.json,vg.json,cc3m.json`), formats mixed:
    read in turn, ids unique, max_rows over all; compress writes absolute paths for them."""
    import ml_collections

    from tldr_jax.compress.write import image_root_for, materialise_encoded_images
    from tldr_jax.data.readers import input_identity, split_inputs

    names = _write_images(tmp_path / "a", 2)
    rows = [{"image": n, "caption": f"a {i}", "image_id": "x"} for i, n in enumerate(names)]
    (tmp_path / "a" / "blip.json").write_text(json.dumps(rows))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cc.tsv").write_text("b zero\t" + str(tmp_path / "a" / names[1]) + "\n")
    (tmp_path / "s").mkdir()
    _write_shard(tmp_path / "s" / "00000.tar", {"0": {"png": _encode(_image(5)), "txt": b"s"}})
    (tmp_path / "t").mkdir()
    _write_shard(tmp_path / "t" / "00000.tar", {"0": {"png": _encode(_image(6)), "txt": b"t"}})
    one = read_records(str(tmp_path / "s" / "00000.tar"), "", Skips())  # one shard file
    assert [(r.sample_id, r.captions) for r in one] == [("00000/0", ("s",))]
    spec = f"{tmp_path}/a/blip.json, {tmp_path}/b/cc.tsv,{tmp_path}/{{s,t}}/00000.tar"
    assert split_inputs(spec)[2] == f"{tmp_path}/{{s,t}}/00000.tar"
    assert split_inputs(f"{tmp_path}/{{s,t}}/00000.tar") == [f"{tmp_path}/{{s,t}}/00000.tar"]
    assert input_identity("x.json,y.tsv") == f"{os.getcwd()}/x.json,{os.getcwd()}/y.tsv"
    recs = read_records(spec, "", Skips())
    assert [r.sample_id for r in recs] == ["x", "x#1", "cc:1", "s/00000/0", "t/00000/0"]
    assert [r.captions[0] for r in recs] == ["a 0", "a 1", "b zero", "s", "t"]
    assert len(read_records(spec, "", Skips(), max_rows=3)) == 3
    cfg = _cfg(cache_dir=str(tmp_path / "cache"))
    ds = load_set(spec, cfg, "train")
    for i, k in enumerate((0, 1, 1, 5, 6)):
        np.testing.assert_array_equal(ds.images[i], _resized(k))
    config = ml_collections.ConfigDict({"data": {"train": spec, "image_root": ""}})
    paths = materialise_encoded_images(config, ds.ids, tmp_path / "out")
    assert paths["x"] == str(tmp_path / "a" / names[0])
    assert paths["cc:1"] == str(tmp_path / "a" / names[1])
    # the same key in two inputs' shards: two files
    assert paths["s/00000/0"] != paths["t/00000/0"]
    assert image_root_for(config, tmp_path / "w") == ""
    with pytest.raises(FileNotFoundError, match="no such input: nowhere.json"):
        read_records(f"{tmp_path}/b/cc.tsv,nowhere.json", "", Skips())


def test_a_missing_shard_is_met_where_the_pattern_names_it(tmp_path):
    """Strict mode stops at the first unusable row in input order: a bad row in the first
    shard comes before a gap the pattern names later (the gap was counted first)."""
    root = tmp_path / "wds"
    root.mkdir()
    _write_shard(root / "00000.tar", {"0": {"png": _encode(_image(0)), "txt": b"a"}})
    _write_shard(root / "00001.tar", {"1": {"png": _encode(_image(1)), "txt": b""}})
    pattern = str(root / "{00000..00003}.tar")
    with pytest.raises(BadRowError, match=r"00001\.tar, row 1: empty_caption"):
        read_records(pattern, "", Skips(strict=True))
    skips = Skips()
    assert [r.sample_id for r in read_records(pattern, "", skips)] == ["00000/0"]
    assert skips.as_dict() == {"empty_caption": 1, "unreadable_shard": 2}
    assert readers.shard_listing(pattern)[1:] == (
        [root / "00000.tar", root / "00001.tar"],
        [str(root / "00002.tar"), str(root / "00003.tar")],
    )


def _deny_reading(monkeypatch, name: str) -> None:
    """Reading a file called `name` raises EACCES (chmod does not stop root, who runs CI)."""
    read_bytes = Path.read_bytes

    def unreadable(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)


def test_an_unreadable_caption_file_in_a_folder_is_a_counted_row(tmp_path, monkeypatch):
    """A caption file that cannot be read (no permission, an I/O error) is `no_caption`,
    counted, or in strict mode an error naming it, not a traceback that stops the run.
    (Simulated: chmod does not stop root, who runs CI here.)"""
    root = tmp_path / "f"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_encode(_image(i)))
        (root / f"{i}.txt").write_text(f"caption {i}")
    _deny_reading(monkeypatch, "1.txt")
    skips = Skips()
    recs = read_records(str(root), "", skips)
    assert [r.sample_id for r in recs] == ["0", "2"]
    assert skips.as_dict() == {"no_caption": 1}
    with pytest.raises(BadRowError, match=r"1\.txt, row 1: no_caption \(cannot read: .*denied"):
        read_records(str(root), "", Skips(strict=True))


def test_image_folder_names_with_dots_keep_their_captions(tmp_path):
    """In a folder, a sample's key is the file name less its extension (`photo.2019.jpg` +
    `photo.2019.txt`); such pairs were dropped uncounted when the key ended at the first dot."""
    root = tmp_path / "trips"
    root.mkdir()
    for i, stem in enumerate(("photo.2019", "IMG_0001.final", "plain")):
        (root / f"{stem}.png").write_bytes(_encode(_image(i)))
        (root / f"{stem}.txt").write_text(f"caption {i}")
    (root / "README").write_text("no extension: not a sample")
    skips = Skips()
    recs = read_records(str(root), "", skips)
    assert [(r.sample_id, r.captions) for r in recs] == [
        ("IMG_0001.final", ("caption 1",)),
        ("photo.2019", ("caption 0",)),
        ("plain", ("caption 2",)),
    ]
    assert skips.total == 0


def _png_folder(tmp_path: Path, n: int) -> Path:
    """A folder `f` of `n` PNGs named 0.png, 1.png, ... (captions are the test's)."""
    root = tmp_path / "f"
    root.mkdir()
    for i in range(n):
        (root / f"{i}.png").write_bytes(_encode(_image(i)))
    return root


def test_json_caption_files_that_do_not_parse_or_decode_are_counted_as_such(tmp_path):
    root = _png_folder(tmp_path, 3)
    (root / "0.json").write_bytes(b'{"caption": "fine"}')
    (root / "1.json").write_bytes(b'{"caption": "caf\xe9"}')  # latin-1, not UTF-8
    (root / "2.json").write_bytes(b'{"caption": ')  # cut short
    skips = Skips()
    assert [r.captions for r in read_records(str(root), "", skips)] == [("fine",)]
    assert skips.as_dict() == {"non_utf8": 1, "malformed_row": 1}


def test_max_rows_cuts_the_training_sets_not_the_test_set(tmp_path):
    names = _write_images(tmp_path, 3)
    rows = [{"image": n, "caption": "x"} for n in names]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    cfg = _cfg(max_rows=2, cache_dir=str(tmp_path / "cache"))
    assert len(load_set(str(tmp_path / "a.json"), cfg, "train")) == 2
    assert len(load_set(str(tmp_path / "a.json"), cfg, "clean")) == 2
    assert len(load_set(str(tmp_path / "a.json"), cfg, "test")) == 3


def test_a_split_file_among_several_inputs_is_written_by_compress(tmp_path):
    """`data.train=dataset_coco.json,blip.json`: `write` reads the inputs as the stages do
    (the split file's train + restval images); it stopped asking for a `:split` suffix."""
    import ml_collections

    from tldr_jax.compress.common import data_counts, load_train
    from tldr_jax.compress.write import materialise_encoded_images

    names = _karpathy_split_file(tmp_path)
    rows = [{"image": str(tmp_path / "val2014" / names[3]), "caption": "extra"}]
    (tmp_path / "blip.json").write_text(json.dumps(rows))
    spec = f"{tmp_path}/dataset_coco.json,{tmp_path}/blip.json"
    config = ml_collections.ConfigDict({"data": _cfg(train=spec).to_dict()})
    train = load_train(config)
    paths = materialise_encoded_images(config, train.ids, tmp_path / "out")
    assert len(train) == 11 and sorted(paths) == sorted(train.ids)  # 9 + 1 + 1 captions
    assert paths[train.ids[0]] == str(tmp_path / "val2014" / names[0])
    # The stage summaries' counts add up: rows read = usable records + skipped rows; the
    # records (images with their captions) are fewer than the pairs.
    counts = data_counts(train)
    assert counts["input_records"] == 5 and counts["captions_dropped"] == 0
    assert counts["rows_read"] == 5 + sum(counts["skipped"].values())


def test_a_tfds_source_that_cannot_be_read_is_one_line(tmp_path):
    """Not found, not prepared, or prepared as TFRecord (no random access): an InputError
    saying what to do, not TFDS's traceback (with its list of every dataset it knows)."""
    with pytest.raises(InputError, match=r"tfds:no_such_dataset_xyz: cannot read it as a "):
        read_records("tfds:no_such_dataset_xyz", str(tmp_path), Skips())


def test_a_tfds_dataset_not_prepared_says_so_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    """A dataset TFDS knows but that is not prepared under data_dir: an InputError naming
    the folder it looked for and the `tfds build` command, not TFDS's complaint about the
    TFRecord format; and none of the empty tmp*tfds folders TFDS makes on the way."""
    pytest.importorskip("tensorflow_datasets")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with pytest.raises(InputError) as e:
        read_records("tfds:mnist", str(data_dir), Skips())
    assert str(e.value).startswith(
        f"tfds:mnist: TFDS knows the dataset but it is not prepared "
        f"under {data_dir} (no {data_dir}/mnist/"
    )
    assert "`tfds build mnist --file_format=array_record" in str(e.value)
    assert list(scratch.iterdir()) == [] and tempfile.tempdir == str(scratch)


def test_image_paths_that_cannot_be_opened_are_missing_images(tmp_path):
    """A name too long, a NUL byte, a link loop: a skipped row, not a traceback."""
    for path in (tmp_path / ("x" * 300 + ".png"), "a\x00.png"):
        with pytest.raises(images_lib.MissingImageError):
            images_lib.decode_image(path, 8)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(images_lib.MissingImageError):
        images_lib.decode_image(tmp_path / "loop", 8)
    names = _write_images(tmp_path, 3)
    rows = [{"image": n, "caption": f"c {i}"} for i, n in enumerate(names)]
    rows += [{"image": "x" * 300 + ".png", "caption": "too long"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = load_set(str(tmp_path / "a.json"), _cfg(image_root=str(tmp_path)), "train")
    assert len(ds) == 3 and ds.skipped["missing_image"] == 1 and sum(ds.skipped.values()) == 1


def test_lone_surrogates_and_nul_paths_are_counted_not_crashes(tmp_path):
    """A caption or path holding a lone surrogate written as a JSON escape cannot be
    UTF-8 (it crashed the fingerprint); a NUL byte in a path cannot be opened."""
    names = _write_images(tmp_path, 2)
    rows = [
        {"image": names[0], "caption": "a \ud83d dog"},
        {"image": "\udc00.png", "caption": "x"},
        {"image": "a\x00.png", "caption": "nul"},
        {"image": names[1], "caption": "fine"},
    ]
    text = json.dumps(rows)  # ASCII: the surrogates as \\u escapes
    assert "\\ud83d" in text
    (tmp_path / "a.json").write_text(text)
    skips = Skips()
    recs = read_records(str(tmp_path / "a.json"), str(tmp_path), skips)
    assert [r.captions for r in recs] == [("fine",)]
    assert skips.as_dict() == {"non_utf8": 2, "malformed_row": 1}
    with pytest.raises(BadRowError, match=r"a.json, row 0: non_utf8"):
        read_records(str(tmp_path / "a.json"), str(tmp_path), Skips(strict=True))


def test_names_that_are_not_utf8_in_folders_and_shards_are_non_utf8(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    for i, stem in enumerate((b"good", b"caf\xe9")):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(os.fsencode(root), stem + b".png"), "wb") as f:
            f.write(_encode(_image(i)))
        with open(os.path.join(os.fsencode(root), stem + b".txt"), "wb") as f:
            f.write(b"a caption")
    skips = Skips()
    assert [r.sample_id for r in read_records(str(root), "", skips)] == ["good"]
    assert skips.as_dict() == {"non_utf8": 1}
    shards = tmp_path / "s"
    shards.mkdir()
    # GNU format: names as raw bytes (PAX would store them as UTF-8)
    with tarfile.open(
        shards / "00000.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1"
    ) as tar:
        for stem in ("good", "caf\xe9"):
            _add(tar, f"{stem}.png", _encode(_image(0)))
            _add(tar, f"{stem}.txt", b"a caption")
    skips = Skips()
    assert [r.sample_id for r in read_records(str(shards), "", skips)] == ["00000/good"]
    assert skips.as_dict() == {"non_utf8": 1}


def test_shard_members_that_leave_the_shard_are_malformed_and_never_written_out(tmp_path):
    """`../../x.jpg` in a shard is skipped (compress wrote it outside its output folder),
    and compress's writer keeps any name it is given under out/images."""
    shards = tmp_path / "s"
    shards.mkdir()
    _write_shard(
        shards / "00000.tar",
        {
            "../../../escaped/0": {"png": _encode(_image(0)), "txt": b"up"},
            "/abs/1": {"png": _encode(_image(1)), "txt": b"absolute"},
            "ok/2": {"png": _encode(_image(2)), "txt": b"inside"},
            "ok/../3": {"png": _encode(_image(3)), "txt": b"still inside"},
        },
    )
    skips = Skips()
    recs = read_records(str(shards), "", skips)
    assert [r.captions for r in recs] == [("inside",), ("still inside",)]
    assert skips.as_dict() == {"malformed_row": 2}
    assert "leaves the shard" in skips.examples["malformed_row"]


def test_json_lines_split_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 may stand unescaped inside JSON strings; str.splitlines
    broke rows there (rows lost, later line numbers off)."""
    names = _write_images(tmp_path, 4)
    rows = [{"image": n, "caption": f"row {i}"} for i, n in enumerate(names)]
    rows[1]["caption"] = "two\u2028lines"
    rows[2]["caption"] = "next\u0085line\u2029para"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, json.dumps({"image": "gone.png"}))  # line 4: no caption
    (tmp_path / "a.jsonl").write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    skips = Skips()
    recs = read_records(str(tmp_path / "a.jsonl"), str(tmp_path), skips)
    assert len(recs) == 4 and skips.as_dict() == {"no_caption": 1}
    assert [r.row for r in recs] == [1, 2, 3, 5]
    assert skips.examples["no_caption"].endswith("a.jsonl, row 4: no_caption")
    (tmp_path / "b.jsonl").write_text("\r".join(lines), encoding="utf-8")  # CR only
    assert len(read_records(str(tmp_path / "b.jsonl"), str(tmp_path), Skips())) == 4


def test_tsv_with_carriage_returns_only(tmp_path):
    names = _write_images(tmp_path, 3)
    text = "image\tcaption\r" + "".join(f"{n}\tcaption {i}\r" for i, n in enumerate(names))
    (tmp_path / "a.tsv").write_bytes(text.encode())
    skips = Skips()
    recs = read_records(str(tmp_path / "a.tsv"), str(tmp_path), skips)
    assert [r.captions for r in recs] == [("caption 0",), ("caption 1",), ("caption 2",)]
    assert skips.total == 0


def test_per_sample_caption_files_with_a_byte_order_mark(tmp_path):
    root = _png_folder(tmp_path, 2)
    (root / "0.json").write_bytes(b'\xef\xbb\xbf{"caption": "from json"}')
    (root / "1.txt").write_bytes(b"\xef\xbb\xbffrom txt")
    skips = Skips()
    assert [r.captions for r in read_records(str(root), "", skips)] == [
        ("from json",),
        ("from txt",),
    ]
    assert skips.total == 0


def test_a_karpathy_split_that_is_not_a_string_is_counted(tmp_path):
    rows = [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "a"}]},
        {"filename": "b.png", "split": 5, "sentences": [{"raw": "b"}]},
        {"filename": "c.png", "split": "test", "sentences": [{"raw": "c"}]},
        {"filename": "d.png", "split": ["train"], "sentences": [{"raw": "d"}]},  # a crash
        {"filename": "e.png", "split": {"x": 1}, "sentences": [{"raw": "e"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps({"images": rows}))
    skips = Skips()
    recs = read_records(str(tmp_path / "d.json:train"), str(tmp_path), skips)
    assert [r.captions for r in recs] == [("a",)]
    assert skips.as_dict() == {"malformed_row": 3}
    assert "no 'split' string: 5" in skips.examples["malformed_row"]


def test_folder_and_shard_images_in_gif_and_tiff_and_two_images_for_one_key(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    for i, ext in enumerate(("gif", "tiff")):
        Image.fromarray(_image(i)).save(root / f"s{i}.{ext}")
        (root / f"s{i}.txt").write_text(f"caption {i}")
    (root / "two.jpg").write_bytes(_encode(_image(2), "JPEG"))
    (root / "two.png").write_bytes(_encode(_image(3)))
    (root / "two.txt").write_text("which one")
    skips = Skips()
    recs = read_records(str(root), "", skips)
    assert [r.sample_id for r in recs] == ["s0", "s1"]
    assert skips.as_dict() == {"malformed_row": 1}
    assert "two.jpg, two.png, two.txt" in skips.examples["malformed_row"]
    ds = load_set(str(root), _cfg(), "train")
    assert len(ds) == 2 and ds.skipped["malformed_row"] == 1 and sum(ds.skipped.values()) == 1


def test_file_urls_name_local_paths():
    for url in ("file:///a/my%20b.png", "file://localhost/a/my%20b.png", "FILE:/a/my b.png"):
        assert readers.file_url_path(url) == "/a/my b.png", url
    assert readers.file_url_path("file://otherhost/a.png") is None  # not on this machine
    assert readers.file_url_path("/a.png") is None


def test_a_non_utf8_caption_among_several_is_dropped_not_the_image(tmp_path):
    """One caption that cannot be UTF-8 (a lone-surrogate escape) among an image's several
    is dropped and counted in captions_dropped, as an empty one is; the image keeps the
    others. COCO's annotations are rows of their own: that annotation is a non_utf8 row."""
    names = _write_images(tmp_path, 2)
    bad = "a \ud83d dog"
    eval_rows = [
        {"image": names[0], "caption": ["A cat.", bad, " .."]},
        {"image": names[1], "caption": [bad]},  # nothing usable left: the row is non_utf8
        {"image": names[1], "caption": []},  # no caption at all stays empty_caption
    ]
    (tmp_path / "test.json").write_text(json.dumps(eval_rows))
    karpathy = {
        "images": [
            {"filename": "0.png", "filepath": "img", "split": "test", "sentences": s}
            for s in ([{"raw": "A cat."}, {"raw": bad}], [{"raw": bad}])
        ]
    }
    (tmp_path / "dataset_x.json").write_text(json.dumps(karpathy))
    for name, dropped, more in [("test.json", 2, {"empty_caption": 1}), ("dataset_x.json", 1, {})]:
        skips = Skips()
        recs = read_records(str(tmp_path / name), str(tmp_path), skips, role="test")
        assert [r.captions for r in recs] == [("a cat",)], name
        assert skips.as_dict() == {"non_utf8": 1, **more}, name
        assert skips.captions_dropped == dropped, name
        with pytest.raises(BadRowError, match=rf"{name}, row 0: non_utf8 \(1 of its"):
            read_records(str(tmp_path / name), str(tmp_path), Skips(strict=True), role="test")
    ds = load_set(str(tmp_path / "test.json"), _cfg(), "test")
    assert ds.captions == [["a cat"]] and ds.captions_dropped == 2
    coco = {
        "images": [{"id": 1, "file_name": "0.png"}, {"id": 2, "file_name": "1.png"}],
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "A cat."},
            {"image_id": 1, "id": 2, "caption": bad},
            {"image_id": 2, "id": 3, "caption": bad},  # image 2's only annotation
        ],
    }
    (tmp_path / "captions_x.json").write_text(json.dumps(coco))
    skips = Skips()
    recs = read_records(str(tmp_path / "captions_x.json"), str(tmp_path / "img"), skips)
    assert [r.captions for r in recs] == [("a cat",)]
    # the two annotations (rows of their own) and image 2, whose only caption was one of them
    assert (
        skips.as_dict() == {"non_utf8": 3}
        and "row 1: non_utf8 (its 1 annotation(s)" in (skips.examples["non_utf8"])
    )


def test_each_of_several_inputs_can_have_its_own_image_root(tmp_path):
    """One data.image_root re-bases every input's relative paths: an input whose images live
    elsewhere then gives no usable row, which stops the run (not a silent loss) and says how
    to give each input its own root; the summaries count rows per input."""
    from tldr_jax import config_check
    from tldr_jax.config_lib import data_config
    from tldr_jax.data.dataset import data_counts
    from tldr_jax.utils.signature import normal_path

    coco = tmp_path / "coco"
    rows = [{"image": n, "caption": f"a {i}"} for i, n in enumerate(_write_images(coco, 2))]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "coco.json").write_text(json.dumps(rows))
    cc = tmp_path / "cc"
    (cc / "cc.tsv").parent.mkdir()
    names = [f"pics/{n}" for n in _write_images(cc / "pics", 3)]
    (cc / "cc.tsv").write_text("".join(f"b {i}\t{n}\n" for i, n in enumerate(names)))
    spec = f"{tmp_path}/ann/coco.json,{cc}/cc.tsv"
    lost = r"cc\.tsv: no usable rows for the training set \(3 read\), while the other inputs"
    lost += " joined with"
    with pytest.raises(InputError, match=lost + r" it have 2.*data\.image_root=ROOT1,ROOT2"):
        load_set(spec, _cfg(image_root=str(coco)), "train")
    ds = load_set(spec, _cfg(image_root=f"{coco},"), "train")  # empty: the TSV's own folder
    assert [c[0] for c in ds.captions] == ["a 0", "a 1", "b 0", "b 1", "b 2"]
    np.testing.assert_array_equal(ds.images[4], _resized(2))
    per_input = [
        {"input": f"{tmp_path}/ann/coco.json", "rows_read": 2, "input_records": 2},
        {"input": f"{cc}/cc.tsv", "rows_read": 3, "input_records": 3},
    ]
    assert data_counts(ds)["inputs"] == per_input
    cfg = _cfg(image_root=f"{coco}, {cc}", cache_dir=str(tmp_path / "cache"))
    load_set(spec, cfg, "train")
    assert data_counts(load_set(spec, cfg, "train"))["inputs"] == per_input  # from the cache
    # an entry from before per-input counts is read again, so each input is still checked
    for meta in (tmp_path / "cache").glob("*.json"):
        old = json.loads(meta.read_text())
        meta.write_text(json.dumps({k: v for k, v in old.items() if k not in ("inputs", "parts")}))
    assert data_counts(load_set(spec, cfg, "train"))["inputs"] == per_input
    # max_rows ending at an input's end, or inside the next one, cuts that input short: it is
    # not checked (nor listed as read), the inputs before it are
    for n in (2, 3):
        cut = load_set(spec, _cfg(image_root=str(coco), max_rows=n), "train")
        assert data_counts(cut)["rows_read"] == n and len(cut) == 2
        assert [c["rows_read"] for c in cut.inputs] == [2, n - 2]
    backwards = f"{cc}/cc.tsv,{tmp_path}/ann/coco.json"
    with pytest.raises(InputError, match=r"cc\.tsv: no usable rows for the training set \(3"):
        load_set(backwards, _cfg(image_root=f"{coco},{coco}", max_rows=4), "train")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match=r"empty\.tsv: no usable rows .*: it has no rows"):
        load_set(f"{tmp_path}/empty.tsv,{cc}/cc.tsv", _cfg(), "train")
    # the message names the root the lost input's paths were joined with, not the first
    own = re.escape(f"joined with the image root {str(tmp_path)!r}")
    with pytest.raises(InputError, match=r"cc\.tsv: no usable rows .*" + own):
        load_set(spec, _cfg(image_root=f"{coco},{tmp_path}"), "train")
    with pytest.raises(InputError, match="names 3 roots for 2 input"):
        load_set(spec, _cfg(image_root=f"{coco},,"), "train")
    assert "inputs" not in data_counts(load_set(f"{cc}/cc.tsv", _cfg(), "train"))
    # checked before any stage runs, each root on its own; compared as absolute folders
    config = data_config(train=spec, image_root=f"{coco},nowhere")
    missing = config_check.missing_inputs(ml_collections_config(config), "pretrain")
    assert missing == ["data.image_root='nowhere': no such folder"]
    config = data_config(train=spec, image_root=f"{coco},")
    assert config_check.missing_inputs(ml_collections_config(config), "pretrain") == []
    # the test set takes data.image_root's roots where data.test_image_root is empty
    config = data_config(train=spec, test=f"{cc}/cc.tsv", image_root=f"{coco},")
    assert config_check.missing_inputs(ml_collections_config(config), "pretrain") == [
        f"data.image_root='{coco},': 2 roots for the 1 input(s) of data.test: give one root, "
        "or one per input in the same order (set data.test_image_root for data.test's images)"
    ]
    config = data_config(
        train=spec, test=f"{cc}/cc.tsv", image_root=f"{coco},", test_image_root=str(cc)
    )
    assert config_check.missing_inputs(ml_collections_config(config), "pretrain") == []
    config = data_config(train=f"{cc}/cc.tsv", image_root=f"{coco},{cc}")
    assert (
        "2 roots for the 1 input(s) of data.train"
        in config_check.missing_inputs(ml_collections_config(config), "buffer")[0]
    )
    assert normal_path("data.image_root", "a,") == f"{os.getcwd()}/a,"


def ml_collections_config(data):
    import ml_collections

    return ml_collections.ConfigDict({"data": data})


def test_columns_of_real_caption_files(tmp_path):
    """A header's local path column wins over a URL column beside it; the URL-only files
    researchers download first (BLIP's CapFilt JSON, CC12M's url<TAB>caption) are URLs to
    fetch, and a caption file with the columns the other way round (Flickr8k's token file)
    is said to be so."""
    names = _write_images(tmp_path, 2)
    (tmp_path / "both.tsv").write_text(
        "caption\turl\tfilepath\n"
        + "".join(f"c {i}\thttp://x/{i}.jpg\t{n}\n" for i, n in enumerate(names))
    )
    recs = read_records(str(tmp_path / "both.tsv"), "", Skips())
    assert [r.image_key for r in recs] == names
    (tmp_path / "capfilt.json").write_text(json.dumps([{"url": "https://x/a.jpg", "caption": "a"}]))
    skips = Skips()
    assert read_records(str(tmp_path / "capfilt.json"), "", skips) == []
    assert skips.as_dict() == {"missing_image": 1} and "the image is a URL" in skips.first
    (tmp_path / "cc12m.tsv").write_text("https://x/a.jpg\ta <PERSON> on a bike\n")
    skips = Skips()
    assert read_records(str(tmp_path / "cc12m.tsv"), "", skips) == []
    assert skips.as_dict() == {"missing_image": 1}
    assert "the URL is the first column: url<TAB>caption" in skips.first
    (tmp_path / "Flickr8k.token.txt").write_text("1000268201.jpg#0\tA child in a pink dress .\n")
    skips = Skips()
    assert read_records(str(tmp_path / "Flickr8k.token.txt"), "", skips) == []
    assert skips.as_dict() == {"malformed_row": 1}
    assert "the first column looks like an image file" in skips.first
    # captions that only look like these stay captions: a URL with words after it, a file
    # name beside an image path without an extension, a file name with words in it
    (tmp_path / "my photos").mkdir()
    (tmp_path / "my photos" / "dog 1").write_bytes(_encode(_image(3)))  # no extension
    rows = [
        f"https://t.co/abc check this out\t{names[0]}",
        "IMG_2301.JPG\tpics/00a3f9e1",
        f"sunset photo.png\t{names[1]}",
        "https://example.com/page\tmy photos/dog 1",  # an existing file: a path
        "IMG_0001.JPG\tmy photos/dog 1",
    ]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    skips = Skips()
    recs = read_records(str(tmp_path / "captions.tsv"), str(tmp_path), skips)
    assert skips.total == 0
    assert [r.image_key for r in recs] == [
        names[0],
        "pics/00a3f9e1",
        names[1],
        *["my photos/dog 1"] * 2,
    ]
    # a one-word caption beside a URL is still the URL-first layout
    (tmp_path / "logo.tsv").write_text("https://x.com/a.jpg\tLogo\n")
    skips = Skips()
    assert read_records(str(tmp_path / "logo.tsv"), str(tmp_path), skips) == []
    assert "the URL is the first column" in skips.first


def test_webdataset_samples_without_an_image_say_why(tmp_path):
    """img2dataset writes a failed download's .json and .txt without an image: the skip gives
    its status; only a key whose files come back later in the shard is told about order."""
    failed = json.dumps({"status": "failed_to_download", "error_message": "HTTP 404"})
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "000000000.jpg", _encode(_image(0)))
        _add(tar, "000000000.txt", b"ok")
        _add(tar, "000000001.json", failed.encode())
        _add(tar, "000000001.txt", b"gone")
        _add(tar, "000000002.txt", b"split")
        _add(tar, "000000003.png", _encode(_image(1)))
        _add(tar, "000000003.txt", b"three")
        _add(tar, "000000002.png", _encode(_image(2)))
    skips = Skips()
    recs = read_records(str(tmp_path / "00000.tar"), "", skips)
    assert [r.sample_id for r in recs] == ["00000/000000000", "00000/000000003"]
    assert recs[0].image_key == "00000.tar/000000000.jpg"
    assert skips.as_dict() == {"missing_image": 2, "no_caption": 1}
    assert skips.first.endswith(
        "row 000000001: missing_image (no image file for this key in the shard "
        "(img2dataset status failed_to_download: HTTP 404))"
    )
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        _add(tar, "000000002.txt", b"split")
        _add(tar, "000000003.png", _encode(_image(1)))
        _add(tar, "000000002.png", _encode(_image(2)))
    with pytest.raises(BadRowError, match=r"row 000000002: missing_image .*not consecutive"):
        read_records(str(tmp_path / "00001.tar"), "", Skips(strict=True))


def test_headers_and_extensions_in_any_case_and_json_files_found_by_their_content(tmp_path):
    """`Image_Path<TAB>Caption` / `FilePath,Title` headers and `.CSV` files (Windows and
    pandas exports) read as lower-case ones; a file with another extension holding JSON
    lines (`.ndjson`), and a .json file of one pretty-printed object, read as JSON."""
    names = _write_images(tmp_path, 2)
    (tmp_path / "up.tsv").write_text(f"Image_Path\tCaption\n{names[0]}\tA cat\n")
    (tmp_path / "UP.CSV").write_text(f'FilePath,Title\n{names[1]},"A dog, asleep"\n')
    lines = [json.dumps({"image": n, "caption": f"cap {i}"}) for i, n in enumerate(names)]
    (tmp_path / "rows.ndjson").write_text("\n".join(lines) + "\n")
    one = {"image": names[1], "caption": "Just one.", "id": "x"}
    (tmp_path / "one.json").write_text(json.dumps(one, indent=2))
    for name, want in [
        ("up.tsv", [("up:2", ("a cat",), names[0])]),
        ("UP.CSV", [("UP:2", ("a dog, asleep",), names[1])]),
        ("rows.ndjson", [("rows:1", ("cap 0",), names[0]), ("rows:2", ("cap 1",), names[1])]),
        ("one.json", [("x", ("just one",), names[1])]),
    ]:
        skips = Skips()
        recs = read_records(str(tmp_path / name), "", skips)
        assert [(r.sample_id, r.captions, r.image_key) for r in recs] == want, name
        assert skips.total == 0, name


def test_image_extensions_in_upper_case_hidden_members_and_compressed_shards(tmp_path):
    """`KEY.JPG` is a sample's image in a shard and in a folder; macOS `._KEY.png` members
    are not samples; `.tgz` shards and shards compressed with bzip2 or xz are read."""
    shards = tmp_path / "wds"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        _add(tar, "0.JPG", _encode(_image(0)))
        _add(tar, "0.txt", b"upper")
        _add(tar, "._1.png", b"\x00\x05\x16\x07 AppleDouble")
        _add(tar, "1.png", _encode(_image(1)))
        _add(tar, "1.txt", b"one")
    for k, (name, mode) in enumerate(
        [("00001.tgz", "w:gz"), ("00002.tar", "w:bz2"), ("00003.tar", "w:xz")], start=2
    ):
        with tarfile.open(shards / name, mode) as tar:
            _add(tar, f"{k}.png", _encode(_image(k)))
            _add(tar, f"{k}.txt", f"cap {k}".encode())
    skips = Skips()
    recs = read_records(str(shards), "", skips)
    assert [(r.sample_id, r.captions, r.image_key) for r in recs] == [
        ("00000/0", ("upper",), "00000.tar/0.jpg"),
        ("00000/1", ("one",), "00000.tar/1.png"),
        ("00001/2", ("cap 2",), "00001.tgz/2.png"),
        ("00002/3", ("cap 3",), "00002.tar/3.png"),
        ("00003/4", ("cap 4",), "00003.tar/4.png"),
    ]
    assert skips.total == 0
    ds = load_set(str(shards), _cfg(), "train")
    assert ds.rows_read == 5 and sum(ds.skipped.values()) == 0
    for i in range(5):
        np.testing.assert_array_equal(ds.images[i], _resized(i))
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "p.JPG").write_bytes(_encode(_image(0)))
    (folder / "p.txt").write_text("a photo")
    skips = Skips()
    recs = read_records(str(folder), "", skips)
    assert [(r.sample_id, r.captions, r.image_key) for r in recs] == [("p", ("a photo",), "p.JPG")]
    assert skips.total == 0


def test_a_shard_a_pattern_names_twice_is_read_once(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    for k in (0, 1):
        _write_shard(root / f"{k:05d}.tar", {"0": {"png": _encode(_image(k)), "txt": b"c"}})
    (root / "latest.tar").symlink_to(root / "00000.tar")
    skips = Skips()
    recs = read_records(str(root / "{00001.tar,*.tar}"), "", skips)
    assert [r.sample_id for r in recs] == ["00001/0", "00000/0"] and skips.total == 0
    # The folder itself: latest.tar is 00000.tar, read once as a glob over it reads it.
    for name in (str(root), str(root / "*.tar")):
        assert [r.sample_id for r in read_records(name, "", Skips())] == ["00000/0", "00001/0"]
    # A symlinked subfolder (sorting before its target) is not walked: the real one names
    # the samples, whatever order the filesystem lists them in.
    (root / "latest.tar").unlink()
    (root / "part-1").mkdir()
    (root / "00001.tar").rename(root / "part-1" / "00001.tar")
    (root / "a-link").symlink_to(root / "part-1", target_is_directory=True)
    recs = read_records(str(root), "", Skips())
    assert [r.sample_id for r in recs] == ["00000/0", "part-1/00001/0"]


def test_explicit_id_fields_are_taken_sample_id_then_id_then_image_id(tmp_path):
    names = _write_images(tmp_path, 1)
    rows = [
        {"image": names[0], "caption": "a", "id": "c1", "image_id": "im"},
        {"image": names[0], "caption": "b", "id": "c2", "image_id": "im"},
        {"image": names[0], "caption": "c", "sample_id": "s", "id": "c3", "image_id": "im"},
        {"image": names[0], "caption": "d", "image_id": "im"},
        {"image": names[0], "caption": "e", "id": "", "image_id": 7},
    ]
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    recs = read_records(str(tmp_path / "ids.json"), "", Skips())
    assert [r.sample_id for r in recs] == ["c1", "c2", "s", "im", "7"]


def test_an_input_or_image_root_whose_name_holds_a_comma_is_one(tmp_path):
    root = tmp_path / "photos, 2024"
    names = _write_images(root, 2)
    path = tmp_path / "a,b.tsv"
    path.write_text(f"one\t{names[0]}\ntwo\t{names[1]}\n")
    assert readers.split_inputs(str(path)) == [str(path)]
    assert readers.split_roots(str(root)) == [str(root)]
    ds = load_set(str(path), _cfg(image_root=str(root)), "train")
    assert ds.ids == ["a,b:1", "a,b:2"] and ds.captions == [["one"], ["two"]]
    np.testing.assert_array_equal(ds.images[1], _resized(1))


def test_a_caption_file_that_cannot_be_read_is_named_txt_before_json(tmp_path, monkeypatch):
    """With both KEY.txt and KEY.json the caption is the .txt's: the skip names that file."""
    root = _png_folder(tmp_path, 2)
    for i in range(2):
        (root / f"{i}.txt").write_text(f"caption {i}")
        (root / f"{i}.json").write_text(json.dumps({"caption": f"json {i}"}))
    _deny_reading(monkeypatch, "1.txt")
    with pytest.raises(BadRowError, match=r"1\.txt, row 1: no_caption \(cannot read: .*denied"):
        read_records(str(root), "", Skips(strict=True))


def test_an_image_root_whose_bytes_are_not_utf8_makes_its_rows_non_utf8(tmp_path):
    """The image path is judged by its bytes, the data folder's included: a root in Latin-1
    (`/data/donn\\xe9es` in Python as a lone surrogate) cannot be UTF-8, counted non_utf8."""
    import sys

    if sys.getfilesystemencoding() != "utf-8":
        pytest.skip("needs a UTF-8 file name encoding")
    (tmp_path / "a.json").write_text(json.dumps([{"image": "0.png", "caption": "a dog"}]))
    skips = Skips()
    recs = read_records(str(tmp_path / "a.json"), str(tmp_path / "donn\udce9es"), skips)
    assert recs == [] and skips.as_dict() == {"non_utf8": 1}
