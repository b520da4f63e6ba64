"""Stage `train-captioner`: the codebook captioner trained on the training set itself (SPEC A.1).

ViT tokens (CLS + patches) -> linear to the code dimension -> vector quantizer -> causal text
decoder cross-attending to the quantized tokens; loss = LM cross-entropy + VQ loss. The code
sequences it assigns are what the `extract` stage writes and `select` clusters.

The training loop here (`train_model`) is shared with the `caption` stage's plain captioner:
one jitted, sharded step from `tldr_jax.train.state`, Orbax checkpoints with the data iterator,
metrics CSV/PNG, tqdm, and a checkpoint-then-stop on SIGTERM, like `train/pretrain.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh

from tldr_jax.compress.common import check_stage, data_counts, load_train, stage_dir
from tldr_jax.config_check import ConfigError, check_batch_fits
from tldr_jax.data.dataset import ImageTextSet
from tldr_jax.data.pipeline import train_iterator
from tldr_jax.data.tokenizer import Tokenizer, load_tokenizer
from tldr_jax.models import make_image_encoder
from tldr_jax.models.captioner import CodebookCaptioner, TextDecoder
from tldr_jax.models.vq import VectorQuantizer
from tldr_jax.train import state as train_state
from tldr_jax.train.checkpoint import Checkpointer
from tldr_jax.utils import dist, io, preemption, progress
from tldr_jax.utils.mesh import DATA_AXES, data_sharding, make_mesh, replicated, shard_batch
from tldr_jax.utils.metrics import MetricLogger

log = logging.getLogger(__name__)

NAME = "train-captioner"
VOCAB_FILE = "vocab.json"
# Metrics entry that carries the model's updated non-Param state out of the step (see below).
_REST_KEY = "_rest"


# -- a vocabulary restricted to the corpus --------------------------------------------------------


class CompactVocab:
    """The tokenizer restricted to the token ids that occur in a caption corpus (+ specials).

    Why: the decoder's vocabulary projection and its gradient scale with the vocabulary. A
    30522-token BERT vocabulary makes them ~80% of a small captioner's step, while a caption
    set uses a fraction of it (the embedded world: ~100 word pieces). Softmax over tokens that
    never occur as targets only learns to push them down, so dropping them changes nothing the
    model can use. Duck-types `Tokenizer` (`encode_batch`, `decode`, `decode_batch`, special
    ids, `vocab_size`), so `train_iterator` and generation take it as is.
    """

    def __init__(self, tokenizer: Tokenizer, token_ids: Any):
        specials = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id)
        self.tokenizer = tokenizer
        self.full_ids = np.unique(np.concatenate([np.asarray(token_ids, np.int64), specials]))
        self._compact = np.full(tokenizer.vocab_size, -1, np.int32)
        self._compact[self.full_ids] = np.arange(len(self.full_ids), dtype=np.int32)
        self.vocab_size = len(self.full_ids)
        self.pad_id, self.cls_id, self.sep_id = (int(self._compact[i]) for i in specials)

    @classmethod
    def from_texts(
        cls, tokenizer: Tokenizer, texts: list[str], max_len: int, batch: int = 8192
    ) -> CompactVocab:
        """The ids that `texts` tokenize to at `max_len` (truncated tails do not count)."""
        seen = [np.zeros(0, np.int64)]
        for start in range(0, len(texts), batch):
            ids, mask = tokenizer.encode_batch(texts[start : start + batch], max_len)
            seen.append(np.unique(ids[mask > 0]))
        return cls(tokenizer, np.concatenate(seen))

    @classmethod
    def cached(
        cls, tokenizer: Tokenizer, texts: list[str], max_len: int, path: Path
    ) -> CompactVocab:
        """from_texts, stored at `path` (JSON list of tokenizer ids) so that a resumed run and
        later stages rebuild the same decoder shape without re-tokenizing the corpus."""
        digest = hashlib.sha256("\n".join(texts).encode("utf-8", "surrogateescape")).hexdigest()
        source = path.with_name(path.name + ".texts-sha256")  # what the vocabulary was built from
        if path.exists():
            if source.exists() and source.read_text(encoding="utf-8").strip() != digest:
                raise ConfigError(
                    f"{path} was built from other captions than this run's: the workdir "
                    f"belongs to another data set or caption set. Use a new workdir, or delete "
                    f"{path.parent} to train this stage again."
                )
            return cls(tokenizer, io.read_json(path))
        vocab = cls.from_texts(tokenizer, texts, max_len)
        if dist.is_main():
            io.write_json(path, vocab.full_ids.tolist(), indent=None)
            io.write_text(source, digest + "\n")
        return vocab

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer.encode_batch(texts, max_len)
        compact = self._compact[ids]
        if (compact < 0).any():
            unknown = sorted(set(ids[compact < 0].tolist()))
            raise ValueError(f"token ids {unknown[:5]} are outside the compact vocabulary")
        return compact, mask

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(self.full_ids[np.asarray(ids)])

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        return self.tokenizer.decode_batch(self.full_ids[np.asarray(ids)])


# -- models ---------------------------------------------------------------------------------------


def decoder_kwargs(cfg: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
    """A config `decoder` block as TextDecoder keyword arguments (`heads` -> `num_heads`)."""
    kwargs = dict(cfg)
    if "heads" in kwargs:
        kwargs["num_heads"] = kwargs.pop("heads")
    return kwargs


def build_codebook_captioner(
    config: ml_collections.ConfigDict, vocab_size: int, bos_id: int
) -> CodebookCaptioner:
    """The codebook captioner of `config.captioner` at `config.data.image_size`."""
    c = config.captioner
    seed = int(config.seed)
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, revive=seed + 2)
    encoder = make_image_encoder(c.image, dict(c.image_kwargs), int(config.data.image_size), rngs)
    quantizer = VectorQuantizer(
        int(c.num_codes),
        int(c.code_dim),
        beta=float(c.beta),
        loss_form=str(c.vq_loss),
        ema_decay=float(c.ema_decay),
        revive_threshold=float(c.revive_threshold),
        rngs=rngs,
    )
    decoder = TextDecoder(
        vocab_size,
        **decoder_kwargs(c.decoder),
        max_len=int(c.max_len) + 2,
        image_dim=int(c.code_dim),
        rngs=rngs,
    )
    return CodebookCaptioner(
        encoder,
        quantizer,
        decoder,
        token_dim=int(encoder.out_dim),
        vq_weight=float(c.vq_weight),
        bos_id=bos_id,
        rngs=rngs,
    )


def codebook_loss(model: CodebookCaptioner, batch: dict, train: bool) -> tuple[jax.Array, dict]:
    return model.loss(batch["image"], batch["input_ids"], batch["attention_mask"], train=train)


def tokens_per_image(model: CodebookCaptioner, image_size: int) -> int:
    shape = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return int(jax.eval_shape(model.codes, shape).shape[1])


# -- a train step that keeps non-Param state ------------------------------------------------------


def keep_state_updates(loss_fn: train_state.LossFn) -> train_state.LossFn:
    """Wraps a loss so that in-place updates of non-Param variables (the EMA codebook) survive.

    `make_train_step` merges the model from the step's traced state *outside* its
    `value_and_grad`, and `nnx.merge` reuses those Variable objects, so a module that assigns
    to a variable inside the loss raises a TraceContextError. The wrapper runs the loss on a
    copy created at the gradient's trace level and returns the copy's updated non-Param state
    in the metrics, where `make_step` puts it back into the train state.
    """

    def wrapped(model: nnx.Module, batch: dict, train: bool) -> tuple[jax.Array, dict]:
        fresh = nnx.merge(*nnx.split(model), copy=True)
        loss, metrics = loss_fn(fresh, batch, train)
        _, _, _, rest = nnx.split(fresh, nnx.Param, nnx.RngState, ...)
        return loss, {**metrics, _REST_KEY: rest}

    return wrapped


def make_step(
    model_def: train_state.ModelDef, tx: Any, loss_fn: train_state.LossFn, seed: int
) -> Any:
    """`train_state.make_train_step` whose state["rest"] follows the model's own updates."""
    inner = train_state.make_train_step(model_def, tx, keep_state_updates(loss_fn), seed)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        state, metrics = inner(state, batch)
        rest = metrics.pop(_REST_KEY)
        return {**state, "rest": rest}, metrics

    return step


# -- the shared training loop ---------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    model_def: train_state.ModelDef
    state: dict  # the final train state (sharded on the training mesh)
    steps: int
    steps_per_epoch: int
    metrics: dict[str, float]  # means over the last logged window
    train_s: float
    resumed_from: int


def train_model(
    model: nnx.Module,
    loss_fn: train_state.LossFn,
    ds: ImageTextSet,
    tokenizer: Tokenizer | CompactVocab,
    tc: ml_collections.ConfigDict,
    *,
    mesh: Mesh,
    workdir: Path,
    ckpt_dir: Path,
    name: str,
    max_len: int,
    seed: int,
) -> TrainResult:
    """Trains (or resumes) a captioner on (image, random caption of the image) batches.

    Captions are tokenized to `max_len`; `tc` is a `train` config block (optimizer, lr,
    schedule, batch_size, epochs, log_every, ckpt_every, keep). Metrics go to
    workdir/metrics/<name>.csv|png, checkpoints (state + data iterator) to ckpt_dir.
    """
    batch_size = int(tc.batch_size)
    key = {"caption": "caption.train", NAME: "captioner.train"}.get(name, name)
    check_batch_fits(len(ds), batch_size, f"{key}.batch_size")
    remedy = train_state.checkpoints_remedy(ckpt_dir)
    steps_per_epoch = len(ds) // batch_size
    total = int(tc.epochs) * steps_per_epoch

    model_def, params, rest = train_state.split_model(model)
    tx = train_state.make_optimizer(tc, total, steps_per_epoch, block=key)
    state = train_state.init_state(params, rest, tx)
    # Leaves may alias one buffer (the EMA quantizer starts its codebook and ema_sum from the
    # same array), which buffer donation rejects: give every leaf its own copy.
    state = jax.tree.map(jnp.copy, state)
    shardings = train_state.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step_fn = jax.jit(
        make_step(model_def, tx, loss_fn, seed),
        in_shardings=(shardings, data_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

    data_iter = train_iterator(ds, batch_size, seed, tokenizer=tokenizer, max_len=max_len)
    ckpt = Checkpointer(ckpt_dir, max_to_keep=int(tc.get("keep", 2)), sweep_tmp=True)
    start = ckpt.latest_step() or 0
    last: dict[str, float] = {}
    # Metrics of the steps since the last log (device arrays until fetched). A checkpoint
    # keeps those fetched as floats, so a resumed run logs the same window means as one
    # that ran straight through.
    window: list[dict] = []
    if start:
        state, extra = ckpt.restore(start, state, data_iter=data_iter)
        last = dict(extra.get("metrics", {}))
        window = list(extra.get("window", []))
        log.info("%s: resumed from step %d", name, start)
    logger = MetricLogger(workdir, name, resume_step=start)

    t0 = time.time()
    ckpt_every = int(tc.get("ckpt_every", 0)) or total
    log_every = max(int(tc.get("log_every", 50)), 1)
    pbar = progress.bar(range(start, total), desc=name, disable=not dist.is_main(), leave=False)
    with preemption.polling():
        for step in pbar:
            batch = next(data_iter)
            keys = ("image", "input_ids", "attention_mask")
            state, metrics = step_fn(state, shard_batch({k: batch[k] for k in keys}, mesh))
            window.append(metrics)
            done = step + 1
            if done % log_every == 0 or done == total:
                fetched = jax.device_get(window)
                # float64 means of the float32 values: the same whether fetched now or read
                # back from a checkpoint.
                last = {k: float(np.mean([float(m[k]) for m in fetched])) for k in fetched[0]}
                window = []
                train_state.check_finite(name, done, key, tc, remedy, loss=last["loss"])
                logger.log(done, **last)
                pbar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
            stop = preemption.agreed() and done < total
            if done % ckpt_every == 0 or done == total or stop:
                loss = float(metrics["loss"])  # this step's: the log window may be older
                train_state.check_finite(
                    name, done, key, tc, remedy, loss=loss, params=state["params"]
                )
                window = [{k: float(v) for k, v in m.items()} for m in jax.device_get(window)]
                extra = {"name": name, "metrics": last, "window": window}
                ckpt.save(done, state, extra=extra, data_iter=data_iter)
            if stop:
                logger.close()
                ckpt.close()
                raise preemption.stop(name, done)
    logger.close()
    ckpt.close()
    # The state handed on (also one restored finished: a rerun runs no step).
    train_state.check_finite(name, max(start, total), key, tc, remedy, params=state["params"])
    return TrainResult(
        model_def, state, total, steps_per_epoch, last, time.time() - t0, resumed_from=start
    )


# -- restoring and running a trained model on this process's devices ------------------------------


def restore_latest(
    model: nnx.Module, tc: ml_collections.ConfigDict, ckpt_dir: Path, mesh: Mesh
) -> tuple[train_state.ModelDef, dict, int]:
    """(model_def, train state, step) of the latest checkpoint in ckpt_dir."""
    ckpt = Checkpointer(ckpt_dir)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
    model_def, params, rest = train_state.split_model(model)
    target = train_state.init_state(params, rest, train_state.make_optimizer(tc, 1))
    target = jax.device_put(target, train_state.state_shardings(target, mesh))
    state, _ = ckpt.restore(step, target)
    ckpt.close()
    return model_def, state, int(step)


def restore_codebook_captioner(
    config: ml_collections.ConfigDict, workdir: str | Path, mesh: Mesh
) -> tuple[train_state.ModelDef, dict, int]:
    """(model_def, train state, step) of this stage's latest checkpoint in `workdir`."""
    stage = Path(workdir) / NAME
    if not (stage / VOCAB_FILE).exists():
        raise FileNotFoundError(f"no {stage / VOCAB_FILE}; run `train-captioner` first")
    tokenizer = load_tokenizer(config.text.model_dir)
    vocab = CompactVocab(tokenizer, io.read_json(stage / VOCAB_FILE))
    model = build_codebook_captioner(config, vocab.vocab_size, vocab.cls_id)
    return restore_latest(model, config.captioner.train, stage / "checkpoints", mesh)


def local_mesh() -> Mesh:
    """A ('data', 'fsdp') mesh over this process's devices only.

    Inference stages split the *rows* across processes, so each process runs its own
    computations without lockstep collectives with the others.
    """
    devices = jax.local_devices()
    return jax.make_mesh(
        (len(devices), 1), DATA_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def local_model(model_def: train_state.ModelDef, state: dict, mesh: Mesh) -> nnx.Module:
    """The trained module with its variables replicated on `mesh` (a process-local mesh)."""
    params, rest = state["params"], state["rest"]
    if jax.process_count() > 1:  # FSDP shards may live on other hosts: gather them
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
    else:
        params, rest = jax.device_get((params, rest))
    params, rest = jax.device_put((params, rest), replicated(mesh))
    return model_def.merge(params, rest)


def padded_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of exactly batch_size (the last padded by repeating its last row),
    so a jitted function compiles once; callers keep the first min(batch_size, rest) outputs."""
    out = []
    for start in range(0, num_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, num_rows))
        out.append(np.pad(rows, (0, batch_size - len(rows)), mode="edge"))
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- the stage ------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    check_stage(config, workdir, NAME)  # this workdir's earlier run: same settings and data
    out = stage_dir(workdir, NAME)
    c = config.captioner
    train = load_train(config)
    captions = [t for caps in train.captions for t in caps]
    vocab = CompactVocab.cached(
        load_tokenizer(config.text.model_dir), captions, int(c.max_len), out / VOCAB_FILE
    )
    model = build_codebook_captioner(config, vocab.vocab_size, vocab.cls_id)
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    result = train_model(
        model,
        codebook_loss,
        train,
        vocab,
        c.train,
        mesh=mesh,
        workdir=Path(workdir),
        ckpt_dir=out / "checkpoints",
        name=NAME,
        max_len=int(c.max_len),
        seed=int(config.seed),
    )
    m = result.metrics
    return {
        "steps": result.steps,
        "epochs": round(result.steps / max(result.steps_per_epoch, 1), 3),
        "steps_per_epoch": result.steps_per_epoch,
        "resumed_from": result.resumed_from,
        "batch_size": int(c.train.batch_size),
        "train_rows": len(train),
        "final_loss": m.get("loss"),
        "final_lm_loss": m.get("lm_loss"),
        "final_vq_loss": m.get("vq_loss"),
        "perplexity": m.get("perplexity"),
        "code_usage": m.get("usage"),
        "vocab_size": vocab.vocab_size,
        "num_codes": int(c.num_codes),
        "code_dim": int(c.code_dim),
        "vq_loss_form": str(c.vq_loss),
        "tokens_per_image": tokens_per_image(model, int(config.data.image_size)),
        **data_counts(train),
        "time_s": {"train": round(result.train_s, 3), "total": round(time.time() - t0, 3)},
    }
