"""Stage `caption`: a plain captioner trained on human-quality captions, then new captions for
every row the `score` stage kept (SPEC A.5).

The captioner (ViT tokens -> causal text decoder, no quantizer) is trained on a separate clean
caption set (Karpathy COCO train; by default the embedded world's clean split, 5 captions per
image, one drawn at random per image and epoch) with the prompt "a picture of " prepended to
every caption and excluded from the loss, as BLIP fine-tunes its captioner. Generation starts
from [bos] + prompt and returns only the continuation (greedy, beam or seeded nucleus).

Outputs: W/caption/generated.json {sample_id: caption} (what `write` reads) and
W/caption/samples.png. Rows are split over processes (each writes
W/caption/parts/generated-PPP-of-NNN.json, the main process merges them); a part or the
merged file that already covers its ids is not generated again.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tldr_jax.caption.generate import generate_captions
from tldr_jax.compress.captioner_stage import (
    VOCAB_FILE,
    CompactVocab,
    decoder_kwargs,
    local_mesh,
    local_model,
    padded_batches,
    round_up,
    train_model,
)
from tldr_jax.compress.common import (
    check_stage,
    data_counts,
    load_train,
    require_inputs,
    rows_of,
    stage_dir,
)
from tldr_jax.config_check import ConfigError
from tldr_jax.config_lib import max_rows_of
from tldr_jax.data.dataset import ImageTextSet, load_set
from tldr_jax.data.images import normalize
from tldr_jax.data.pipeline import process_slice
from tldr_jax.data.readers import is_shard_input, read_records, split_inputs
from tldr_jax.data.records import Skips, clean_caption
from tldr_jax.data.tokenizer import Tokenizer, load_tokenizer
from tldr_jax.models import make_image_encoder
from tldr_jax.models.captioner import Captioner, TextDecoder
from tldr_jax.utils import dist, io, preemption, progress
from tldr_jax.utils.mesh import data_sharding, make_mesh

log = logging.getLogger(__name__)

NAME = "caption"


def caption_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data, with caption.image_root as the image root when caption.data is a file."""
    data_cfg = config.data.copy_and_resolve_references()
    if config.caption.data:
        with data_cfg.unlocked():
            data_cfg.image_root = str(config.caption.image_root)
    return data_cfg


def clean_pairs_bound(config: ml_collections.ConfigDict) -> int | None:
    """At most how many images the caption model trains on, without decoding any: the
    embedded world's `num_clean`, or the usable rows of `caption.data` as read (an image
    that then fails to decode only lowers it). None where counting means reading the
    images (TFDS sources, webdataset shards): that is the stage's work."""
    path = str(config.caption.data)
    max_rows = max_rows_of(config.data, "clean")  # load_set cuts the clean set too
    if not path:
        clean = int(config.data.world.num_clean)
        return min(clean, max_rows) if max_rows else clean
    if any(p.startswith("tfds:") or is_shard_input(p) for p in split_inputs(path)):
        return None
    root = str(config.caption.image_root)
    return len(read_records(path, root, Skips(strict=False), max_rows, "clean"))


def prompt_token_ids(tokenizer: Tokenizer | CompactVocab, prompt: str) -> np.ndarray:
    """The prompt's token ids without [CLS] / [SEP]."""
    ids, mask = tokenizer.encode_batch([prompt], max_len=max(len(prompt), 1) + 2)
    return ids[0, 1 : int(mask[0].sum()) - 1].astype(np.int32)


def add_prompt(caption: str, prompt: str) -> str:
    """prompt + caption; a caption that already starts with the prompt keeps a single copy
    (otherwise the model learns to repeat the prompt after the prefilled one)."""
    return caption if caption.startswith(prompt) else prompt + caption


def with_prompt(ds: ImageTextSet, prompt: str) -> ImageTextSet:
    captions = [[add_prompt(c, prompt) for c in caps] for caps in ds.captions]
    return dataclasses.replace(ds, captions=captions)


def detokenize(text: str) -> str:
    """WordPiece decoding puts spaces around punctuation tokens: "medium - sized" ->
    "medium-sized", "don ' t" -> "don't"."""
    return re.sub(r"\s*([-'/])\s*", r"\1", text)


def build_captioner(
    config: ml_collections.ConfigDict, vocab_size: int, bos_id: int, max_len: int
) -> Captioner:
    """The plain captioner of `config.caption`; `max_len` = the decoder's positions."""
    cap = config.caption
    seed = int(config.seed)
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    encoder = make_image_encoder(
        cap.image, dict(cap.image_kwargs), int(config.data.image_size), rngs
    )
    decoder = TextDecoder(
        vocab_size,
        **decoder_kwargs(cap.decoder),
        max_len=max_len,
        image_dim=int(encoder.out_dim),
        rngs=rngs,
    )
    return Captioner(encoder, decoder, bos_id=bos_id)


def check_beam_fits(cap: ml_collections.ConfigDict, vocab_size: int) -> None:
    """A ConfigError where beam search (`caption.method='beam'`) keeps more beams than the
    caption vocabulary allows (each step draws 2 x beam_size candidates): the vocabulary is
    built from `caption.data`'s captions, so this is known only here, before the captioner
    trains, where it used to surface as a traceback from the decoder after training."""
    beam_size = int(cap.beam_size)
    if str(cap.method) == "beam" and 2 * beam_size > vocab_size:
        raise ConfigError(
            f"caption.beam_size={beam_size} with caption.method='beam': beam search needs a "
            f"vocabulary of at least {2 * beam_size} tokens, and the caption set's has "
            f"{vocab_size}; lower caption.beam_size to at most {vocab_size // 2}"
        )


def generate_texts(
    model: Captioner,
    images: np.ndarray,
    prompt_ids: np.ndarray,
    tokenizer: Tokenizer | CompactVocab,
    cap: ml_collections.ConfigDict,
    *,
    seed: int,
    row_offset: int = 0,
) -> list[str]:
    """Cleaned generated captions for uint8 images (N, H, W, 3), in order.

    Batches have one fixed shape (the last is padded) split over this process's devices, so
    the jitted decoder compiles once. Nucleus sampling draws from key(seed) folded with the
    batch's first global row (`row_offset` + local start): reproducible for a given batch size.
    """
    mesh = local_mesh()
    batch_size = round_up(int(cap.batch_size), mesh.size)
    method = str(cap.method)
    kwargs = dict(
        method=method,
        max_len=int(cap.max_len),
        beam_size=int(cap.beam_size),
        top_p=float(cap.top_p),
        temperature=float(cap.temperature),
        bos_id=tokenizer.cls_id,
        eos_id=tokenizer.sep_id,
        pad_id=tokenizer.pad_id,
    )
    texts: list[str] = []
    batches = padded_batches(len(images), batch_size)
    for b, idx in enumerate(
        progress.bar(batches, desc=f"{NAME} generate", disable=not dist.is_main())
    ):
        x = jax.device_put(normalize(images[idx]), data_sharding(mesh))
        rng = jax.random.fold_in(jax.random.key(seed), row_offset + b * batch_size)
        tokens = np.asarray(generate_captions(model, x, prompt_ids, rng=rng, **kwargs))
        n = min(batch_size, len(images) - b * batch_size)
        texts += [clean_caption(detokenize(t)) for t in tokenizer.decode_batch(tokens[:n])]
    return texts


def plot_samples(
    path: Path, images: np.ndarray, originals: list[str], generated: list[str]
) -> None:
    """A grid of uint8 images titled with their original and generated captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False)
    wrap = lambda s: "\n".join(textwrap.wrap(s, 38)[:3])
    for ax, img, orig, gen in zip(axes.flat, images, originals, generated, strict=False):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"original: {wrap(orig)}\ngenerated: {wrap(gen)}", fontsize=7, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(hspace=0.75)
    io.save_figure(fig, path)


def _covers(path: Path, ids: list[str]) -> dict[str, str] | None:
    """The file at path's captions of `ids` ({id: caption}) when it has every one, else
    None (ids it holds beyond `ids` are not counted as captioned)."""
    if not path.exists():
        return None
    got = io.read_json(path)
    return {i: got[i] for i in ids} if all(i in got for i in ids) else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    require_inputs(workdir, NAME)
    check_stage(config, workdir, NAME)  # this workdir's earlier runs: same settings and data
    out = stage_dir(workdir, NAME)
    cap = config.caption
    seed = int(config.seed)
    tokenizer = load_tokenizer(config.text.model_dir)
    prompt = str(cap.prompt)
    prompt_len = len(prompt_token_ids(tokenizer, prompt))
    # [CLS] prompt caption [SEP]: at most max_len - 1 caption tokens, as generation can emit.
    seq_len = prompt_len + int(cap.max_len) + 1

    # --- Train on the clean caption set.
    clean = with_prompt(load_set(cap.data, caption_data_config(config), "clean"), prompt)
    texts = [t for caps in clean.captions for t in caps]
    vocab = CompactVocab.cached(tokenizer, texts, seq_len, out / VOCAB_FILE)
    check_beam_fits(cap, vocab.vocab_size)  # before the captioner trains, not after
    prompt_ids = prompt_token_ids(vocab, prompt)
    model = build_captioner(config, vocab.vocab_size, vocab.cls_id, seq_len)

    def loss_fn(m: Captioner, batch: dict, train: bool) -> tuple[jax.Array, dict]:
        return m.loss(
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            prompt_len=prompt_len,
            train=train,
        )

    result = train_model(
        model,
        loss_fn,
        clean,
        vocab,
        cap.train,
        mesh=make_mesh(int(config.mesh.data), int(config.mesh.fsdp)),
        workdir=Path(workdir),
        ckpt_dir=out / "checkpoints",
        name=NAME,
        max_len=seq_len,
        seed=seed,
    )
    train_s = time.time() - t0

    # --- Caption every kept row (this process: its contiguous slice).
    t1 = time.time()
    train = load_train(config)
    kept = io.npz_arrays(Path(workdir) / "score" / "kept.npz", "ids", made_by="score")[0]
    kept_ids = [str(i) for i in kept]
    rows = rows_of(train.ids, kept_ids)
    final = out / "generated.json"
    generated = _covers(final, kept_ids)
    if generated is None:
        pid, count = jax.process_index(), jax.process_count()
        mine = process_slice(len(rows), pid, count)
        part = out / "parts" / f"generated-{pid:03d}-of-{count:03d}.json"
        my_ids = kept_ids[mine]
        with preemption.polling():
            if _covers(part, my_ids) is None:
                gen_model = local_model(result.model_def, result.state, local_mesh())
                texts = generate_texts(
                    gen_model, train.images[rows[mine]], prompt_ids, vocab, cap,
                    seed=seed, row_offset=mine.start,
                )  # fmt: skip
                io.write_json(part, dict(zip(my_ids, texts, strict=True)), indent=None)
        if preemption.requested():
            raise preemption.stop(f"{NAME} generation", result.steps)
        dist.barrier("caption-parts-written")
        generated = {}
        for p in range(count):
            generated.update(io.read_json(out / "parts" / f"generated-{p:03d}-of-{count:03d}.json"))
        generated = {i: generated[i] for i in kept_ids}
        if dist.is_main():
            io.write_json(final, generated, indent=None)
        dist.barrier("caption-parts-merged")  # every process has read every part
        if dist.is_main():  # merged: the per-process parts would only double the space
            shutil.rmtree(out / "parts", ignore_errors=True)
    generate_s = time.time() - t1

    texts = [generated[i] for i in kept_ids]
    originals = [train.captions[r][0] for r in rows]
    show = np.linspace(0, len(rows) - 1, num=min(16, len(rows))).astype(int) if len(rows) else []
    if dist.is_main() and len(show):
        plot_samples(
            out / "samples.png",
            train.images[rows[show]],
            [originals[i] for i in show],
            [texts[i] for i in show],
        )
    return {
        "steps": result.steps,
        "epochs": round(result.steps / max(result.steps_per_epoch, 1), 3),
        "resumed_from": result.resumed_from,
        "final_loss": result.metrics.get("loss"),
        # The training set whose kept rows are captioned (read and skipped as it was read).
        **data_counts(train),
        "caption_set": clean.source,
        "caption_rows_read": clean.rows_read,
        "caption_skipped": dict(clean.skipped),
        "caption_images": len(clean),
        "caption_pairs": sum(len(c) for c in clean.captions),
        "prompt": prompt,
        "vocab_size": vocab.vocab_size,
        "method": str(cap.method),
        "rows_captioned": len(generated),
        "empty_generations": sum(1 for t in texts if not t),
        "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 3) if texts else 0.0,
        "examples": [
            {"id": kept_ids[i], "original": originals[i], "generated": texts[i]} for i in show[:5]
        ],
        "time_s": {
            "train": round(train_s, 3),
            "generate": round(generate_s, 3),
            "total": round(time.time() - t0, 3),
        },
    }
