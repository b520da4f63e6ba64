"""Expert trajectories for trajectory matching: stage `buffer` (SPEC B.2).

N experts train on the real set with plain SGD; after every epoch (epoch 0 = the initial
weights) the trainable parameters are snapshotted as one flat vector per modality (image
encoder, text head). The text side is the frozen text encoder's cached embeddings through a
trainable projection head, so an expert is the same pure function of two flat vectors as a
distillation student (`student.Student`), and the same jitted SGD code trains both experts
and evaluation models.

Layout: one Orbax checkpoint directory per expert, W/buffer/expert_NNN, whose step is the number
of finished epochs and whose state is {"img": (E+1, P_img), "txt": (E+1, P_txt),
"correct": (E+1, N) bool} (rows past the step are still zero). "correct" records, for the
forgetting coreset, whether each training pair was retrieved at rank 1 both ways inside its
own minibatch during that epoch's forward pass (row 0: before training, all False). A rerun
resumes at the first unfinished expert / epoch; the per-epoch data order and dropout keys are
functions of (seed, expert, epoch), so a resumed run writes the same vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from tldr_jax.config_check import ConfigError, check_contrastive_set
from tldr_jax.data.dataset import ImageTextSet, load_set
from tldr_jax.data.imagestore import NormalizedRows
from tldr_jax.distill.matching import LOGIT_SCALE, all_finite, contrastive_loss
from tldr_jax.distill.student import Student, flatten_params, make_student
from tldr_jax.eval.retrieval import RECALL_KEYS, retrieval_metrics
from tldr_jax.models import encoder_kwargs, make_image_encoder
from tldr_jax.models.heads import ProjectionHead
from tldr_jax.train import pretrain
from tldr_jax.train.checkpoint import Checkpointer
from tldr_jax.train.losses import l2_normalize, loss_at_chance
from tldr_jax.utils import dist, preemption, progress, signature
from tldr_jax.utils.mesh import make_mesh, replicated, shard_batch
from tldr_jax.utils.metrics import MetricLogger

log = logging.getLogger(__name__)

Params = tuple[jax.Array, jax.Array]
# An expert whose parameter norm grew more than this from its start blew up (buffer.lr).
PARAMS_BLOWUP = 100.0


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class PairData:
    """The real train / test pairs as the distillation stages consume them.

    A train pair is one (image, caption): a train record with several captions (a Karpathy
    eval-style row, the original Karpathy `dataset_*.json`, TFDS `coco_captions`) gives one
    pair per caption, its image repeated, as the reference's one-row-per-caption Karpathy
    train files do. train_images: normalised float32 (N, H, W, 3), a view that normalises the
    rows it is indexed with (pairs of one image share its uint8 copy); train_txt: (N, D) frozen
    text embedding of each pair's caption; train_pair_ids: each pair's id
    (`ImageTextSet.pairs`); pair_record: each pair's row in `train`;
    test_txt: every test caption's embedding; txt2img its image.
    """

    train: ImageTextSet
    test: ImageTextSet
    train_images: NormalizedRows
    train_txt: np.ndarray
    train_captions: list[str]
    train_pair_ids: list[str]
    test_images: NormalizedRows
    test_txt: np.ndarray
    txt2img: np.ndarray
    pair_record: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.train_txt)


def load_pairs(config: ml_collections.ConfigDict, workdir: str | Path) -> PairData:
    train = load_set(config.data.train, config.data, "train")
    test = load_set(config.data.test, config.data, "test")
    cache_dir = Path(config.get("cache_dir", "") or Path(workdir) / "cache")
    encoder = pretrain.make_text_encoder(config)
    pairs, pair_record = train.pairs()
    train_caps = [caps[0] for caps in pairs.captions]
    test_caps, _ = pretrain.flat_captions(test)
    tb = int(config.text.batch_size)
    return PairData(
        train=train,
        test=test,
        train_images=NormalizedRows(pairs.images),
        train_txt=pretrain.embed_captions(encoder, train_caps, cache_dir, tb),
        train_captions=train_caps,
        train_pair_ids=pairs.ids,
        test_images=NormalizedRows(test.images),
        test_txt=pretrain.embed_captions(encoder, test_caps, cache_dir, tb),
        txt2img=np.repeat(np.arange(len(test)), [len(c) for c in test.captions]),
        pair_record=pair_record,
    )


# --------------------------------------------------------------------------- model


def _modules(config: ml_collections.ConfigDict, text_dim: int, seed: int) -> tuple[Any, Any]:
    m = config.model
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    image = make_image_encoder(m.image, dict(m.image_kwargs), int(config.data.image_size), rngs)
    head = ProjectionHead(text_dim, int(image.out_dim), dropout=float(m.head_dropout), rngs=rngs)
    return image, head


def build_student(config: ml_collections.ConfigDict, text_dim: int) -> Student:
    """The image encoder + text head of `config.model` as a pure `Student`."""
    return make_student(*_modules(config, text_dim, 0))[0]


def init_params(config: ml_collections.ConfigDict, text_dim: int, seed: int) -> Params:
    """Fresh initial (image, text) flat parameters for a model seeded with `seed`."""
    image, head = _modules(config, text_dim, seed)
    return flatten_params(image), flatten_params(head)


def _batch_feeder(
    mesh: Mesh, batch: int
) -> Callable[[np.ndarray | NormalizedRows, np.ndarray], jax.Array]:
    """(host rows, batch_idx) -> the minibatch as a global array split over the mesh.

    Every process holds the rows on the host and passes only its own contiguous share of the
    minibatch (`shard_batch`: process-local data -> one global array, as a Grain
    ShardByJaxProcess pipeline feeds it), so nothing is replicated on devices. A batch that
    does not divide over the devices is put whole on every device (replicated) instead.
    """
    num_proc = jax.process_count()
    if batch % mesh.devices.size == 0 and mesh.devices.size % num_proc == 0:
        me = jax.process_index()

        def feed(rows: np.ndarray | NormalizedRows, idx: np.ndarray) -> jax.Array:
            local = np.asarray(idx).reshape(num_proc, -1)[me]
            return shard_batch(rows[local], mesh)

        return feed
    rep = replicated(mesh)
    return lambda rows, idx: jax.device_put(rows[np.asarray(idx)], rep)


def make_trainer(
    student: Student,
    mesh: Mesh,
    batch: int,
    tx_img: optax.GradientTransformation,
    tx_txt: optax.GradientTransformation,
    *,
    logit_scale: float = LOGIT_SCALE,
    dropout: bool = True,
) -> Callable[..., tuple[Params, Any, jax.Array, np.ndarray]]:
    """`run(theta, opt_state, images, texts, batch_idx, keys, targets=None)`: one optimiser step
    per row of `batch_idx` (steps, batch) over host arrays `images`, `texts`. Returns (theta,
    opt_state, mean loss, (steps, batch) bool "pair retrieved at rank 1 both ways in its
    minibatch"). `targets` (N, N), optional: soft contrastive targets over the N rows (LoRS);
    each step uses targets[rows][:, rows] for the rows it was fed, in the fed order. None: the
    identity (hard InfoNCE).

    A host loop over one jitted step: the per-step dispatch is negligible next to the step.
    Parameters are replicated; each process feeds its share of every minibatch (data
    parallel over the mesh, across processes).
    """
    feed = _batch_feeder(mesh, batch)
    labels = jnp.arange(batch)
    rep = replicated(mesh)

    @partial(jax.jit, out_shardings=rep)
    def step(theta, opt_state, x, t, rows, key, targets):
        # The minibatch's soft targets, in the global batch order of the fed rows.
        sub = None if targets is None else targets[rows][:, rows]

        def loss_fn(th):
            img, txt = student.apply(th[0], th[1], x, t, rng=key, train_dropout=dropout)
            return contrastive_loss(img, txt, logit_scale, sub), (img, txt)

        (loss, (img, txt)), g = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        sim = l2_normalize(img) @ l2_normalize(txt).T
        correct = (jnp.argmax(sim, 1) == labels) & (jnp.argmax(sim, 0) == labels)
        u_img, s_img = tx_img.update(g[0], opt_state[0], theta[0])
        u_txt, s_txt = tx_txt.update(g[1], opt_state[1], theta[1])
        # `rows`: the input row of each global batch position, gathered with `correct`.
        return (theta[0] + u_img, theta[1] + u_txt), (s_img, s_txt), loss, (correct, rows)

    def in_idx_order(correct: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # Processes' shares land at their devices' positions of the global batch, which need
        # not be idx's order: realign so column j answers for row idx[j].
        perm = np.argsort(rows, kind="stable")
        return correct[perm[np.searchsorted(rows[perm], idx)]]

    def run(theta, opt_state, images, texts, batch_idx, keys, targets=None):
        theta, opt_state = jax.device_put((theta, opt_state), rep)
        if targets is not None:
            targets = jax.device_put(np.asarray(targets, np.float32), rep)
        if not isinstance(images, NormalizedRows):  # a view normalises the rows it feeds
            images = np.asarray(images)
        texts = np.asarray(texts)
        row_ids = np.arange(len(images), dtype=np.int32)
        losses, outs = [], []
        for idx, key in zip(np.asarray(batch_idx), keys, strict=True):
            x, t, rows = feed(images, idx), feed(texts, idx), feed(row_ids, idx)
            theta, opt_state, loss, out = step(theta, opt_state, x, t, rows, key, targets)
            losses.append(loss)
            outs.append(out)
        correct = [
            in_idx_order(ok, rows, idx)
            for (ok, rows), idx in zip(jax.device_get(outs), np.asarray(batch_idx), strict=True)
        ]
        return theta, opt_state, jnp.mean(jnp.stack(losses)), np.stack(correct)

    return run


def embed_fn(
    student: Student,
) -> Callable[[Params, np.ndarray | NormalizedRows, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(theta, images, texts) -> L2-normalised joint embeddings of every image and text (eval
    mode), computed in fixed-size padded chunks so each tower compiles once."""

    @partial(jax.jit, static_argnums=0)
    def tower(is_img: bool, theta: jax.Array, x: jax.Array) -> jax.Array:
        module = student.image if is_img else student.text
        return l2_normalize(module.apply(theta, x, rng=None, train=False))

    def run(
        is_img: bool, theta: jax.Array, x: np.ndarray | NormalizedRows, chunk: int = 256
    ) -> np.ndarray:
        out = []
        for s in range(0, len(x), chunk):
            part = x[s : s + chunk]
            pad = chunk - len(part)
            part = np.concatenate([part, np.repeat(part[-1:], pad, 0)]) if pad else part
            out.append(np.asarray(tower(is_img, theta, part))[: chunk - pad])
        return np.concatenate(out)

    return lambda theta, images, texts: (run(True, theta[0], images), run(False, theta[1], texts))


def evaluate(embed: Callable, theta: Params, data: PairData) -> dict[str, float]:
    """Recall@1/5/10 both ways on the test split."""
    img, txt = embed(theta, data.test_images, data.test_txt)
    return retrieval_metrics(img, txt, data.txt2img)


def mean_std(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{key: {"mean", "std"}} over runs for the six recall keys."""
    out = {}
    for k in RECALL_KEYS:
        values = np.array([r[k] for r in runs], np.float64)
        out[k] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def epoch_batches(n: int, batch: int, seed: int, expert: int, epoch: int) -> np.ndarray:
    """(n // batch, batch) row indices of one epoch: a permutation seeded by (seed, expert,
    epoch), remainder dropped."""
    perm = np.random.default_rng([seed, expert, epoch]).permutation(n)
    steps = n // batch
    return perm[: steps * batch].reshape(steps, batch).astype(np.int32)


# --------------------------------------------------------------------------- trajectories


def buffer_signature(config: ml_collections.ConfigDict, data: PairData) -> dict[str, Any]:
    """What the experts depend on: the training pairs (count, a hash of their ids and captions:
    the same pairs under another file path are the same data), where their images are read
    from, image size, model, text encoder, seed and the expert recipe. Adding experts
    (buffer.num_experts) or changing the test set does not change it."""
    digest = hashlib.sha256()
    for sid, caption in zip(data.train_pair_ids, data.train_captions, strict=True):
        digest.update(f"{sid}\t{caption}\n".encode("utf-8", "surrogateescape"))
    t, b = config.text, config.buffer
    return {
        "image_root": signature.normal_path("data.image_root", str(config.data.image_root)),
        "train_pairs": data.num_pairs,
        "train_sha256": digest.hexdigest(),
        "image_size": int(config.data.image_size),
        # What the encoder is built from: keys another encoder takes (left out when
        # model.image switched) and an empty preset are not part of it.
        "model": {
            **config.model.to_dict(),
            "image_kwargs": encoder_kwargs(config.model.image, dict(config.model.image_kwargs))[0],
        },
        "text": {
            # as the folder it names (the same run from another working folder)
            "model_dir": signature.normal_path("text.model_dir", str(t.model_dir)),
            "pooling": str(t.pooling),
            "max_len": int(t.max_len),
        },
        "seed": int(config.seed),
        "buffer": {"epochs": int(b.epochs), "lr": float(b.lr), "batch_size": int(b.batch_size)},
    }


# The refusal of a workdir made with other settings (shared with the compress stages).
check_signature = signature.check_signature
# Buffer signature keys older versions recorded that no longer bind: "train", the training
# file's path (its pairs are hashed). In W/distill's signature they sit under "buffer.".
RETIRED_BUFFER_KEYS = ("train",)
RETIRED_DISTILL_KEYS = tuple(f"buffer.{k}" for k in RETIRED_BUFFER_KEYS)


_DATA_KEYS = {"image_size": "data.image_size", "image_root": "data.image_root"}


def buffer_key(key: str) -> str:
    """The config key a `buffer_signature` key stands for (in refusals)."""
    return _DATA_KEYS.get(key, key)


def distill_key(key: str) -> str:
    """The config key a distill signature key stands for: the buffer's signature sits in it
    under "buffer." (`buffer.buffer.lr` is `buffer.lr`, `buffer.model.x` is `model.x`)."""
    return buffer_key(key.removeprefix("buffer.")) if key.startswith("buffer.") else key


def check_distill_signature(path: Path, sig: dict[str, Any], create: bool = False) -> None:
    """`check_signature` for W/distill (created by `distill`, checked by `eval-distilled`):
    `sig` from `distill_stage.distill_signature`."""
    check_signature(
        path,
        sig,
        create=create,
        redo="distill again",
        retired=RETIRED_DISTILL_KEYS,
        names=distill_key,
    )


def check_buffer(
    workdir: str | Path, config: ml_collections.ConfigDict, data: PairData, create: bool = False
) -> dict[str, Any]:
    """`check_signature` for W/buffer (created by `buffer`, checked by the later stages)."""
    sig = buffer_signature(config, data)
    path = Path(workdir) / "buffer" / "signature.json"
    check_signature(
        path,
        sig,
        create=create,
        redo="train the experts again",
        retired=RETIRED_BUFFER_KEYS,
        names=buffer_key,
    )
    return sig


def expert_dir(workdir: str | Path, expert: int) -> Path:
    return Path(workdir) / "buffer" / f"expert_{expert:03d}"


def trajectory_target(epochs: int, num_params: tuple[int, int], n: int) -> dict[str, np.ndarray]:
    return {
        "img": np.zeros((epochs + 1, num_params[0]), np.float32),
        "txt": np.zeros((epochs + 1, num_params[1]), np.float32),
        "correct": np.zeros((epochs + 1, n), bool),
    }


def load_expert(
    workdir: str | Path, expert: int, epochs: int, num_params: tuple[int, int], n: int
) -> tuple[dict[str, np.ndarray], dict, int]:
    """(trajectory arrays, extra JSON, finished epochs) of one expert; 0 epochs if none."""
    target = trajectory_target(epochs, num_params, n)
    # Every process opens the checkpointer (Orbax syncs processes there), even for an expert
    # not started yet: deciding per process from the folder's existence could split them.
    ckpt = Checkpointer(expert_dir(workdir, expert), max_to_keep=1)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        return target, {}, 0
    state, extra = ckpt.restore(step, target)
    ckpt.close()
    return {k: np.asarray(v) for k, v in state.items()}, extra, int(step)


def load_trajectories(
    workdir: str | Path, num_experts: int, epochs: int, num_params: tuple[int, int], n: int
) -> list[dict[str, np.ndarray]]:
    """Every finished expert's trajectory (experts that did not reach `epochs` are left out)."""
    out = []
    for e in range(num_experts):
        traj, _, done = load_expert(workdir, e, epochs, num_params, n)
        if done == epochs:
            out.append(traj)
    if not out:
        raise FileNotFoundError(
            f"no finished expert under {Path(workdir) / 'buffer'}: run `tldr-jax buffer` on this "
            "workdir first"
        )
    return out


def check_distill_fits(config: ml_collections.ConfigDict, pairs: int) -> None:
    """ConfigError where the training set cannot be trained on contrastively (< 2 pairs), or
    distill.num_pairs real pairs (init real or kmeans) cannot be drawn from it: `buffer`
    checks this before training experts that `distill` could not use."""
    check_contrastive_set(pairs, "the training set", "use more data (data.max_rows, data.train)")
    d = config.get("distill")
    if d is not None:
        check_init_pairs(str(d.init), int(d.num_pairs), pairs)


def check_init_pairs(init: str, num_pairs: int, pairs: int) -> None:
    """ConfigError where distill.init (real, kmeans) cannot draw num_pairs real pairs from a
    training set of `pairs` (`distill` and, before it trains, `buffer` check this)."""
    if init in ("real", "kmeans") and num_pairs > pairs:
        raise ConfigError(
            f"distill.num_pairs={num_pairs} > {pairs} training pairs: distill.init={init} "
            "starts from that many real pairs; lower distill.num_pairs, use more data, or "
            "start from distill.init=noise"
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`tldr-jax buffer`: train the experts, snapshot every epoch, write buffer.json."""
    workdir_p = Path(workdir)
    b = config.buffer
    seed, num_experts, epochs = int(config.seed), int(b.num_experts), int(b.epochs)
    data = load_pairs(config, workdir)
    n = data.num_pairs
    check_distill_fits(config, n)  # before experts are trained that distill could not use
    check_buffer(workdir, config, data, create=True)
    batch = min(int(b.batch_size), n)
    if batch < int(b.batch_size):
        log.warning(
            "buffer: buffer.batch_size=%d > %d training pairs: the experts train on batches "
            "of %d (one per epoch)",
            int(b.batch_size),
            n,
            batch,
        )
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    student = build_student(config, data.train_txt.shape[1])
    # Plain SGD: no momentum or weight decay, so the optimiser state is empty.
    tx = optax.sgd(float(b.lr))
    trainer = make_trainer(student, mesh, batch, tx, tx)
    embed = embed_fn(student)
    images, texts = data.train_images, data.train_txt
    base_key = jax.random.key(seed)

    t0 = time.time()
    finals: list[dict[str, float]] = []
    at_chance: list[int] = []
    trained_epochs = 0
    done_at_start = 0  # expert epochs trained before this run (summed over the experts)
    for e in range(num_experts):
        traj, extra, done = load_expert(workdir_p, e, epochs, student.num_params, n)
        done_at_start += done
        recall: list[dict[str, float]] = list(extra.get("recall", []))
        if done == 0:
            theta = init_params(config, data.train_txt.shape[1], seed * 1000 + e)
            traj["img"][0], traj["txt"][0] = np.asarray(theta[0]), np.asarray(theta[1])
            recall = [evaluate(embed, theta, data)]
        if done == epochs:
            finals.append(recall[-1])
            if "loss" in extra and loss_at_chance(float(extra["loss"]), batch):
                at_chance.append(e)  # (warned about when it was trained)
            continue
        if done:
            log.info("buffer: expert %d resumes at epoch %d of %d", e, done, epochs)
        else:
            log.info("buffer: training expert %d (of %d), %d epochs", e, num_experts, epochs)
        ckpt = Checkpointer(expert_dir(workdir_p, e), max_to_keep=1, sweep_tmp=True)
        logger = MetricLogger(workdir_p, f"buffer_expert_{e:03d}", resume_step=done)
        theta = (jnp.asarray(traj["img"][done]), jnp.asarray(traj["txt"][done]))
        opt_state = (tx.init(theta[0]), tx.init(theta[1]))  # the trainer places both
        pbar = progress.bar(
            range(done, epochs), desc=f"expert {e}", disable=not dist.is_main(), leave=False
        )
        with preemption.polling():
            for epoch in pbar:
                idx = epoch_batches(n, batch, seed, e, epoch)
                keys = jax.random.split(jax.random.fold_in(base_key, e * 100_003 + epoch), len(idx))
                theta, opt_state, loss, correct = trainer(
                    theta, opt_state, images, texts, idx, keys
                )
                if not bool(all_finite((loss, theta))):
                    raise ConfigError(
                        f"buffer: expert {e} diverged in epoch {epoch + 1} (non-finite loss "
                        f"or parameters) at buffer.lr {float(b.lr):g}. Lower buffer.lr and "
                        f"use a new --workdir, or delete {workdir_p / 'buffer'} (its experts "
                        f"were trained at this lr)"
                    )
                # Pairs in the dropped remainder keep their previous epoch's value.
                row = traj["correct"][epoch].copy()
                row[idx.reshape(-1)] = np.asarray(correct).reshape(-1)
                traj["correct"][epoch + 1] = row
                traj["img"][epoch + 1] = np.asarray(theta[0])
                traj["txt"][epoch + 1] = np.asarray(theta[1])
                recall.append(evaluate(embed, theta, data))
                logger.log(epoch + 1, loss=float(loss), **recall[-1])
                pbar.set_postfix(
                    loss=f"{float(loss):.3f}", tr_r1=f"{recall[-1]['tr_r1']:.1f}", refresh=False
                )
                ckpt.save(epoch + 1, traj, extra={"recall": recall, "loss": float(loss)})
                trained_epochs += 1
                if preemption.agreed():
                    ckpt.close()
                    logger.close()
                    raise preemption.stop(f"buffer expert {e}", epoch + 1)
        ckpt.close()
        logger.close()
        finals.append(recall[-1])
        # A contrastive loss still at chance (log batch: every logit alike) after the last
        # epoch: the model cannot tell the pairs apart (identical images or captions), the
        # expert barely moves, and distill's normalised distance divides by that movement.
        if loss_at_chance(float(loss), batch):
            at_chance.append(e)
            # The encoders are scale-invariant (normalised embeddings): an lr far too high
            # blows the parameters up and freezes them there, finite, at chance.
            growth = max(
                float(np.linalg.norm(traj[k][-1]) / max(np.linalg.norm(traj[k][0]), 1e-12))
                for k in ("img", "txt")
            )
            why = (
                f"its parameters grew {growth:.3g}x from their start and froze there: "
                f"buffer.lr={float(b.lr):g} is far too high (lower it, in a new --workdir)"
                if growth > PARAMS_BLOWUP
                else "it cannot tell the training pairs apart (identical images or "
                "captions?) and hardly moves"
            )
            log.warning(
                "buffer: expert %d's training loss %.4f is still at chance (log %d = %.4f) "
                "after epoch %d: %s; distilling from it is ill-posed (the matching loss is "
                "normalised by the expert's movement)",
                e,
                float(loss),
                batch,
                np.log(batch),
                epochs,
                why,
            )

    summary: dict[str, Any] = {
        "num_experts": num_experts,
        "epochs": epochs,
        "batch_size": batch,
        "lr": float(b.lr),
        "train_pairs": n,
        "train_records": len(data.train),
        "test_images": len(data.test),
        "test_captions": len(data.txt2img),
        "num_params": {"img": student.num_params[0], "txt": student.num_params[1]},
        "trained_epochs_this_run": trained_epochs,
        "resumed_from": done_at_start,  # expert epochs done before (of num_experts x epochs)
        "expert_final_recall": mean_std(finals),
        # experts whose last epoch's loss stayed at chance (a warning when trained; experts
        # checkpointed before the loss was recorded, 2026-12-05, are not checked)
        "experts_at_chance": at_chance,
        "time_s": time.time() - t0,
        **pretrain.data_summary(data.train, data.test),  # rows read and skipped, per reason
    }
    return summary
