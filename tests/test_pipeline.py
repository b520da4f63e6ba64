"""grain training iterator (determinism, resume, per-process slices), eval batches, tokenizer."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from tldr_jax.data import pipeline
from tldr_jax.data.dataset import ImageTextSet
from tldr_jax.data.images import normalize
from tldr_jax.data.records import SKIP_REASONS
from tldr_jax.data.tokenizer import load_tokenizer


def _set(n: int = 10) -> ImageTextSet:
    # Image i is filled with the value i, so a batch's images name their rows.
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3))
    captions = [[f"caption {i} {j}" for j in range(1 + i % 3)] for i in range(n)]
    return ImageTextSet(
        ids=[f"s{i}" for i in range(n)],
        images=np.ascontiguousarray(images),
        captions=captions,
        image_keys=[f"{i}.png" for i in range(n)],
        rows_read=n,
        skipped=dict.fromkeys(SKIP_REASONS, 0),
        source="test",
    )


def _take(it, k: int) -> list[dict]:
    return list(itertools.islice(it, k))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_content_and_epochs():
    ds = _set(10)
    batches = list(pipeline.train_iterator(ds, 4, seed=0, num_epochs=3))
    assert len(batches) == 3 * (10 // 4)  # each epoch drops its remainder
    for b in batches:
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, 4, 4, 3)
        assert b["index"].dtype == np.int32 and b["caption_index"].dtype == np.int32
        np.testing.assert_allclose(b["image"], normalize(ds.images[b["index"]]))
        assert (b["caption_index"] < np.array([len(ds.captions[i]) for i in b["index"]])).all()
    epochs = [np.concatenate([b["index"] for b in batches[e * 2 : e * 2 + 2]]) for e in range(3)]
    assert all(len(set(e)) == 8 for e in epochs)  # no repeats within an epoch
    assert not all((epochs[0] == e).all() for e in epochs[1:])  # reshuffled per epoch
    full = list(pipeline.train_iterator(ds, 4, seed=0, num_epochs=2, drop_remainder=False))
    for e in range(2):
        idx = np.concatenate([b["index"] for b in full[e * 3 : e * 3 + 3]])
        assert sorted(idx) == list(range(10))
    # Every caption of a multi-caption image gets drawn over epochs.
    many = _take(pipeline.train_iterator(ds, 5, seed=0), 200)
    drawn = {
        (int(i), int(c)) for b in many for i, c in zip(b["index"], b["caption_index"], strict=True)
    }
    assert drawn == {(i, j) for i in range(10) for j in range(len(ds.captions[i]))}


def test_same_seed_same_batches_other_seed_other_batches():
    ds = _set(10)
    a = _take(pipeline.train_iterator(ds, 4, seed=3), 6)
    b = _take(pipeline.train_iterator(ds, 4, seed=3), 6)
    c = _take(pipeline.train_iterator(ds, 4, seed=4), 6)
    _assert_same(a, b)
    assert any((x["index"] != y["index"]).any() for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_from_state(k):
    ds = _set(10)
    tok = load_tokenizer()
    kw = dict(tokenizer=tok, max_len=8)
    it = pipeline.train_iterator(ds, 4, seed=1, **kw)
    _take(it, k)
    state = it.get_state()
    expected = _take(it, 5)  # crosses at least one epoch boundary
    resumed = pipeline.train_iterator(ds, 4, seed=1, **kw)
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), expected)


def test_process_slice():
    assert [pipeline.process_slice(8, p, 4) for p in range(4)] == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 6),
        slice(6, 8),
    ]
    # A short tail batch: sizes differ by at most one and cover every row once.
    parts = [pipeline.process_slice(7, p, 3) for p in range(3)]
    assert parts == [slice(0, 3), slice(3, 5), slice(5, 7)]


def test_global_batch_is_independent_of_process_count(monkeypatch):
    ds = _set(12)
    tok = load_tokenizer()
    single = _take(pipeline.train_iterator(ds, 6, seed=2, tokenizer=tok, max_len=8), 5)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    per_process = []
    for p in range(3):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        it = pipeline.train_iterator(ds, 6, seed=2, tokenizer=tok, max_len=8)
        per_process.append(_take(it, 5))
    for step in range(5):
        parts = [per_process[p][step] for p in range(3)]
        assert all(len(part["index"]) == 2 for part in parts)
        for key in single[step]:
            glued = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(glued, single[step][key])
    with pytest.raises(ValueError, match="multiple"):
        pipeline.train_iterator(ds, 4, seed=0)


def test_tokenized_captions_match_the_drawn_caption():
    ds = _set(10)
    tok = load_tokenizer()
    b = next(pipeline.train_iterator(ds, 4, seed=0, tokenizer=tok, max_len=12))
    texts = [ds.captions[i][c] for i, c in zip(b["index"], b["caption_index"], strict=True)]
    ids, mask = tok.encode_batch(texts, 12)
    np.testing.assert_array_equal(b["input_ids"], ids)
    np.testing.assert_array_equal(b["attention_mask"], mask)
    assert [tok.decode(row) for row in b["input_ids"]] == texts


def test_eval_batches_pad_the_tail():
    ds = _set(10)
    batches = list(pipeline.eval_batches(ds, 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index[valid], np.arange(10))
    assert valid.sum() == 10 and not batches[-1]["valid"][2:].any()
    # the tail is padded with its last row (a real row), not with row 0
    np.testing.assert_array_equal(batches[-1]["index"], [8, 9, 9, 9])
    for b in batches:
        np.testing.assert_allclose(b["image"], normalize(ds.images[b["index"]]))


def test_tokenizer_encode_decode():
    tok = load_tokenizer()
    assert tok.vocab_size == 30522
    assert (tok.cls_id, tok.sep_id, tok.pad_id) == (101, 102, 0)
    ids, mask = tok.encode_batch(["A red circle on the LEFT", "", "one two three four five"], 6)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 6)
    # [CLS] a red circle on [SEP]: truncated to max_len, ids from the MiniLM vocab.
    np.testing.assert_array_equal(ids[0], [101, 1037, 2417, 4418, 2006, 102])
    assert mask[0].all()
    np.testing.assert_array_equal(ids[1], [101, 102, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[1], [1, 1, 0, 0, 0, 0])
    assert tok.decode(ids[0]) == "a red circle on"
    assert tok.decode_batch(ids) == ["a red circle on", "", "one two three four"]


@pytest.mark.parametrize("legacy", [False, True], ids=["extras", "grain_per_process_file"])
def test_checkpointed_iterator_state_is_process_independent(tmp_path, legacy):
    """The iterator state rides in the checkpoint's JSON extras (one copy, any process
    count may restore it); checkpoints from before that (grain's per-process file) still
    restore."""
    import grain
    import orbax.checkpoint as ocp

    from tldr_jax.train.checkpoint import DATA_STATE_KEY, Checkpointer

    ds = _set()
    it = pipeline.train_iterator(ds, batch_size=4, seed=0)
    _take(it, 3)
    state = {"w": jax.numpy.arange(3.0)}
    ckpt = Checkpointer(tmp_path / "ck")
    if legacy:
        items = {
            "state": ocp.args.StandardSave(state),
            "extra": ocp.args.JsonSave({"loss": 1.0}),
            "data": grain.checkpoint.CheckpointSave(it),
        }
        ckpt._mngr.save(3, args=ocp.args.Composite(**items))
        ckpt._mngr.wait_until_finished()
    else:
        ckpt.save(3, state, extra={"loss": 1.0}, data_iter=it)
        assert not (tmp_path / "ck" / "3" / "data").exists()
    want = _take(it, 2)
    fresh = pipeline.train_iterator(ds, batch_size=4, seed=0)
    restored, extra = ckpt.restore(3, state, data_iter=fresh)
    assert extra == {"loss": 1.0} and DATA_STATE_KEY not in extra
    np.testing.assert_array_equal(restored["w"], state["w"])
    _assert_same(_take(fresh, 2), want)
    ckpt.close()
