"""Batched caption generation under `jax.jit`: greedy, beam search, nucleus sampling (SPEC A.5).

The decode loop is a `lax.while_loop` over fixed-shape buffers, so there is one compile per
(decoder, batch, prompt length, max_len, method[, beam_size]). The sequence fed to the decoder is
`[bos] + prompt + generated`; only the generated tokens come back, int32 (B, max_len), each row
ending at its first `eos_id` ([SEP]) and padded with `pad_id` after it.

Two interchangeable "steppers" drive the same loops:
- the KV cache (`TextDecoder.init_cache` / `decode_step`): the prefix is prefilled in one call,
  then each step feeds one token; cross-attention K/V of the image are computed once;
- `decode_recompute`: no cache, the decoder re-runs the whole prefix every step. It is the
  reference the cache is tested against and the baseline of benchmarks/decode.py.

Beam search follows fairseq's rules: each step keeps the 2K best expansions; an expansion that
ends in EOS is finished only if it ranks in the top K, the K best non-EOS expansions stay live;
a row is done once it has K finished hypotheses; live beams are finished at max_len. Scores are
sum log p / length ** length_penalty with length = generated tokens (EOS included). With K = 1
this is exactly greedy decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tldr_jax.models.captioner import CLS_ID, PAD_ID, SEP_ID, TextDecoder

Method = Literal["greedy", "beam", "nucleus"]
METHODS: tuple[str, ...] = ("greedy", "beam", "nucleus")


class _Stepper(NamedTuple):
    """How to get next-token logits; carry is an opaque pytree with the batch on axis 0."""

    prefill: Callable[[jax.Array], tuple[jax.Array, Any]]  # prefix (B, P) -> (logits (B, V), carry)
    step: Callable[
        [Any, jax.Array], tuple[jax.Array, Any]
    ]  # (carry, token (B,)) -> (logits, carry)
    repeat: Callable[[Any, int], Any]  # every batch row repeated k times (beam expansion)
    gather: Callable[[Any, jax.Array], Any]  # rows reordered by int32 (B,) (beam parents)


def _cache_stepper(decoder: TextDecoder, image_tokens: jax.Array, total_len: int) -> _Stepper:
    def prefill(prefix):
        cache = decoder.init_cache(image_tokens, total_len)
        logits, cache = decoder.decode_step(prefix, cache)
        return logits[:, -1], cache

    def step(cache, token):
        logits, cache = decoder.decode_step(token[:, None], cache)
        return logits[:, 0], cache

    def map_layers(cache, fn, keys):
        layers = [{n: fn(a) if n in keys else a for n, a in e.items()} for e in cache["layers"]]
        return {"index": cache["index"], "layers": layers}

    all_keys = ("k", "v", "cross_k", "cross_v")
    return _Stepper(
        prefill,
        step,
        lambda cache, k: map_layers(cache, lambda a: jnp.repeat(a, k, axis=0), all_keys),
        # Beams of one image share its cross K/V: only the self-attention cache is reordered.
        lambda cache, idx: map_layers(cache, lambda a: a[idx], ("k", "v")),
    )


def _recompute_stepper(decoder: TextDecoder, image_tokens: jax.Array, total_len: int) -> _Stepper:
    """carry = (token buffer (B, total_len), image tokens, number of tokens in the buffer)."""

    def last_logits(tokens, image, length):
        hidden = decoder.hidden_states(tokens, image)
        last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1, keepdims=False)
        return decoder.logits(last)  # vocab projection for the needed position only

    def prefill(prefix):
        b, p = prefix.shape
        tokens = jnp.zeros((b, total_len), jnp.int32).at[:, :p].set(prefix)
        length = jnp.asarray(p, jnp.int32)
        return last_logits(tokens, image_tokens, length), (tokens, image_tokens, length)

    def step(carry, token):
        tokens, image, length = carry
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, length))
        length = length + 1
        return last_logits(tokens, image, length), (tokens, image, length)

    return _Stepper(
        prefill,
        step,
        lambda c, k: (jnp.repeat(c[0], k, axis=0), jnp.repeat(c[1], k, axis=0), c[2]),
        lambda c, idx: (c[0][idx], c[1], c[2]),
    )


def _forbid_eos(logits: jax.Array, step: jax.Array, min_len: int, eos_id: int) -> jax.Array:
    """EOS impossible before `min_len` generated tokens."""
    if min_len <= 0:
        return logits
    return logits.at[..., eos_id].set(jnp.where(step < min_len, -jnp.inf, logits[..., eos_id]))


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Keeps the smallest set of top tokens whose probability reaches top_p (at least one).

    A token is kept when the probability mass strictly above it is < top_p; the rest -> -inf.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_above < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _sample_loop(
    stepper: _Stepper,
    prefix: jax.Array,
    select: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    max_len: int,
    min_len: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Greedy / sampling: token_t = select(logits_t, t); stops when every row has emitted EOS."""
    b = prefix.shape[0]

    def choose(logits, t, done):
        token = select(_forbid_eos(logits, t, min_len, eos_id), t).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)
        return token, done | (token == eos_id)

    logits, carry = stepper.prefill(prefix)
    out = jnp.full((b, max_len), pad_id, jnp.int32)
    token, done = choose(logits, jnp.int32(0), jnp.zeros((b,), bool))
    out = out.at[:, 0].set(token)

    def cond(state):
        t, _, _, _, done = state
        return (t < max_len) & ~jnp.all(done)

    def body(state):
        t, carry, out, token, done = state
        logits, carry = stepper.step(carry, token)
        token, done = choose(logits, t, done)
        return t + 1, carry, out.at[:, t].set(token), token, done

    state = (jnp.int32(1), carry, out, token, done)
    return jax.lax.while_loop(cond, body, state)[2]


def _beam_search(
    stepper: _Stepper,
    prefix: jax.Array,
    *,
    beam_size: int,
    length_penalty: jax.Array,
    max_len: int,
    min_len: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    b, k = prefix.shape[0], beam_size
    neg_inf = jnp.float32(-jnp.inf)
    norm = lambda length: jnp.asarray(length, jnp.float32) ** length_penalty

    logits, carry = stepper.prefill(prefix)
    carry = stepper.repeat(carry, k)
    logits = jnp.repeat(logits, k, axis=0)
    # All beams start identical: only beam 0 may expand at the first step.
    live_logp = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (b, 1))
    state = {
        "live_seqs": jnp.full((b, k, max_len), pad_id, jnp.int32),
        "live_logp": live_logp,
        "fin_seqs": jnp.full((b, k, max_len), pad_id, jnp.int32),
        "fin_scores": jnp.full((b, k), neg_inf),
        "num_fin": jnp.zeros((b,), jnp.int32),
    }

    def expand(t, logits, carry, s):
        logp = jax.nn.log_softmax(_forbid_eos(logits, t, min_len, eos_id), axis=-1)
        vocab = logp.shape[-1]
        cand = (s["live_logp"][:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(s["live_seqs"], parent[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], t, axis=2)
        is_eos = token == eos_id
        done = s["num_fin"] >= k
        # fairseq: an EOS expansion counts only when it ranks in the top K; rows already done
        # accept nothing more.
        finishing = is_eos & (jnp.arange(2 * k) < k)[None] & ~done[:, None]
        new_scores = jnp.where(finishing, top_logp / norm(t + 1), neg_inf)
        pool_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
        pool_seqs = jnp.concatenate([s["fin_seqs"], seqs], axis=1)
        fin_scores, keep = jax.lax.top_k(pool_scores, k)
        live_scores, live_idx = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_logp), k)
        parents = jnp.take_along_axis(parent, live_idx, axis=1)
        carry = stepper.gather(carry, (jnp.arange(b)[:, None] * k + parents).reshape(-1))
        return carry, {
            "live_seqs": jnp.take_along_axis(seqs, live_idx[:, :, None], axis=1),
            "live_logp": live_scores,
            "fin_seqs": jnp.take_along_axis(pool_seqs, keep[:, :, None], axis=1),
            "fin_scores": fin_scores,
            "num_fin": s["num_fin"] + jnp.sum(finishing, axis=1, dtype=jnp.int32),
        }

    carry, state = expand(jnp.int32(0), logits, carry, state)

    def cond(loop):
        t, _, s = loop
        return (t < max_len) & ~jnp.all(s["num_fin"] >= k)

    def body(loop):
        t, carry, s = loop
        logits, carry = stepper.step(carry, s["live_seqs"][:, :, t - 1].reshape(-1))
        carry, s = expand(t, logits, carry, s)
        return t + 1, carry, s

    t, _, s = jax.lax.while_loop(cond, body, (jnp.int32(1), carry, state))
    # Rows that ran out of length finish their live beams (HF / fairseq behaviour); rows already
    # done keep their finished hypotheses only.
    done = (s["num_fin"] >= k)[:, None]
    live_scores = jnp.where(done, neg_inf, s["live_logp"] / norm(t))
    scores = jnp.concatenate([s["fin_scores"], live_scores], axis=1)
    seqs = jnp.concatenate([s["fin_seqs"], s["live_seqs"]], axis=1)
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "encode",
        "method",
        "max_len",
        "min_len",
        "beam_size",
        "use_cache",
        "eos_id",
        "pad_id",
    ),
)
def _generate_jit(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: jax.Array,
    prefix: jax.Array,
    rng: jax.Array,
    top_p: jax.Array,
    temperature: jax.Array,
    length_penalty: jax.Array,
    *,
    encode: bool,
    method: str,
    max_len: int,
    min_len: int,
    beam_size: int,
    use_cache: bool,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    if encode:
        image_tokens, decoder = model.image_tokens(inputs, train=False), model.decoder
    else:
        image_tokens, decoder = inputs, model
    # The last generated token is never fed back, hence the -1.
    total_len = prefix.shape[1] + max_len - 1
    make = _cache_stepper if use_cache else _recompute_stepper
    stepper = make(decoder, image_tokens, total_len)
    loop = dict(max_len=max_len, min_len=min_len, eos_id=eos_id, pad_id=pad_id)
    if method == "greedy":
        return _sample_loop(stepper, prefix, lambda logits, t: jnp.argmax(logits, -1), **loop)
    if method == "nucleus":

        def sample(logits, t):
            logits = top_p_filter(logits / temperature, top_p)
            return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

        return _sample_loop(stepper, prefix, sample, **loop)
    return _beam_search(stepper, prefix, beam_size=beam_size, length_penalty=length_penalty, **loop)


def _prefix(prompt_ids: Sequence[int] | np.ndarray | jax.Array, batch: int, bos_id: int):
    """[bos] + prompt as int32 (B, 1 + P)."""
    prompt = jnp.asarray(np.asarray(prompt_ids, np.int32))
    if prompt.ndim == 1:
        prompt = jnp.broadcast_to(prompt, (batch, prompt.shape[0]))
    if prompt.shape[0] != batch:
        raise ValueError(f"prompt batch {prompt.shape[0]} != image batch {batch}")
    return jnp.concatenate([jnp.full((batch, 1), bos_id, jnp.int32), prompt], axis=1)


def _run(
    model: nnx.Module,
    inputs: jax.Array,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array,
    *,
    encode: bool,
    method: Method = "greedy",
    max_len: int = 30,
    min_len: int = 0,
    beam_size: int = 3,
    length_penalty: float = 1.0,
    top_p: float = 0.9,
    temperature: float = 1.0,
    rng: jax.Array | None = None,
    bos_id: int = CLS_ID,
    eos_id: int = SEP_ID,
    pad_id: int = PAD_ID,
    use_cache: bool = True,
) -> jax.Array:
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
    if method == "nucleus" and rng is None:
        raise ValueError("nucleus sampling needs rng (a jax.random key)")
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    prefix = _prefix(prompt_ids, inputs.shape[0], bos_id)
    decoder = model.decoder if encode else model
    if prefix.shape[1] + max_len - 1 > decoder.max_len:
        raise ValueError(
            f"1 + prompt ({prefix.shape[1] - 1}) + max_len ({max_len}) - 1 exceeds the decoder's "
            f"max_len {decoder.max_len}"
        )
    if method == "beam" and 2 * beam_size > decoder.vocab_size:
        raise ValueError(f"beam_size {beam_size} needs a vocabulary of at least {2 * beam_size}")
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef,
        state,
        inputs,
        prefix,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(top_p),
        jnp.float32(temperature),
        jnp.float32(length_penalty),
        encode=encode,
        method=method,
        max_len=max_len,
        min_len=min_len,
        beam_size=beam_size if method == "beam" else 1,
        use_cache=use_cache,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def generate(
    decoder: TextDecoder,
    image_tokens: jax.Array,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array = (),
    *,
    method: Method = "greedy",
    max_len: int = 30,
    min_len: int = 0,
    beam_size: int = 3,
    length_penalty: float = 1.0,
    top_p: float = 0.9,
    temperature: float = 1.0,
    rng: jax.Array | None = None,
    bos_id: int = CLS_ID,
    eos_id: int = SEP_ID,
    pad_id: int = PAD_ID,
    use_cache: bool = True,
) -> jax.Array:
    """Generates int32 (B, max_len) continuations of `[bos_id] + prompt_ids` for each image.

    image_tokens: (B, T, D) what the decoder cross-attends to. prompt_ids: token ids without
    [CLS]/[SEP], shared (P,) or per row (B, P). min_len: EOS is forbidden before that many
    generated tokens. rng: required for nucleus (one key; step t uses fold_in(rng, t)).
    use_cache=False is the full-recompute reference path (`decode_recompute`).
    """
    return _run(
        decoder,
        image_tokens,
        prompt_ids,
        encode=False,
        method=method,
        max_len=max_len,
        min_len=min_len,
        beam_size=beam_size,
        length_penalty=length_penalty,
        top_p=top_p,
        temperature=temperature,
        rng=rng,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        use_cache=use_cache,
    )


def decode_recompute(
    decoder: TextDecoder,
    image_tokens: jax.Array,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array = (),
    **kwargs: Any,
) -> jax.Array:
    """`generate` without the KV cache: the whole prefix is re-run every step (reference)."""
    return generate(decoder, image_tokens, prompt_ids, use_cache=False, **kwargs)


def generate_captions(
    model: nnx.Module,
    images: jax.Array,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array = (),
    **kwargs: Any,
) -> jax.Array:
    """Encodes images and generates in one jitted call.

    `model` is a `Captioner` or `CodebookCaptioner` (anything with `.image_tokens(images, *,
    train)` and `.decoder`); keyword arguments as for `generate`.
    """
    return _run(model, images, prompt_ids, encode=True, **kwargs)
