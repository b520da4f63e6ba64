"""Captioners: a causal text decoder cross-attending to image tokens (SPEC A.1, A.5).

`TextDecoder` is a BERT-sized causal LM: token + learned position embeddings, `depth` layers of
[causal self-attention, cross-attention to the image tokens, MLP], then a vocabulary projection
(tied to the token embedding by default). It is *pre-LN* (LayerNorm at the start of each
residual branch, one final LayerNorm): the reference's post-LN BERT decoder starts from
pretrained weights, ours trains from scratch, where pre-LN is the stable choice.

Incremental decoding uses a pure functional KV cache (a pytree of fixed-shape arrays, see
`TextDecoder.init_cache`), so a decode loop is a `lax.while_loop` with static shapes. The
cross-attention keys/values depend only on the image, so they are computed once per image.

`CodebookCaptioner` = image encoder tokens -> (projection) -> VectorQuantizer -> decoder, trained
with LM cross-entropy + VQ loss; `codes(images)` gives the per-image code sequence for the
extract stage. `Captioner` is the same without the quantizer (caption generation stage).
Training inputs are tokenizer ids `[CLS] caption [SEP] [PAD]...`; the first token is replaced by
the decoder-start id `bos_id` (BLIP's [DEC]; MiniLM has none, so [CLS] = 101 is reused) and the
targets are the inputs shifted by one, pads (and optionally a prompt) ignored.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tldr_jax.models.heads import Dropout
from tldr_jax.models.vq import VectorQuantizer

# MiniLM / BERT uncased special ids.
PAD_ID = 0
CLS_ID = 101
SEP_ID = 102

# KV cache: {"index": int32 () next position to write, "layers": [per layer {"k", "v":
# (B, heads, max_len, head_dim), "cross_k", "cross_v": (B, heads, T_image, head_dim)}]}.
Cache = dict[str, Any]

_KERNEL_INIT = nnx.initializers.xavier_uniform()
_EMBED_INIT = nnx.initializers.normal(0.02)


class ImageTokenEncoder(Protocol):
    """Any image encoder with `tokens(x) -> (B, T, D)` (e.g. models.vit.ViT, which has no
    dropout, so training and evaluation tokens are the same function)."""

    def tokens(self, x: jax.Array) -> jax.Array: ...


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    b, length, width = x.shape
    return x.reshape(b, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    b, h, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, length, h * d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention on (B, H, L, d) tensors; mask broadcastable to (B, H, Lq, Lk)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


class DecoderLayer(nnx.Module):
    """Pre-LN block: x + SelfAttn(LN x); x + CrossAttn(LN x, image); x + MLP(LN x)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        image_dim: int,
        *,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        dense = lambda i, o: nnx.Linear(i, o, kernel_init=_KERNEL_INIT, dtype=dtype, rngs=rngs)
        self.ln_self = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.qkv = dense(width, 3 * width)
        self.self_out = dense(width, width)
        self.ln_cross = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.cross_q = dense(width, width)
        self.cross_kv = dense(image_dim, 2 * width)
        self.cross_out = dense(width, width)
        self.ln_mlp = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp_in = dense(width, mlp_dim)
        self.mlp_out = dense(mlp_dim, width)
        self.dropout = Dropout(dropout, rngs=rngs)

    def image_kv(self, image_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values (B, H, T, d) of the image tokens."""
        k, v = jnp.split(self.cross_kv(image_tokens), 2, axis=-1)
        return _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)

    def __call__(
        self,
        x: jax.Array,
        self_mask: jax.Array,
        image_kv: tuple[jax.Array, jax.Array],
        *,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
        train: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x (B, L, W) -> (x, (k, v)).

        Without `cache`, x attends to its own positions and (k, v) are its keys/values. With
        `cache` = (k, v) buffers (B, H, max_len, d), x's keys/values are written at `index` and
        x attends over the whole buffer (masked by `self_mask`); the updated buffers come back.
        """
        drop = lambda y: self.dropout(y, deterministic=not train)
        q, k, v = jnp.split(self.qkv(self.ln_self(x)), 3, axis=-1)
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        if cache is not None:
            # One index dtype (int32) for all four: with jax_enable_x64 a Python 0 is int64.
            at, zero = jnp.asarray(index, jnp.int32), jnp.zeros((), jnp.int32)
            put = lambda buf, new: jax.lax.dynamic_update_slice(
                buf, new.astype(buf.dtype), (zero, zero, at, zero)
            )
            k, v = put(cache[0], k), put(cache[1], v)
        x = x + drop(self.self_out(_merge_heads(attend(q, k, v, self_mask))))
        q = _split_heads(self.cross_q(self.ln_cross(x)), self.num_heads)
        x = x + drop(self.cross_out(_merge_heads(attend(q, *image_kv, None))))
        h = self.mlp_out(drop(jax.nn.gelu(self.mlp_in(self.ln_mlp(x)))))
        return x + drop(h), (k, v)


class TextDecoder(nnx.Module):
    """Causal LM with cross-attention to image tokens (pre-LN, tied output by default)."""

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 256,
        depth: int = 3,
        num_heads: int = 4,
        mlp_dim: int = 1024,
        max_len: int = 64,
        image_dim: int = 256,
        tie_embeddings: bool = True,
        dropout: float = 0.1,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size = vocab_size
        self.width = width
        self.num_heads = num_heads
        self.max_len = max_len
        self.dtype = dtype
        self.token_embed = nnx.Embed(
            vocab_size, width, embedding_init=_EMBED_INIT, dtype=dtype, rngs=rngs
        )
        self.pos_embed = nnx.Param(_EMBED_INIT(rngs.params(), (max_len, width), jnp.float32))
        self.embed_dropout = Dropout(dropout, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(
                    width, num_heads, mlp_dim, image_dim, dropout=dropout, dtype=dtype, rngs=rngs
                )
                for _ in range(depth)
            ]
        )
        self.ln_final = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(width, vocab_size, kernel_init=_KERNEL_INIT, dtype=dtype, rngs=rngs)
        )
        self.output_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    # -- building blocks ------------------------------------------------------------------------

    def _embed(self, input_ids: jax.Array, start: jax.Array | int) -> jax.Array:
        length = input_ids.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, length, axis=0)
        return (self.token_embed(input_ids) + pos[None].astype(self.dtype)).astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states (..., W) -> float32 vocabulary logits (..., V)."""
        out = self.token_embed.attend(hidden) if self.head is None else self.head(hidden)
        return out.astype(jnp.float32) + self.output_bias[...]

    def image_kv(self, image_tokens: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer cross-attention (k, v), each (B, H, T, d)."""
        return [layer.image_kv(image_tokens.astype(self.dtype)) for layer in self.layers]

    # -- full-sequence forward (training, and the no-cache reference decode) ---------------------

    def hidden_states(
        self, input_ids: jax.Array, image_tokens: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """int32 (B, L), (B, T, D_img) -> final-LN hidden states (B, L, W), causal."""
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} > decoder max_len {self.max_len}")
        x = self.embed_dropout(self._embed(input_ids, 0), deterministic=not train)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        for layer, kv in zip(self.layers, self.image_kv(image_tokens), strict=True):
            x, _ = layer(x, causal, kv, train=train)
        return self.ln_final(x)

    def __call__(
        self, input_ids: jax.Array, image_tokens: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """Teacher-forced logits float32 (B, L, V); position i sees tokens <= i only."""
        return self.logits(self.hidden_states(input_ids, image_tokens, train=train))

    # -- incremental decoding ------------------------------------------------------------------

    def init_cache(self, image_tokens: jax.Array, max_len: int) -> Cache:
        """Empty self-attention cache for `max_len` positions + the image's cross K/V.

        Layout: {"index": int32 (), "layers": [{"k", "v": (B, H, max_len, d),
        "cross_k", "cross_v": (B, H, T, d)} per layer]}. Every leaf but "index" has the batch
        on axis 0 (beam search repeats / gathers along it).
        """
        if max_len > self.max_len:
            raise ValueError(f"cache length {max_len} > decoder max_len {self.max_len}")
        b = image_tokens.shape[0]
        head_dim = self.width // self.num_heads
        zeros = jnp.zeros((b, self.num_heads, max_len, head_dim), self.dtype)
        layers = [
            {"k": zeros, "v": zeros, "cross_k": ck, "cross_v": cv}
            for ck, cv in self.image_kv(image_tokens)
        ]
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    def decode_step(self, input_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feeds S new tokens (B, S) at positions index..index+S-1 -> (logits (B, S, V), cache).

        S = prefix length for the prefill, 1 per generated token afterwards. Positions past
        index+S in the cache are masked out, so their (zero) content never matters.
        """
        index = cache["index"]
        s = input_ids.shape[1]
        cache_len = cache["layers"][0]["k"].shape[2]
        x = self._embed(input_ids, index)
        q_pos = index + jnp.arange(s)
        mask = (jnp.arange(cache_len)[None, :] <= q_pos[:, None])[None, None]
        new_layers = []
        for layer, entry in zip(self.layers, cache["layers"], strict=True):
            x, (k, v) = layer(
                x,
                mask,
                (entry["cross_k"], entry["cross_v"]),
                cache=(entry["k"], entry["v"]),
                index=index,
            )
            new_layers.append({**entry, "k": k, "v": v})
        logits = self.logits(self.ln_final(x))
        return logits, {"index": index + s, "layers": new_layers}


# -- losses -------------------------------------------------------------------------------------


def decoder_inputs(input_ids: jax.Array, bos_id: int) -> jax.Array:
    """Replaces the first token ([CLS]) by the decoder-start token."""
    return input_ids.at[:, 0].set(bos_id)


def lm_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    prompt_len: int = 0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy -> (mean over counted targets, number of counted targets).

    Position i predicts token i+1. Pads (attention_mask 0) are ignored, and so are the first
    `prompt_len` caption tokens after the start token (BLIP does not train on the prompt).
    """
    targets = input_ids[:, 1:]
    weights = attention_mask[:, 1:].astype(jnp.float32)
    if prompt_len:
        weights = weights * (jnp.arange(targets.shape[1]) >= prompt_len)[None]
    labels = optax.smooth_labels(
        jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), label_smoothing
    )
    ce = optax.softmax_cross_entropy(logits[:, :-1].astype(jnp.float32), labels)
    count = jnp.sum(weights)
    return jnp.sum(ce * weights) / jnp.maximum(count, 1.0), count


# -- the two captioners -------------------------------------------------------------------------


class CodebookCaptioner(nnx.Module):
    """Image encoder tokens -> (linear to the code dim) -> VQ -> text decoder (SPEC A.1).

    loss = lm_weight * LM cross-entropy + vq_weight * VQ loss (1:1 in the reference).
    """

    def __init__(
        self,
        image_encoder: ImageTokenEncoder,
        quantizer: VectorQuantizer,
        decoder: TextDecoder,
        *,
        token_dim: int,
        lm_weight: float = 1.0,
        vq_weight: float = 1.0,
        bos_id: int = CLS_ID,
        label_smoothing: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.image_encoder = image_encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.pre_quant = (
            nnx.Linear(token_dim, quantizer.dim, kernel_init=_KERNEL_INIT, rngs=rngs)
            if token_dim != quantizer.dim
            else None
        )
        self.lm_weight = lm_weight
        self.vq_weight = vq_weight
        self.bos_id = bos_id
        self.label_smoothing = label_smoothing

    def _pre_quant_tokens(self, images: jax.Array, *, train: bool) -> jax.Array:
        del train  # image encoders' `tokens` have no train/eval difference (no dropout)
        z = self.image_encoder.tokens(images)
        return z if self.pre_quant is None else self.pre_quant(z)

    def quantize(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """-> (quantized tokens (B, T, dim) with straight-through grads, codes (B, T), vq aux)."""
        return self.quantizer(self._pre_quant_tokens(images, train=train), train=train)

    def image_tokens(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Quantized image tokens the decoder attends to (no codebook update)."""
        z_q, _, _ = self.quantizer(self._pre_quant_tokens(images, train=train), train=False)
        return z_q

    def codes(self, images: jax.Array) -> jax.Array:
        """Per-image code sequence int32 (B, T) for the extract stage (eval mode)."""
        return self.quantizer.codes(self._pre_quant_tokens(images, train=False))

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (teacher-forced logits (B, L, V), vq aux). input_ids are raw tokenizer ids."""
        z_q, _, aux = self.quantize(images, train=train)
        logits = self.decoder(decoder_inputs(input_ids, self.bos_id), z_q, train=train)
        return logits, aux

    def loss(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        train: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (total loss, metrics {"loss", "lm_loss", "vq_loss", "perplexity", "usage"})."""
        logits, aux = self(images, input_ids, train=train)
        lm, _ = lm_loss(logits, input_ids, attention_mask, label_smoothing=self.label_smoothing)
        total = self.lm_weight * lm + self.vq_weight * aux["loss"]
        metrics = {
            "loss": total,
            "lm_loss": lm,
            "vq_loss": aux["loss"],
            "perplexity": aux["perplexity"],
            "usage": aux["usage"],
        }
        return total, metrics


class Captioner(nnx.Module):
    """Plain captioner (no quantizer) for the caption generation stage (SPEC A.5).

    Fine-tuned with the prompt ("a picture of ") inside the caption; `prompt_len` (the number
    of prompt tokens) excludes the prompt from the loss as BLIP does.
    """

    def __init__(
        self,
        image_encoder: ImageTokenEncoder,
        decoder: TextDecoder,
        *,
        bos_id: int = CLS_ID,
        label_smoothing: float = 0.0,
    ):
        self.image_encoder = image_encoder
        self.decoder = decoder
        self.bos_id = bos_id
        self.label_smoothing = label_smoothing

    def image_tokens(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # see ImageTokenEncoder
        return self.image_encoder.tokens(images)

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, *, train: bool = False
    ) -> jax.Array:
        tokens = self.image_tokens(images, train=train)
        return self.decoder(decoder_inputs(input_ids, self.bos_id), tokens, train=train)

    def loss(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        prompt_len: int = 0,
        train: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (LM loss, {"loss"}); prompt tokens and pads are not counted."""
        logits = self(images, input_ids, train=train)
        lm, _ = lm_loss(
            logits,
            input_ids,
            attention_mask,
            prompt_len=prompt_len,
            label_smoothing=self.label_smoothing,
        )
        return lm, {"loss": lm}
