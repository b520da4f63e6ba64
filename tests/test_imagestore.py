"""Decoded-image store (one copy per image file, views for subsets) and the decode cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tldr_jax.config_lib import data_config
from tldr_jax.data import images as images_lib
from tldr_jax.data import imagestore
from tldr_jax.data.dataset import load_set
from tldr_jax.data.imagestore import ImageRows
from tldr_jax.data.records import SKIP_REASONS, BadRowError


def test_image_rows_index_like_the_array():
    rng = np.random.default_rng(0)
    store = rng.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    index = np.array([2, 0, 2, 3, 1])
    rows, want = ImageRows(store, index), store[index]
    assert rows.shape == want.shape and rows.dtype == np.uint8 and len(rows) == 5
    np.testing.assert_array_equal(np.asarray(rows), want)
    for key in (3, -1, slice(1, 4), np.array([4, 0, 0]), [1, 2], np.arange(5) % 2 == 0):
        np.testing.assert_array_equal(rows[key], want[key])
    np.testing.assert_array_equal(rows[1:3, 0], want[1:3, 0])
    view = rows.take([4, 2])
    assert view.store is store  # a view: no image copied
    np.testing.assert_array_equal(np.asarray(view), want[[4, 2]])
    # the same from a memory-mapped store, read in file order
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rows-{os.getpid()}.npy"
    try:
        np.save(path, store)
        mapped = ImageRows(np.load(path, mmap_mode="r"), index)
        np.testing.assert_array_equal(mapped[np.array([3, 0, 2, 2])], want[[3, 0, 2, 2]])
        assert isinstance(mapped[np.array([1, 0])], np.ndarray)
    finally:
        path.unlink()


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(path)


def _karpathy_train(tmp_path: Path) -> Path:
    """One row per caption, 3 images x 2 captions, plus a missing image and an empty caption."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", i)
        rows += [
            {"image": f"img/{i}.png", "caption": f"scene {i} {k}", "image_id": i} for k in range(2)
        ]
    rows += [{"image": "img/gone.png", "caption": "lost", "image_id": 9}]
    rows += [{"image": "img/0.png", "caption": " ..", "image_id": 0}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    return path


def _cfg(**kw):
    return data_config(**{"image_size": 8, "decode_workers": 2, **kw})


def test_rows_sharing_a_file_share_one_decoded_image(tmp_path):
    ds = load_set(str(_karpathy_train(tmp_path)), _cfg(), "train")
    assert len(ds) == 6 and isinstance(ds.images, ImageRows)
    assert len(ds.images.store) == 4  # 3 images + the missing one's unused slot
    np.testing.assert_array_equal(ds.images[0], ds.images[1])
    want = images_lib.decode_image(str(tmp_path / "img" / "2.png"), 8)
    np.testing.assert_array_equal(ds.images[5], want)
    sub = ds.subset([5, 0])
    assert sub.images.store is ds.images.store
    np.testing.assert_array_equal(sub.images[0], want)


def test_one_file_named_by_different_paths_is_one_image(tmp_path, monkeypatch):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for i in range(2):
        _png(tmp_path / "data" / "img" / f"{i}.png", i)
    spellings = ["img/0.png", "./img/../img/0.png", str(tmp_path / "data" / "img" / "0.png")]
    rows = [{"image": p, "caption": f"a caption {k}"} for k, p in enumerate(spellings)]
    rows += [{"image": "img/1.png", "caption": "another"}]
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows))
    monkeypatch.chdir(tmp_path)  # a relative image root: data/../data/img/0.png is that file
    ds = load_set("data/train.json", _cfg(image_root="data/../data"), "train")
    assert len(ds) == 4 and len(set(ds.image_keys)) == 4
    assert ds.distinct_images() == 2 and ds.distinct_images([0, 2]) == 1
    assert ds.distinct_images([1, 3]) == 2
    np.testing.assert_array_equal(ds.images[0], ds.images[2])


def test_decode_cache_is_reused_and_equal(tmp_path, monkeypatch):
    path = str(_karpathy_train(tmp_path))
    cache = str(tmp_path / "cache")
    plain = load_set(path, _cfg(), "train")
    first = load_set(path, _cfg(cache_dir=cache), "train")
    assert isinstance(first.images.store, np.memmap)
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and not any(".tmp" in f for f in files), files

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the set")

    monkeypatch.setattr(images_lib, "decode_image", no_decoding)
    again = load_set(path, _cfg(cache_dir=cache), "train")
    for ds in (first, again):
        assert ds.ids == plain.ids and ds.captions == plain.captions
        assert ds.image_keys == plain.image_keys and ds.rows_read == plain.rows_read == 8
        assert ds.skipped == plain.skipped
        assert ds.skipped == {r: int(r in ("missing_image", "empty_caption")) for r in SKIP_REASONS}
        np.testing.assert_array_equal(np.asarray(ds.images), np.asarray(plain.images))
    pairs, _ = again.pairs()
    np.testing.assert_array_equal(np.asarray(pairs.images), np.asarray(plain.images))


def test_dropped_captions_are_counted_from_the_cache_too(tmp_path):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1)
    rows = [
        {"image": "a.png", "caption": ["a cat", " .. ", "a cat sitting"]},
        {"image": "b.png", "caption": ["a dog"]},
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    path, cache = str(tmp_path / "test.json"), str(tmp_path / "cache")
    for cfg in (_cfg(), _cfg(cache_dir=cache), _cfg(cache_dir=cache)):  # plain, write, read
        ds = load_set(path, cfg, "train")
        assert ds.captions == [["a cat", "a cat sitting"], ["a dog"]]
        assert ds.captions_dropped == 1 and sum(ds.skipped.values()) == 0


def test_decode_cache_key_follows_the_input_and_settings(tmp_path):
    path = _karpathy_train(tmp_path)
    cache = str(tmp_path / "cache")
    load_set(str(path), _cfg(cache_dir=cache), "train")
    # another image size, max_rows or role is another entry
    load_set(str(path), data_config(image_size=4, decode_workers=1, cache_dir=cache), "train")
    load_set(str(path), _cfg(cache_dir=cache, max_rows=2), "train")
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 3
    # a changed annotation file is read again, not served stale
    rows = json.loads(path.read_text())[:2]
    path.write_text(json.dumps(rows))
    os.utime(path, ns=(1, 1))
    ds = load_set(str(path), _cfg(cache_dir=cache), "train")
    assert len(ds) == 2 and ds.rows_read == 2


def test_strict_mode_is_not_served_from_a_lenient_cache(tmp_path):
    path = str(_karpathy_train(tmp_path))
    cache = str(tmp_path / "cache")
    assert load_set(path, _cfg(cache_dir=cache), "train").skipped["missing_image"] == 1
    with pytest.raises(BadRowError, match="train.json"):
        load_set(path, _cfg(cache_dir=cache, strict=True), "train")


def test_interrupted_decode_leaves_no_cache_entry(tmp_path, monkeypatch):
    path = str(_karpathy_train(tmp_path))
    cache = tmp_path / "cache"
    calls = []

    def failing(src, size):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(images_lib, "decode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        load_set(path, _cfg(cache_dir=str(cache), decode_workers=1), "train")
    assert not cache.exists() or os.listdir(cache) == []
    monkeypatch.undo()
    ds = load_set(path, _cfg(cache_dir=str(cache)), "train")
    assert len(ds) == 6 and ds.images[0].any()


def test_a_full_disk_under_the_decode_cache_is_an_error_not_a_sigbus(tmp_path, monkeypatch):
    """The cache file is a sparse memmap: on a full disk, storing a decoded image into it
    killed the process with SIGBUS (exit 135, no message). Its blocks are reserved first,
    so a full disk is an OSError naming data.cache_dir, and its temporary is removed."""
    import errno

    path = str(_karpathy_train(tmp_path))
    cache = tmp_path / "cache"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left .*in data.cache_dir") as err:
        load_set(path, _cfg(cache_dir=str(cache)), "train")
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(cache) == []
    monkeypatch.undo()
    assert len(load_set(path, _cfg(cache_dir=str(cache)), "train")) == 6


def test_a_damaged_decode_cache_entry_is_decoded_again(tmp_path):
    """An entry whose row index was emptied since (ours land whole) is decoded again, as
    its other damage is, not an EOFError traceback."""
    path = str(_karpathy_train(tmp_path))
    cache = tmp_path / "cache"
    first = load_set(path, _cfg(cache_dir=str(cache)), "train")
    (index,) = cache.glob("*.index.npy")
    index.write_bytes(b"")
    again = load_set(path, _cfg(cache_dir=str(cache)), "train")
    assert again.ids == first.ids
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))


def _one_test_set_three_ways(tmp_path: Path) -> dict[str, Path]:
    """3 images x 3 captions (one image's last caption empty) as a Karpathy eval JSON (one
    row per image), a TSV and a webdataset (one row per caption, interleaved)."""
    import io
    import tarfile

    (tmp_path / "img").mkdir()
    caps = {i: [f"image {i} caption {k}" for k in range(3)] for i in range(3)}
    caps[1][2] = " "
    for i in caps:
        _png(tmp_path / "img" / f"{i}.png", i)
    rows = [{"image": f"img/{i}.png", "caption": c} for i, c in caps.items()]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    lines = [f"{caps[i][k]}\t./img/{i}.png" for k in range(3) for i in caps]
    (tmp_path / "test.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tar:
        for n, (k, i) in enumerate((k, i) for k in range(3) for i in caps):
            for ext, data in (
                ("jpg", (tmp_path / "img" / f"{i}.png").read_bytes()),
                ("txt", caps[i][k].encode()),
            ):
                info = tarfile.TarInfo(f"{n:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"eval": tmp_path / "eval.json", "tsv": tmp_path / "test.tsv", "wds": tmp_path / "wds"}


@pytest.mark.parametrize("cache", [False, True])
def test_a_test_set_given_one_row_per_caption_is_grouped_by_image(tmp_path, cache):
    paths = _one_test_set_three_ways(tmp_path)
    cfg = _cfg(cache_dir=str(tmp_path / "cache") if cache else "")
    want = [[f"image {i} caption {k}" for k in range(3) if (i, k) != (1, 2)] for i in range(3)]
    for name, path in paths.items():
        for _ in range(2 if cache else 1):  # the second load is served by the cache
            ds = load_set(str(path), cfg, "test")
            assert len(ds) == 3 and ds.captions == want, name
            assert ds.rows_read == (3 if name == "eval" else 9), name
            # a row's empty caption: a skipped row; an eval row's empty list entry: dropped
            assert ds.skipped["empty_caption"] == (name != "eval"), name
            for i in range(3):
                np.testing.assert_array_equal(
                    ds.images[i], images_lib.decode_image(str(tmp_path / "img" / f"{i}.png"), 8)
                )
    # as training data the rows stay pairs (one per caption); the bytes are stored once
    train = load_set(str(paths["wds"]), cfg, "train")
    assert len(train) == 8 and len(train.images.store) == 3


def test_compress_writes_each_distinct_webdataset_image_once(tmp_path):
    import ml_collections

    from tldr_jax.compress.write import materialise_encoded_images

    wds = _one_test_set_three_ways(tmp_path)["wds"]
    pairs = load_set(str(wds), _cfg(), "train").pairs()[0]
    config = ml_collections.ConfigDict({"data": {"train": str(wds), "image_root": ""}})
    paths = materialise_encoded_images(config, pairs.ids, tmp_path / "out")
    assert sorted(paths) == sorted(pairs.ids) and len(set(paths.values())) == 3
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 3
    for i, sid in enumerate(pairs.ids):
        image = images_lib.decode_image(tmp_path / "out" / paths[sid], 8)
        np.testing.assert_array_equal(image, pairs.images[i])


def test_a_killed_decodes_cache_temporary_is_removed_by_the_next(tmp_path):
    """kill -9 while images decode into the cache leaves a temporary as large as the entry;
    the next decode of the entry on this host removes it where its writer is gone, and leaves
    a live writer's and another host's or PID namespace's alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    store = imagestore.MemmapStore(str(tmp_path), "train-abc", 8)
    images_path = store.tmp.split(".tmp")[0]
    tag = imagestore._writer_tag()
    assert tag and store.tmp.endswith(f"-{tag}")
    stale = f"{images_path}.tmp{dead}-0123abcd-{tag}"
    live = f"{images_path}.tmp{os.getpid()}-89abcdef-{tag}"
    remote = f"{images_path}.tmp{dead}-01234567-otherhost.{tag.rsplit('.', 1)[1]}"
    other_ns = f"{images_path}.tmp{dead}-01234567-{tag}9"  # a container with the host's name
    for p in (stale, live, remote, other_ns):
        Path(p).write_bytes(b"x")
    imagestore.MemmapStore(str(tmp_path), "train-abc", 8)
    assert not os.path.exists(stale) and os.path.exists(live)
    assert os.path.exists(remote) and os.path.exists(other_ns)


def test_a_grouped_test_image_keeps_its_first_rows_id_and_image(tmp_path):
    """Rows of one image given together (`a a b`): each group is its first row, not the row
    at the group's number."""
    (tmp_path / "img").mkdir()
    for i in range(2):
        _png(tmp_path / "img" / f"{i}.png", i)
    lines = ["a first\timg/0.png", "a second\timg/0.png", "b only\timg/1.png"]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    ds = load_set(str(tmp_path / "t.tsv"), _cfg(), "test")
    assert ds.ids == ["t:1", "t:3"] and ds.image_keys == ["img/0.png", "img/1.png"]
    assert ds.captions == [["a first", "a second"], ["b only"]]
    want = images_lib.decode_image(str(tmp_path / "img" / "1.png"), 8)
    np.testing.assert_array_equal(ds.images[1], want)


def test_a_file_system_that_cannot_reserve_space_keeps_the_cache_sparse(tmp_path, monkeypatch):
    """posix_fallocate refused as unsupported (EOPNOTSUPP, or EINVAL as some file systems
    answer): the cache file stays sparse and the set loads, as before the reservation."""
    import errno

    path = str(_karpathy_train(tmp_path))
    for code in (errno.EOPNOTSUPP, errno.EINVAL):

        def unsupported(fd, offset, length, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "posix_fallocate", unsupported)
        cache = tmp_path / f"cache{code}"
        assert len(load_set(path, _cfg(cache_dir=str(cache)), "train")) == 6
