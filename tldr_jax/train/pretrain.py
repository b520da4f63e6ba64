"""Dual-encoder pre-training and retrieval evaluation: stages `pretrain` and `evaluate`.

Reads top to bottom like big_vision's train.py: data, model, state, mesh, loop, evaluation,
checkpoint, summary. The text side is the frozen pretrained BERT (MiniLM by default): its
embeddings are computed once per caption and cached, and a trainable projection head maps
them into the joint space (SPEC B.1), so a CPU run spends its time on the image tower.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tldr_jax.config_check import check_batch_fits
from tldr_jax.data.dataset import ImageTextSet, data_counts, load_set
from tldr_jax.data.pipeline import eval_batches, train_iterator
from tldr_jax.eval.retrieval import retrieval_metrics
from tldr_jax.models import make_image_encoder
from tldr_jax.models.bert import TextEncoder
from tldr_jax.models.heads import ProjectionHead
from tldr_jax.train import state as train_state
from tldr_jax.train.checkpoint import Checkpointer
from tldr_jax.train.losses import info_nce, l2_normalize, loss_at_chance
from tldr_jax.utils import dist, io, preemption, progress, signature
from tldr_jax.utils.mesh import data_sharding, make_mesh, replicated, shard_batch
from tldr_jax.utils.metrics import MetricLogger

log = logging.getLogger(__name__)


class DualEncoder(nnx.Module):
    """Image tower + projection, and a projection head over frozen text embeddings."""

    def __init__(
        self,
        image_encoder: nnx.Module,
        text_dim: int,
        embed_dim: int,
        *,
        head_dropout: float,
        temperature: float,
        learn_temperature: bool,
        rngs: nnx.Rngs,
    ):
        self.image_encoder = image_encoder
        img_dim = int(image_encoder.out_dim)
        out_dim = embed_dim or img_dim
        self.image_proj = nnx.Linear(img_dim, out_dim, rngs=rngs) if embed_dim else None
        self.text_head = ProjectionHead(text_dim, out_dim, dropout=head_dropout, rngs=rngs)
        log_scale = jnp.log(jnp.asarray(1.0 / temperature, jnp.float32))
        self.log_scale = nnx.Param(log_scale) if learn_temperature else nnx.Variable(log_scale)

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        feats = self.image_encoder(images, train=train)
        return self.image_proj(feats) if self.image_proj is not None else feats

    def encode_text(self, text_emb: jax.Array, *, train: bool = False) -> jax.Array:
        return self.text_head(text_emb, train=train)

    def logit_scale(self) -> jax.Array:
        # Clipped at 100 as in CLIP so a learned temperature cannot blow up the logits.
        return jnp.minimum(jnp.exp(self.log_scale[...]), 100.0)


def build_model(config: ml_collections.ConfigDict, text_dim: int, seed: int) -> DualEncoder:
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    m = config.model
    image_encoder = make_image_encoder(
        m.image, dict(m.image_kwargs), config.data.image_size, rngs=rngs
    )
    return DualEncoder(
        image_encoder,
        text_dim,
        int(m.embed_dim),
        head_dropout=float(m.head_dropout),
        temperature=float(m.temperature),
        learn_temperature=bool(m.learn_temperature),
        rngs=rngs,
    )


def contrastive_loss(model: DualEncoder, batch: dict, train: bool) -> tuple[jax.Array, dict]:
    img = model.encode_image(batch["image"], train=train)
    txt = model.encode_text(batch["text_emb"], train=train)
    loss = info_nce(img, txt, model.logit_scale())
    return loss, {"logit_scale": model.logit_scale()}


def flat_captions(ds: ImageTextSet) -> tuple[list[str], np.ndarray]:
    """All captions in one list, with the offset of each sample's first caption."""
    counts = np.array([len(c) for c in ds.captions], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return [c for caps in ds.captions for c in caps], offsets


def make_text_encoder(config: ml_collections.ConfigDict) -> TextEncoder:
    t = config.text
    return TextEncoder(t.model_dir, pooling=t.pooling, max_len=int(t.max_len))


def embed_captions(
    text_encoder: TextEncoder, captions: list[str], cache_dir: Path, batch_size: int
) -> np.ndarray:
    return text_encoder.embed_cached(captions, cache_dir, batch_size=batch_size)


# Module-level pure functions of (graphdef, state), so that every evaluation in a process (the
# retrieval comparison's runs, score's embeddings) reuses one compile per model structure and
# input shape. A jit made inside each call compiled again on every call, and an nnx.jit writing
# the model's state back changed its rng variables' sharding after the first batch, which
# compiled the second batch (and the next call) again.
@functools.partial(jax.jit, static_argnums=0)
def _encode_images(graphdef: Any, state: Any, x: jax.Array) -> jax.Array:
    return l2_normalize(nnx.merge(graphdef, state).encode_image(x, train=False))


@functools.partial(jax.jit, static_argnums=0)
def _encode_texts(graphdef: Any, state: Any, t: jax.Array) -> jax.Array:
    return l2_normalize(nnx.merge(graphdef, state).encode_text(t, train=False))


def embed_images(model: DualEncoder, ds: ImageTextSet, batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings of every image in `ds`, in order."""
    graphdef, state = nnx.split(model)
    out = []
    for batch in eval_batches(ds, batch_size):
        emb = _encode_images(graphdef, state, jnp.asarray(batch["image"]))
        out.append(np.asarray(emb)[batch["valid"]])
    return np.concatenate(out)


def embed_texts(model: DualEncoder, text_emb: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """L2-normalised joint-space embeddings of frozen text-encoder embeddings."""
    graphdef, state = nnx.split(model)
    return np.concatenate(
        [
            np.asarray(_encode_texts(graphdef, state, jnp.asarray(text_emb[s : s + batch_size])))
            for s in range(0, len(text_emb), batch_size)
        ]
    )


def evaluate_retrieval(
    model: DualEncoder, test: ImageTextSet, test_text_emb: np.ndarray
) -> dict[str, float]:
    """Embeds every test image and caption and computes recall@1/5/10 both ways."""
    txt2img = np.repeat(np.arange(len(test)), [len(c) for c in test.captions])
    return retrieval_metrics(embed_images(model, test), embed_texts(model, test_text_emb), txt2img)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    train: ImageTextSet,
    test: ImageTextSet,
    text_encoder: TextEncoder,
    *,
    num_steps: int | None = None,
    name: str = "pretrain",
    diverged_remedy: str | None = None,
    summary_file: str = "",
) -> tuple[dict[str, Any], DualEncoder]:
    """Trains a dual encoder from scratch (or resumes) on `train`; evaluates on `test`.

    `num_steps` overrides config.train.epochs (used to give subsets the same step budget).
    Checkpoints go to workdir/checkpoints; metrics to workdir/metrics/<name>.csv|png.
    Returns the summary and the trained model. A run that diverges stops with a ConfigError
    (`train_state.check_finite`); `diverged_remedy` says what to do besides lowering
    `train.lr` (default: a new workdir, or delete workdir/checkpoints). `summary_file`: the
    summary the end of this run writes in workdir, removed when there are steps left to
    train (until it is written again, the workdir's run is unfinished: `run_evaluate`).
    """
    workdir = Path(workdir)
    remedy = diverged_remedy or train_state.checkpoints_remedy(workdir / "checkpoints")
    cache_dir = Path(config.get("cache_dir", "") or workdir / "cache")
    seed = int(config.seed)
    tc = config.train
    batch_size = int(tc.batch_size)
    check_batch_fits(len(train), batch_size, "train.batch_size")

    # --- Text embeddings (frozen encoder, computed once, cached).
    t0 = time.time()
    train_caps, train_off = flat_captions(train)
    test_caps, _ = flat_captions(test)
    tb = int(config.text.batch_size)
    train_txt = embed_captions(text_encoder, train_caps, cache_dir, tb)
    test_txt = embed_captions(text_encoder, test_caps, cache_dir, tb)
    text_s = time.time() - t0

    # --- Mesh, model, optimiser, state.
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    steps_per_epoch = len(train) // batch_size
    total = int(num_steps) if num_steps else int(tc.epochs) * steps_per_epoch
    model = build_model(config, train_txt.shape[1], seed)
    model_def, params, rest = train_state.split_model(model)
    tx = train_state.make_optimizer(tc, total, steps_per_epoch, block="train")
    state = train_state.init_state(params, rest, tx)
    shardings = train_state.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step_fn = jax.jit(
        train_state.make_train_step(model_def, tx, contrastive_loss, seed),
        in_shardings=(shardings, data_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

    data_iter = train_iterator(train, batch_size, seed)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=int(tc.get("keep", 2)), sweep_tmp=True)
    start = ckpt.latest_step() or 0
    last_loss = None  # the loss of the latest step (kept in the checkpoint for reruns)
    if start:
        state, extra = ckpt.restore(start, state, data_iter=data_iter)
        last_loss = (extra or {}).get("loss")
        log.info("%s: resumed from step %d", name, start)
    logger = MetricLogger(workdir, name, resume_step=start)
    if summary_file and start < total and dist.is_main():
        (workdir / summary_file).unlink(missing_ok=True)

    # --- Train loop.
    t0 = time.time()
    ckpt_every = int(tc.get("ckpt_every", 0)) or total
    log_every = max(int(tc.get("log_every", 50)), 1)
    metrics: dict[str, Any] = {}
    pbar = progress.bar(range(start, total), desc=name, disable=not dist.is_main(), leave=False)
    with preemption.polling():
        for step in pbar:
            batch = next(data_iter)
            text_emb = train_txt[train_off[batch["index"]] + batch["caption_index"]]
            global_batch = shard_batch({"image": batch["image"], "text_emb": text_emb}, mesh)
            state, metrics = step_fn(state, global_batch)
            done = step + 1
            if done % log_every == 0 or done == total:
                scalars = {k: float(v) for k, v in metrics.items()}
                train_state.check_finite(name, done, "train", tc, remedy, loss=scalars["loss"])
                logger.log(done, **scalars)
                pbar.set_postfix(loss=f"{scalars['loss']:.3f}", refresh=False)
            stop = preemption.agreed()
            if done % ckpt_every == 0 or done == total or stop:
                last_loss = float(metrics["loss"])
                train_state.check_finite(
                    name, done, "train", tc, remedy, loss=last_loss, params=state["params"]
                )
                extra = {"name": name, "loss": last_loss}
                ckpt.save(done, state, extra=extra, data_iter=data_iter)
            if stop:
                logger.close()
                raise preemption.stop(name, done)
    train_s = time.time() - t0
    logger.close()
    # The state evaluated (also one restored finished: a rerun runs no step).
    train_state.check_finite(name, max(start, total), "train", tc, remedy, params=state["params"])

    # --- Evaluation.
    t0 = time.time()
    model = model_def.merge(state["params"], state["rest"])
    recall = evaluate_retrieval(model, test, test_txt)
    ckpt.close()
    final_loss = float(metrics["loss"]) if metrics else last_loss
    # Finite but dead: every logit alike at the end (an lr far too high blows the scale-
    # invariant encoders up and freezes them; data that tells no pair from another). Its
    # recall is chance's, and a scorer's scores mean nothing.
    at_chance = final_loss is not None and loss_at_chance(final_loss, batch_size, above=False)
    if at_chance:
        log.warning(
            "%s: the final training loss %.4f is at chance (log %d = %.4f): the model "
            "tells no training pair from another. Lower train.lr (an lr far too high blows "
            "the encoders up and freezes them), train longer, or check the data (identical "
            "images or captions?)",
            name,
            final_loss,
            batch_size,
            math.log(batch_size),
        )
    summary = {
        **recall,
        "steps": total,
        "epochs": round(total / max(steps_per_epoch, 1), 3),
        "batch_size": batch_size,
        "train_pairs": len(train),
        "test_images": len(test),
        "test_captions": len(test_caps),
        "final_loss": final_loss,  # the last step's
        "loss_at_chance": at_chance,
        "resumed_from": start,  # the step this run started at (0: from scratch)
        "time_s": {"text_embed": text_s, "train": train_s, "eval": time.time() - t0},
    }
    return summary, model


def data_summary(train: ImageTextSet, test: ImageTextSet) -> dict[str, Any]:
    """The training set's counts as every stage's summary gives them (`data_counts`: rows
    read, usable records, rows skipped per reason, captions dropped; `skipped_train` is
    `skipped` under its older name), the test set's beside them (`test_*`, `skipped_test`;
    `test_images` / `test_captions`: the images and captions it scores), and the sources."""
    counts = data_counts(train)
    return {
        **counts,
        "skipped_train": dict(counts["skipped"]),
        **eval_set_counts(test),
        "train_source": train.source,
        "test_source": test.source,
    }


def eval_set_counts(test: ImageTextSet) -> dict[str, Any]:
    """The test set's counts in a summary: rows read and skipped, captions dropped, and the
    images and captions retrieval is scored on (rows showing one image are one image)."""
    return {
        "test_images": len(test),
        "test_captions": sum(len(c) for c in test.captions),
        "test_rows_read": test.rows_read,
        "skipped_test": dict(test.skipped),
        "test_captions_dropped": test.captions_dropped,
    }


# What a pretrain checkpoint is made from (with the training pairs' fingerprint): a rerun
# resumes it only with these the same. The test set is read only to evaluate at the end.
SIGNATURE_KEYS = ("model", "train", "text.model_dir", "text.pooling", "text.max_len", "seed")
# What `evaluate` needs to restore the checkpoint it evaluates.
EVALUATE_KEYS = ("model", "text.model_dir", "text.pooling", "text.max_len", "data.image_size")


def signature_path(workdir: str | Path) -> Path:
    return Path(workdir) / "pretrain.signature.json"


def pretrain_signature(config: ml_collections.ConfigDict, train: ImageTextSet) -> dict[str, Any]:
    world = ("data.world",) if not config.data.train else ()
    keys = (*SIGNATURE_KEYS, "data.image_size", "data.max_rows", "data.image_root", *world)
    data = signature.pair_fingerprint(train.ids, train.captions)
    return {
        **signature.config_values(config, keys),
        **{f"train_data.{k}": v for k, v in data.items()},
    }


def _checkpointed(workdir: str | Path) -> bool:
    """Whether W/checkpoints holds a step (what a rerun would resume)."""
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resume(
    config: ml_collections.ConfigDict, workdir: str | Path, train: ImageTextSet
) -> None:
    """Before training: a checkpoint in W/checkpoints made with other settings or data than
    this run's is refused (one line naming each changed key); this run's signature is then
    recorded. A checkpoint from before signatures is taken as made with these (a warning)."""
    path = signature_path(workdir)
    want = pretrain_signature(config, train)
    have = signature.read(path)
    if _checkpointed(workdir):
        if have is None:
            log.warning(
                "pretrain: %s has no %s (made before signatures were recorded): resuming it "
                "as made with this run's settings",
                Path(workdir) / "checkpoints",
                path.name,
            )
        else:
            diff = signature.differences(have, want, known_only=True)
            if diff:
                raise signature.refusal([Path(workdir) / "checkpoints"], diff)
    if have != signature.jsonable(want):
        signature.write(path, want)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`tldr-jax pretrain`: train a dual encoder, evaluate retrieval, write pretrain.json."""
    train = load_set(config.data.train, config.data, "train")
    check_resume(config, workdir, train)  # before the test set is read or anything is built
    test = load_set(config.data.test, config.data, "test")
    result, _ = train_and_evaluate(
        config, workdir, train, test, make_text_encoder(config), summary_file="pretrain.json"
    )
    return {**result, **data_summary(train, test)}


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`tldr-jax evaluate`: restore the latest checkpoint in workdir and evaluate it."""
    workdir_p = Path(workdir)
    # Orbax makes the folder it is given: only where there is a step to restore.
    ckpt = Checkpointer(workdir_p / "checkpoints") if _checkpointed(workdir_p) else None
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint under {workdir_p / 'checkpoints'}: run `tldr-jax pretrain` on this "
            "workdir first"
        )
    have = signature.read(signature_path(workdir_p))
    if have is not None:  # a model built otherwise than the checkpoint's: one line, not Orbax's
        want = signature.config_values(config, EVALUATE_KEYS)
        diff = signature.differences(
            {k: v for k, v in have.items() if k in want}, want, known_only=True
        )
        if diff:
            ckpt.close()
            raise signature.refusal(
                [workdir_p / "checkpoints"],
                diff,
                "Evaluate it with the settings it was trained with.",
            )
    test = load_set(config.data.test, config.data, "test")
    text_encoder = make_text_encoder(config)
    test_caps, _ = flat_captions(test)
    cache_dir = Path(config.get("cache_dir", "") or workdir_p / "cache")
    test_txt = embed_captions(text_encoder, test_caps, cache_dir, int(config.text.batch_size))
    model = build_model(config, test_txt.shape[1], int(config.seed))
    model_def, params, rest = train_state.split_model(model)
    # The model only: the optimizer state (any train.optimizer / grad_clip) is not read.
    state = ckpt.restore_part(step, {"params": params, "rest": rest})
    ckpt.close()
    model = model_def.merge(state["params"], state["rest"])
    recall = evaluate_retrieval(model, test, test_txt)
    # pretrain.json is written when training ends: without it the checkpoint is of a run
    # stopped on the way (Ctrl-C, preemption), which a rerun of pretrain finishes.
    finished = workdir_p / "pretrain.json"
    planned = int(io.read_json(finished).get("steps", step)) if finished.is_file() else None
    if planned is None or step < planned:
        log.warning(
            "evaluate: the checkpoint at step %d is of a training run that has not finished "
            "(%s); rerun pretrain on %s to finish it",
            step,
            f"{planned} steps planned" if planned else f"no {finished.name}",
            workdir_p,
        )
    return {
        **recall,
        "checkpoint_step": int(step),
        "training_finished": planned is not None and step >= planned,
        "rows_read": test.rows_read,
        "skipped": dict(test.skipped),
        "captions_dropped": test.captions_dropped,
        "test_source": test.source,
        "test_images": len(test),
        "test_captions": len(test_caps),
    }
