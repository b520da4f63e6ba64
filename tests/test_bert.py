"""Flax BERT against Hugging Face's PyTorch BertModel (fixture) and a numpy re-implementation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tldr_jax.models.bert import TextEncoder, load_bert, pool

FIXTURE = "tests/fixtures/bert_reference.npz"


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def encoder():
    # max_len 64 so the longest fixture sentence (33 tokens) is not truncated.
    return TextEncoder(pooling="mean", max_len=64)


def test_last_hidden_matches_pytorch(reference):
    model = load_bert()  # all-MiniLM-L6-v2 from the wheel
    ids, mask = reference["input_ids"], reference["attention_mask"]
    hidden = np.asarray(jax.jit(lambda i, m: model(i, m))(ids, mask))
    valid = mask.astype(bool)
    assert hidden.shape == reference["last_hidden_state"].shape
    assert np.abs(hidden - reference["last_hidden_state"])[valid].max() < 1e-4
    for mode, key in (("mean", "mean_pooled"), ("cls", "cls_pooled")):
        pooled = np.asarray(pool(jnp.asarray(hidden), mask, mode))
        assert np.abs(pooled - reference[key]).max() < 1e-4


def test_text_encoder_matches_pytorch(encoder, reference):
    sentences = [str(s) for s in reference["sentences"]]
    # Same token ids as the HF tokenizer the reference used.
    valid = reference["attention_mask"].astype(bool)
    for ids, ref_ids, ref_valid in zip(
        encoder.tokenize(sentences), reference["input_ids"], valid, strict=True
    ):
        assert ids == ref_ids[ref_valid].tolist()
    # Sentences land in 4 different length buckets (8/16/32/64), padded differently from the
    # reference's single batch: rows must come back in input order and be pad-invariant.
    emb = encoder.embed(sentences)
    assert emb.dtype == np.float32 and emb.shape == (5, encoder.dim) and encoder.dim == 384
    assert np.abs(emb - reference["mean_pooled"]).max() < 1e-4
    unit = encoder.embed(sentences, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    ref = reference["mean_pooled"]
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert encoder.embed([]).shape == (0, 384)


def test_embed_refuses_a_bare_string(encoder):
    with pytest.raises(TypeError, match=r"embed\(\[text\]\)"):
        encoder.embed("hello")


def test_truncation_keeps_sep(encoder):
    (ids,) = encoder.tokenize(["word " * 200])
    assert len(ids) == encoder.max_len and ids[0] == 101 and ids[-1] == 102


def test_texts_at_max_len_and_at_a_bucket_length_are_embedded(encoder):
    """A text cut to exactly max_len tokens (the last bucket) and one of exactly a bucket
    length get the model's embedding of their own tokens, not a row left at zero."""
    texts = ["word " * 200, "a b c d e f", "a red ball"]
    ids = encoder.tokenize(texts)
    assert [len(t) for t in ids[:2]] == [encoder.max_len, 8]
    emb = encoder.embed(texts)
    model = load_bert()
    for row, tokens in zip(emb, ids, strict=True):
        mask = jnp.ones((1, len(tokens)), jnp.int32)
        want = pool(model(jnp.asarray([tokens]), mask), mask, "mean")
        np.testing.assert_allclose(row, np.asarray(want)[0], atol=1e-4)


def test_embed_cached(encoder, reference, tmp_path, monkeypatch):
    sentences = [str(s) for s in reference["sentences"]][:3]
    first = encoder.embed_cached(sentences, tmp_path)
    files = list(tmp_path.glob("text_emb_*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), first)
    np.testing.assert_allclose(first, reference["mean_pooled"][:3], atol=1e-4)
    # normalize=True is its own cache entry (unit rows), not the raw one read back
    normed = encoder.embed_cached(sentences, tmp_path, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        normed, first / np.linalg.norm(first, axis=1, keepdims=True), atol=1e-5
    )
    assert len(list(tmp_path.glob("text_emb_*.npy"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(encoder, "embed", fail)
    np.testing.assert_array_equal(encoder.embed_cached(sentences, tmp_path), first)
    # Any change of texts or options is a different key.
    keys = {
        encoder.cache_key(sentences),
        encoder.cache_key(sentences[:2]),
        encoder.cache_key(sentences[::-1]),
        encoder.cache_key(sentences, normalize=True),
        encoder.cache_key(["a b", "c"]),
        encoder.cache_key(["a", "b c"]),
    }
    assert len(keys) == 6


def test_a_damaged_embedding_cache_entry_is_embedded_again(encoder, tmp_path):
    """A cache file cut short or of another shape (damaged on disk: ours land whole) is
    embedded again and rewritten, as the decode cache does, not a traceback that stops
    every later stage reading the set."""
    sentences = ["a red ball", "two blue squares"]
    first = encoder.embed_cached(sentences, tmp_path)
    (path,) = tmp_path.glob("text_emb_*.npy")
    whole = path.read_bytes()
    for damaged in (whole[:100], whole[: len(whole) // 2], b""):
        path.write_bytes(damaged)
        np.testing.assert_array_equal(encoder.embed_cached(sentences, tmp_path), first)
        assert path.read_bytes() == whole
    np.save(path, first[:1])  # a whole .npy, but not these texts' rows
    np.testing.assert_array_equal(encoder.embed_cached(sentences, tmp_path), first)
    assert path.read_bytes() == whole


def test_cache_key_depends_on_pooling_and_max_len(encoder):
    """CLS and mean pooling, or texts cut at another max_len, are other embeddings."""
    import copy

    keys = {encoder.cache_key(["a"])}
    for attr, value in (("pooling", "cls"), ("max_len", 32)):
        other = copy.copy(encoder)
        setattr(other, attr, value)
        keys.add(other.cache_key(["a"]))
    assert len(keys) == 3


def test_weights_saved_over_the_same_folder_are_another_cache_key(encoder, tmp_path):
    """Fine-tuned weights of the same shape written over a model folder have the same size:
    the key also takes the weights file's modification time (stale embeddings otherwise)."""
    import copy
    import os

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0" * 64)
    other = copy.copy(encoder)
    other.model_dir = folder
    key = other.cache_key(["a"])
    assert other.cache_key(["a"]) == key
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert other.cache_key(["a"]) != key


def test_pool_mean_ignores_padding():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    garbage = np.where(mask[..., None] > 0, hidden, 1e6)
    out = np.asarray(pool(jnp.asarray(garbage), jnp.asarray(mask), "mean"))
    ref = np.stack([hidden[i, : mask[i].sum()].mean(0) for i in range(3)])
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(pool(jnp.asarray(hidden), mask, "cls")), hidden[:, 0])
    with pytest.raises(ValueError):
        pool(jnp.asarray(hidden), mask, "max")


# A tiny random BERT saved as a BertFor* checkpoint ("bert." prefix), checked against numpy.
TINY = dict(vocab=40, hidden=8, layers=2, heads=2, inter=16, positions=16, eps=1e-12)


def _tiny_checkpoint(path):
    rng = np.random.default_rng(1)
    h, inter = TINY["hidden"], TINY["inter"]
    w = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.5
    weights = {
        "embeddings.word_embeddings.weight": w(TINY["vocab"], h),
        "embeddings.position_embeddings.weight": w(TINY["positions"], h),
        "embeddings.token_type_embeddings.weight": w(2, h),
        "embeddings.LayerNorm.weight": 1 + w(h),
        "embeddings.LayerNorm.bias": w(h),
    }
    for i in range(TINY["layers"]):
        p = f"encoder.layer.{i}."
        for name in ("self.query", "self.key", "self.value", "output.dense"):
            weights[p + f"attention.{name}.weight"] = w(h, h)
            weights[p + f"attention.{name}.bias"] = w(h)
        weights[p + "attention.output.LayerNorm.weight"] = 1 + w(h)
        weights[p + "attention.output.LayerNorm.bias"] = w(h)
        weights[p + "intermediate.dense.weight"] = w(inter, h)
        weights[p + "intermediate.dense.bias"] = w(inter)
        weights[p + "output.dense.weight"] = w(h, inter)
        weights[p + "output.dense.bias"] = w(h)
        weights[p + "output.LayerNorm.weight"] = 1 + w(h)
        weights[p + "output.LayerNorm.bias"] = w(h)
    stored = {"bert." + k: v for k, v in weights.items()}
    stored["cls.predictions.bias"] = w(TINY["vocab"])  # an MLM head, to be ignored
    save_file(stored, str(path / "model.safetensors"))
    config = {
        "vocab_size": TINY["vocab"],
        "hidden_size": h,
        "num_hidden_layers": TINY["layers"],
        "num_attention_heads": TINY["heads"],
        "intermediate_size": inter,
        "max_position_embeddings": TINY["positions"],
        "type_vocab_size": 2,
        "layer_norm_eps": TINY["eps"],
        "hidden_act": "gelu",
    }
    (path / "config.json").write_text(json.dumps(config))
    return {k: v.astype(np.float64) for k, v in weights.items()}


def _numpy_bert(wt, ids, mask, types):
    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + TINY["eps"]) * wt[name + ".weight"] + wt[name + ".bias"]

    def dense(x, name):
        return x @ wt[name + ".weight"].T + wt[name + ".bias"]

    erf = np.vectorize(math.erf)
    x = (
        wt["embeddings.word_embeddings.weight"][ids]
        + wt["embeddings.position_embeddings.weight"][np.arange(ids.shape[1])]
        + wt["embeddings.token_type_embeddings.weight"][types]
    )
    x = ln(x, "embeddings.LayerNorm")
    b, length, h = x.shape
    nh, d = TINY["heads"], h // TINY["heads"]
    for i in range(TINY["layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            dense(x, p + f"attention.self.{n}").reshape(b, length, nh, d).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        ctx = (attn @ v).transpose(0, 2, 1, 3).reshape(b, length, h)
        x = ln(x + dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = dense(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
        x = ln(x + dense(inner, p + "output.dense"), p + "output.LayerNorm")
    return x


def test_load_prefixed_checkpoint_matches_numpy(tmp_path):
    weights = _tiny_checkpoint(tmp_path)
    model = load_bert(tmp_path)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, TINY["vocab"], size=(3, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
    types = np.array([[0] * 4 + [1] * 3] * 3, np.int32)
    out = np.asarray(jax.jit(lambda i, m, t: model(i, m, t))(ids, mask, types))
    ref = _numpy_bert(weights, ids, mask, types)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4)


def test_load_rejects_missing_weights(tmp_path):
    _tiny_checkpoint(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    del stored["bert.encoder.layer.1.output.dense.bias"]
    save_file(stored, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="layer.1.output.dense.bias"):
        load_bert(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_bert(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors .*pytorch_model.bin"):
        load_bert(tmp_path)


def test_load_rejects_other_activations_and_position_embeddings(tmp_path):
    """A BERT whose config asks for what this encoder does not compute (tanh GELU, relative
    positions) is refused, not loaded into the exact-GELU / absolute-position network."""
    _tiny_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in (
        ("hidden_act", "gelu_new", "hidden_act 'gelu_new' is not 'gelu'"),
        ("position_embedding_type", "relative_key", "only absolute position embeddings"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match):
            load_bert(tmp_path)


def test_a_bert_folder_without_tokenizer_json_uses_its_vocab(reference, tmp_path):
    """Older BERT folders ship vocab.txt (+ tokenizer_config.json), no tokenizer.json."""
    from tldr_jax.data.tokenizer import load_tokenizer
    from tldr_jax.models.pretrained import default_text_model_dir

    src = default_text_model_dir()
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        (folder / name).symlink_to(src / name)
    encoder = TextEncoder(str(folder), pooling="mean", max_len=64)
    valid = reference["attention_mask"].astype(bool)
    sentences = [str(s) for s in reference["sentences"]]
    for ids, ref_ids, ref_valid in zip(
        encoder.tokenize(sentences), reference["input_ids"], valid, strict=True
    ):
        assert ids == ref_ids[ref_valid].tolist()
    bundled, built = load_tokenizer(), load_tokenizer(str(folder))
    texts = ["Café naïve résumé 中文", "[CLS] a literal [MASK]", "tabs\tand  spaces", "x" * 300]
    ids_a, ids_b = bundled.encode_batch(texts, 40)[0], built.encode_batch(texts, 40)[0]
    np.testing.assert_array_equal(ids_a, ids_b)
    assert bundled.decode_batch(ids_a) == built.decode_batch(ids_b)
    # a cased vocabulary's setting is followed
    (folder / "tokenizer_config.json").unlink()
    unk = {"content": "[UNK]", "__type": "AddedToken", "lstrip": False}  # newer transformers
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": False, "unk_token": unk})
    )
    cased = load_tokenizer(str(folder))
    assert cased.encode_batch(["Cat"], 8)[0].tolist() != cased.encode_batch(["cat"], 8)[0].tolist()
    # without a tokenizer_config.json, BERT's default: lower case
    (folder / "tokenizer_config.json").unlink()
    uncased = load_tokenizer(str(folder))
    np.testing.assert_array_equal(
        uncased.encode_batch(["Cat"], 8)[0], uncased.encode_batch(["cat"], 8)[0]
    )
    from tldr_jax.config_check import ConfigError

    with pytest.raises(ConfigError, match="text.max_len=513: must be <= 512"):
        TextEncoder(str(folder), max_len=513)
    (folder / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(str(folder))


def test_a_vocab_without_pad_token_still_embeds(encoder, reference, tmp_path):
    """A vocab.txt folder whose pad token is not "[PAD]" (tokenizer_config.json names
    another): the encoder pads with some id (padded positions are masked) instead of failing
    in `embed` with a TypeError on a None pad id; the embeddings are the same."""
    from tldr_jax.models.pretrained import default_text_model_dir

    src = default_text_model_dir()
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(src / name)
    vocab = (src / "vocab.txt").read_text(encoding="utf-8")
    assert "\n[PAD]\n" in "\n" + vocab
    (folder / "vocab.txt").write_text(vocab.replace("[PAD]\n", "<pad>\n", 1), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    other = TextEncoder(str(folder), pooling="mean", max_len=64)
    sentences = [str(s) for s in reference["sentences"]]
    np.testing.assert_allclose(
        other.embed(sentences), encoder.embed(sentences), rtol=1e-5, atol=1e-6
    )
    assert isinstance(other.pad_id, int)
