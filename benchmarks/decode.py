"""Caption decoding throughput: KV cache vs full recompute of the prefix, same model and inputs.

    python benchmarks/decode.py                      # width 512, 6 layers, batch 32, 197 tokens
    python benchmarks/decode.py --width 256 --depth 3 --json /tmp/decode.json

Greedy decoding of `--max-len` tokens after "[CLS] a picture of" with EOS disabled (min_len =
max_len), so both paths generate exactly the same number of tokens. Each path is compiled and
run once untimed, then timed over one run. The recompute path re-runs the whole decoder
(self- and cross-attention projections of all 197 image tokens included) on the prefix every
step, as decoding without a cache does; it projects only the last position to the vocabulary.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from tldr_jax.caption.generate import decode_recompute, generate
from tldr_jax.models.captioner import TextDecoder
from tldr_jax.utils.argtypes import positive_int
from tldr_jax.utils.io import write_json

PROMPT_IDS = [1037, 3861, 1997]  # "a picture of" in the BERT uncased vocabulary


def _timed(fn) -> tuple[np.ndarray, float]:
    jax.block_until_ready(fn())  # compile + warm-up
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return np.asarray(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=positive_int, default=512)
    parser.add_argument("--depth", type=positive_int, default=6)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--vocab", type=positive_int, default=30522)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--image-tokens", type=positive_int, default=197)
    parser.add_argument("--image-dim", type=positive_int, default=768)
    parser.add_argument("--max-len", type=positive_int, default=30)
    parser.add_argument("--json", default="", help="write the numbers to this JSON file")
    args = parser.parse_args()
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")

    decoder = TextDecoder(
        args.vocab,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        mlp_dim=4 * args.width,
        max_len=len(PROMPT_IDS) + args.max_len,
        image_dim=args.image_dim,
        dropout=0.0,
        rngs=nnx.Rngs(0),
    )
    image = jax.random.normal(jax.random.key(1), (args.batch, args.image_tokens, args.image_dim))
    kw = dict(method="greedy", max_len=args.max_len, min_len=args.max_len)
    cached, t_cache = _timed(lambda: generate(decoder, image, PROMPT_IDS, **kw))
    recomputed, t_full = _timed(lambda: decode_recompute(decoder, image, PROMPT_IDS, **kw))
    tokens = args.batch * args.max_len
    result = {
        "device": str(jax.devices()[0].device_kind),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "cache_s": t_cache,
        "recompute_s": t_full,
        "cache_tokens_per_s": tokens / t_cache,
        "recompute_tokens_per_s": tokens / t_full,
        "speedup": t_full / t_cache,
        "same_tokens": bool(np.array_equal(cached, recomputed)),
    }
    print(
        f"{result['device']}: batch {args.batch} x {args.max_len} tokens, width {args.width}, "
        f"{args.depth} layers, vocab {args.vocab}, {args.image_tokens} image tokens\n"
        f"  KV cache : {t_cache:8.3f} s  {result['cache_tokens_per_s']:10.1f} tokens/s\n"
        f"  recompute: {t_full:8.3f} s  {result['recompute_tokens_per_s']:10.1f} tokens/s\n"
        f"  speed-up : {result['speedup']:.1f}x   identical tokens: {result['same_tokens']}"
    )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
