"""Trajectory-matching dataset distillation: stage `distill` (SPEC B.3).

Learns M synthetic pairs (normalised images, text-encoder embeddings) and one step size per
modality. Each outer iteration draws an expert and a start epoch s < max_start_epoch, runs the
student from expert(s) for `syn_steps` SGD steps on the synthetic set and matches
expert(s + expert_epochs) (`matching.outer_step`, NaN guard included). The (expert, epoch) draw
and the student's minibatches are functions of (seed, iteration), so a resumed run continues
exactly where the checkpoint left off.

Outputs under W/distill/: Orbax checkpoints (synthetic set, outer optimiser state, iteration),
distilled.npz (images, texts, lr_img, lr_txt, init_index, nearest_caption_index, iterations)
and distilled.png (denormalised images titled with the nearest real training caption of
their text embedding).

`distill.lors=True` (off by default; LoRS, Xu et al. 2024, beyond the reference) also learns a
soft image-text similarity S = diag(a) + (lors_alpha / lors_rank) L R^T, initialised at the
identity (a = 1, L ~ N(0, 1) from the seed, R = 0), that the student uses as its contrastive
targets; its factors live in the checkpoints and, with the dense S, in distilled.npz
(sim_diag, sim_left, sim_right, similarity), which `eval-distilled` then trains with.
"""

from __future__ import annotations

import logging
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tldr_jax import config_check, config_lib
from tldr_jax.config_check import ConfigError
from tldr_jax.data.images import denormalize, normalize
from tldr_jax.data.imagestore import NormalizedRows
from tldr_jax.distill import expert_trajectories as et
from tldr_jax.distill import matching
from tldr_jax.select.kmeans import kmeans
from tldr_jax.train import pretrain
from tldr_jax.train.checkpoint import Checkpointer
from tldr_jax.utils import dist, io, preemption, progress
from tldr_jax.utils.memory import release_host_memory
from tldr_jax.utils.mesh import make_mesh, replicated, split_batch_sharding
from tldr_jax.utils.metrics import MetricLogger

log = logging.getLogger(__name__)

INITS = ("real", "noise", "kmeans")


def nearest_distinct(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """For each prototype, the nearest row of `features` (cosine) not taken by an earlier one."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    p = prototypes / np.maximum(np.linalg.norm(prototypes, axis=1, keepdims=True), 1e-12)
    sim = p @ f.T
    taken = np.zeros(len(f), bool)
    out = np.empty(len(p), np.int64)
    for i, row in enumerate(sim):
        j = int(np.argmax(np.where(taken, -np.inf, row)))
        out[i], taken[j] = j, True
    return out


def draw_segment(seed: int, iteration: int, num_experts: int, max_start: int) -> tuple[int, int]:
    """The (expert, start epoch s < max_start) outer iteration `iteration` matches: a function
    of (seed, iteration) only, so a resumed run draws what an uninterrupted one would."""
    draw = np.random.default_rng([seed, iteration])
    return int(draw.integers(num_experts)), int(draw.integers(max_start))


def expert_segment(
    trajs: tuple[Any, ...], seed: int, iteration: int, max_start: int, expert_epochs: int
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(start, target) of outer iteration `iteration`: per modality, the drawn expert's
    parameters at epoch s (the student's start) and at epoch s + expert_epochs (its target).
    `trajs`: per modality an (experts, epochs + 1, params) array."""
    e, s = draw_segment(seed, iteration, len(trajs[0]), max_start)
    return tuple(t[e, s] for t in trajs), tuple(t[e, s + expert_epochs] for t in trajs)


def initial_pairs(
    init: str,
    num_pairs: int,
    seed: int,
    images: np.ndarray | NormalizedRows,
    texts: np.ndarray,
    cluster_features: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, texts, real row per pair or -1) to start the synthetic set from.

    real: M random real pairs. noise: Gaussian images (unit variance in normalised pixel space)
    and Gaussian texts with the real embeddings' per-dimension mean and std. kmeans: spherical
    k-means (M clusters) of `cluster_features`, then the nearest real pair to each prototype.
    """
    n = len(images)
    rng = np.random.default_rng(seed)
    et.check_init_pairs(init, num_pairs, n)
    if init == "real":
        idx = np.sort(rng.choice(n, num_pairs, replace=False))
    elif init == "kmeans":
        if cluster_features is None:
            raise ValueError("init='kmeans' needs cluster features")
        res = kmeans(cluster_features, num_pairs, spherical=True, seed=seed)
        idx = nearest_distinct(cluster_features, res.centroids)
    elif init == "noise":
        imgs = rng.standard_normal((num_pairs, *images.shape[1:])).astype(np.float32)
        mu, sd = texts.mean(0), texts.std(0)
        txts = (mu + sd * rng.standard_normal((num_pairs, texts.shape[1]))).astype(np.float32)
        return imgs, txts, np.full(num_pairs, -1, np.int64)
    else:
        raise ConfigError(f"distill.init must be one of {INITS}, got {init!r}")
    return images[idx], texts[idx], idx.astype(np.int64)


def nearest_captions(syn_texts: np.ndarray, real_texts: np.ndarray) -> np.ndarray:
    """Row of the real caption nearest (cosine) to each synthetic text embedding."""
    a = syn_texts / np.maximum(np.linalg.norm(syn_texts, axis=1, keepdims=True), 1e-12)
    b = real_texts / np.maximum(np.linalg.norm(real_texts, axis=1, keepdims=True), 1e-12)
    return np.argmax(a @ b.T, axis=1)


def save_grid(path: Path, images: np.ndarray, titles: list[str], max_images: int = 100) -> None:
    """PNG grid of denormalised images, each titled (wrapped) with its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), max_images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    pixels = denormalize(images[:n])
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            # At most 4 lines of 28 characters: a longer caption ran into the image above.
            title = textwrap.shorten(titles[i], 4 * 28 - 8, placeholder=" ...")
            ax.set_title(textwrap.fill(title, 28, max_lines=4), fontsize=5)
    fig.tight_layout()
    io.save_figure(fig, path)


def warn_if_diverged(
    first: list[float],
    losses: list[float],
    step_sizes: tuple[float, float],
    init: float,
    similarity: np.ndarray | None = None,
    growth: dict[str, float] | None = None,
) -> list[str]:
    """Warnings (logged, and returned) where the synthetic set ran away: the meta-loss's last
    10 iterations averaging over 10x its first 10 (it starts near 1: the student lands as far
    from the target as the expert's start), a learned step size collapsed below 1e-6 of its
    initial value, synthetic data whose largest entry is over SYN_BLOWUP times the real
    data's (`growth`: that ratio per modality; the encoders are scale-invariant, so such a
    set can stay finite with a meta-loss that hardly moves), or (LoRS) a learned similarity
    that is not finite or has an entry over LORS_BLOWUP in magnitude (it starts at the
    identity). All are what experts that barely move (buffer.json `experts_at_chance`) or
    outer learning rates far too high do."""
    found = []
    k = min(10, len(first), len(losses) // 2)  # windows that do not overlap in short runs
    if k and np.mean(losses[-k:]) > 10 * max(np.mean(first[:k]), 1e-12):
        found.append(
            f"the meta-loss grew from {np.mean(first[:k]):.3g} (first {k} iterations) to "
            f"{np.mean(losses[-k:]):.3g} (last {k})"
        )
    small = [n for n, v in zip(("lr_img", "lr_txt"), step_sizes, strict=True) if v < 1e-6 * init]
    if small:
        found.append(f"the learned {' and '.join(small)} collapsed (< 1e-6 of step_size_init)")
    for name, ratio in (growth or {}).items():
        if not ratio <= SYN_BLOWUP:  # NaN too
            found.append(
                f"the synthetic {name} blew up (largest entry {ratio:.3g}x that of the real ones)"
            )
    if similarity is not None:
        if not np.all(np.isfinite(similarity)):
            found.append("the learned LoRS similarity is not finite")
        elif similarity.size and np.max(np.abs(similarity)) > LORS_BLOWUP:
            found.append(
                f"the learned LoRS similarity blew up (max |entry| "
                f"{np.max(np.abs(similarity)):.3g}; it starts at the identity)"
            )
    lrs = "distill.lr_images / lr_texts / lr_step_size" + (
        " / lors_lr" if similarity is not None else ""
    )
    for what in found:
        log.warning(
            "distill: %s: the synthetic set diverged. Lower %s (they define the set: in a new "
            "--workdir, or after deleting this one's distill folder), and check buffer.json's "
            "experts_at_chance (experts that barely move make the normalised matching loss "
            "ill-posed)",
            what,
            lrs,
        )
    return found


LORS_BLOWUP = 1e4  # |entry| of a learned LoRS similarity taken as blown up
SYN_BLOWUP = 100.0  # synthetic data's largest |entry| over the real data's: blown up


# distill.* keys a run of one workdir may change between reruns: how many iterations, how
# often it logs / checkpoints, and how the gradient is computed (the same exact gradient, or
# TESLA's). The rest define the synthetic set.
RESUMABLE_KEYS = (
    "iterations",
    "ckpt_every",
    "log_every",
    "grad_mode",
    "micro_batches",
    "remat_budget_mib",
    "scan_unroll",
    "shard_student_batch",
)


def distill_signature(config: ml_collections.ConfigDict, buffer_sig: dict) -> dict[str, Any]:
    """What W/distill's synthetic set depends on: the buffer and distill.* but
    RESUMABLE_KEYS."""
    d = {k: v for k, v in config.distill.to_dict().items() if k not in RESUMABLE_KEYS}
    # The resolved seed, and only when it is not the global one, so workdirs made before the
    # key existed (and runs that spell the global seed either way) keep their signature.
    d.pop("seed", None)
    seed = distill_seed(config)
    if seed != int(config.seed):
        d["seed"] = seed
    return {"buffer": buffer_sig, "distill": d}


def distill_seed(config: ml_collections.ConfigDict) -> int:
    """The distill stage's seed: `distill.seed`, or the global `seed` where that is -1."""
    return config_lib.stage_seed(config, "distill")


def start_epochs(config: ml_collections.ConfigDict) -> int:
    """How many start epochs an outer iteration draws from: max_start_epoch, capped so that
    start + expert_epochs stays within the buffer's epochs."""
    epochs, expert_epochs = int(config.buffer.epochs), int(config.distill.expert_epochs)
    asked = int(config.distill.max_start_epoch)
    max_start = min(asked, epochs - expert_epochs + 1)
    if max_start < 1:
        raise ConfigError(f"distill.expert_epochs={expert_epochs} > buffer.epochs={epochs}")
    if max_start < asked:
        log.warning(
            "distill: max_start_epoch=%d capped at %d: a start epoch s needs s + expert_epochs"
            " (%d) <= buffer.epochs (%d)",
            asked,
            max_start,
            expert_epochs,
            epochs,
        )
    return max_start


def inner_loop(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None, batch: int = 0
) -> matching.InnerLoop:
    """How the student trains on the synthetic set, from `distill.*`. Given the mesh and the
    student batch, each step's batch (each micro-batch's) is split over the devices
    (`distill.shard_student_batch`, `mesh_lib.split_batch_sharding`)."""
    d = config.distill
    slices = int(d.get("micro_batches", 1))
    split = mesh is not None and batch and bool(d.get("shard_student_batch", True))
    return matching.InnerLoop(
        logit_scale=matching.QUIRK_LOGIT_SCALE if d.quirk_logit_scale else matching.LOGIT_SCALE,
        train_dropout=bool(d.quirk_dropout),
        micro_batches=slices,
        remat_budget_mib=float(d.get("remat_budget_mib", matching.InnerLoop.remat_budget_mib)),
        unroll=bool(d.get("scan_unroll", False)),
        batch_sharding=split_batch_sharding(mesh, batch // slices) if split else None,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`tldr-jax distill`: learn the synthetic set, save npz + png + checkpoints."""
    workdir_p = Path(workdir)
    out_dir = workdir_p / "distill"
    d, b = config.distill, config.buffer
    seed = distill_seed(config)
    m, syn_steps = int(d.num_pairs), int(d.syn_steps)
    expert_epochs, iterations = int(d.expert_epochs), int(d.iterations)
    epochs = int(b.epochs)
    # Each key's own range and names (max_start_epoch >= 1, grad_mode, init,
    # kmeans_features, ...) were checked by config_check before the stage; here what spans keys.
    max_start = start_epochs(config)
    if problems := config_check.micro_batch_problems(config):  # for callers past the CLI
        raise ConfigError(problems[0])
    lors = bool(d.get("lors", False))
    scan_unroll = bool(d.get("scan_unroll", False))
    if scan_unroll and d.grad_mode != "unroll":
        # Measured (README): unrolled, XLA keeps every step's activations whatever the mode.
        log.warning(
            "distill.scan_unroll=True with grad_mode=%r: the unrolled scan loses that mode's "
            "memory bound (NF-ResNet-26, 5 steps: remat 3.1 -> 9.5 GB peak, tesla 2.3 -> 7.8 GB)",
            d.grad_mode,
        )

    data = et.load_pairs(config, workdir)
    sig = distill_signature(config, et.check_buffer(workdir, config, data))
    et.check_distill_signature(out_dir / "signature.json", sig)  # before anything is loaded
    n = data.num_pairs
    student = et.build_student(config, data.train_txt.shape[1])
    trajs = et.load_trajectories(workdir_p, int(b.num_experts), epochs, student.num_params, n)
    if len(trajs) < int(b.num_experts):
        log.warning(
            "distill: %d of buffer.num_experts=%d experts are finished; matching those "
            "(run `tldr-jax buffer` to train the rest)",
            len(trajs),
            int(b.num_experts),
        )
    traj_img = np.stack([t["img"] for t in trajs])  # (experts, E+1, P_img)
    traj_txt = np.stack([t["txt"] for t in trajs])

    cluster = None
    if d.init == "kmeans":
        if d.kmeans_features == "text":
            cluster = data.train_txt
        else:  # "image" (config_check allows text | image)
            final = (jnp.asarray(traj_img[0, -1]), jnp.asarray(traj_txt[0, -1]))
            cluster = et.embed_fn(student)(final, data.train_images, data.train_txt[:1])[0]
    images0, texts0, init_idx = initial_pairs(
        d.init, m, seed, data.train_images, data.train_txt, cluster
    )
    if jax.process_count() > 1:
        # Process 0's start set for every process: k-means on floats (and any host's own
        # rounding) could give each host its own, and the replicated set would then differ.
        from jax.experimental import multihost_utils

        start = (images0, texts0, init_idx)
        shared = multihost_utils.broadcast_one_to_all(start)
        pairs = zip(start, shared, strict=True)
        images0, texts0, init_idx = (np.asarray(b, a.dtype) for a, b in pairs)

    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    rep = replicated(mesh)
    optimizer = matching.make_outer_optimizer(
        float(d.lr_images),
        float(d.lr_texts),
        float(d.lr_step_size),
        float(d.momentum),
        step_size_param=d.step_size_param,
        max_grad_norm=float(d.max_grad_norm),
        lr_lors=float(d.get("lors_lr", 1.0)) if lors else None,
    )
    syn = matching.SyntheticSet.create(images0, texts0, float(d.step_size_init))
    if lors:
        key = jax.random.fold_in(jax.random.key(seed), 0x5105)  # not the outer loop's keys
        syn = syn.with_lors(key, int(d.get("lors_rank", 10)), float(d.get("lors_alpha", 0.1)))
    opt_state = optimizer.init(syn)
    syn, opt_state = jax.device_put((syn, opt_state), rep)
    batch_syn = int(d.batch_syn) or m
    if batch_syn > m:
        log.warning(
            "distill: batch_syn=%d > num_pairs=%d: every step takes all %d", batch_syn, m, m
        )
        batch_syn = m
    inner = inner_loop(config, mesh, batch_syn)
    split_over = inner.batch_sharding.mesh.shape["batch"] if inner.batch_sharding else 1
    if jax.device_count() > 1:
        log.info(
            "distill: each student step's batch of %d split over %d of the %d devices",
            batch_syn // inner.micro_batches,
            split_over,
            jax.device_count(),
        )

    @partial(jax.jit, in_shardings=rep, out_shardings=rep)
    def step(syn, opt_state, expert_start, expert_target, key):
        k_batch, k_drop = jax.random.split(key)
        batch_idx = matching.sample_minibatches(k_batch, m, syn_steps, batch_syn)
        return matching.outer_step(
            syn,
            opt_state,
            optimizer,
            student,
            expert_start,
            expert_target,
            batch_idx,
            k_drop,
            inner,
            grad_mode=d.grad_mode,
        )

    @jax.jit
    def lors_offdiag(syn):
        sim = matching.similarity(syn)
        return jnp.sum(jnp.abs(sim - jnp.diag(jnp.diag(sim)))) / max(m * (m - 1), 1)

    # Recorded once the run is past every check at its start (a run stopped at "no finished
    # expert" or "num_pairs > training pairs" leaves no record that would refuse the rerun
    # with the fix), before its first checkpoint.
    et.check_distill_signature(out_dir / "signature.json", sig, create=True)
    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=2, sweep_tmp=True)
    start = ckpt.latest_step() or 0
    skipped = 0
    # Every finite iteration's meta-loss, kept in the checkpoints so a resumed or rerun
    # stage reports the whole run's first / last 10.
    losses: list[float] = []
    first_losses: list[float] = []
    history_known = start == 0
    experts_history: list[list[int]] = []
    # [from_iteration, grad_mode, scan_unroll, remat_chunk] per stretch of iterations run
    # with those settings (rerun-free keys); None where a checkpoint from before did not say.
    modes_history: list[list[Any]] = []
    remat_chunk = (
        matching.remat_chunk(syn_steps, (traj_img[0, 0], traj_txt[0, 0]), inner)
        if d.grad_mode == "remat"
        else None
    )
    settings = [str(d.grad_mode), scan_unroll, remat_chunk]
    if start:
        state, extra = ckpt.restore(start, {"syn": syn, "opt_state": opt_state})
        syn, opt_state = state["syn"], state["opt_state"]
        skipped = int(extra.get("skipped", 0))
        # [from_iteration, experts matched] segments; unknown for checkpoints written before.
        experts_history = [list(map(int, seg)) for seg in extra.get("experts_history", [])]
        modes_history = [
            [int(h[0]), str(h[1]), *(list(h[2:4]) + [None, None])[:2]]
            for h in extra.get("grad_mode_history", [])
        ]
        if "meta_losses" in extra:
            losses = [float(x) for x in extra["meta_losses"]]
            first_losses = losses[:10]
            history_known = True
        log.info("distill: resumed at iteration %d", start)
    logger = MetricLogger(workdir_p, "distill", resume_step=start)
    if start < iterations and (not experts_history or experts_history[-1][1] != len(trajs)):
        experts_history.append([start, len(trajs)])
    if start < iterations and (not modes_history or modes_history[-1][1:] != settings):
        modes_history.append([start, *settings])
    if start == iterations and experts_history and experts_history[-1][1] < len(trajs):
        log.warning(
            "distill: this workdir's set was learned matching %d experts; %d are finished now. "
            "Raise distill.iterations to go on matching all of them, or distill in a new workdir",
            experts_history[-1][1],
            len(trajs),
        )

    base_key = jax.random.key(seed)
    skipped_at_start = skipped
    ckpt_every = int(d.ckpt_every) or iterations
    log_every = max(int(d.log_every), 1)
    t0 = time.time()
    pbar = progress.bar(
        range(start, iterations), desc="distill", disable=not dist.is_main(), leave=False
    )
    with preemption.polling():
        for it in pbar:
            expert_start, expert_target = expert_segment(
                (traj_img, traj_txt), seed, it, max_start, expert_epochs
            )
            syn, opt_state, loss, skip = step(
                syn, opt_state, expert_start, expert_target, jax.random.fold_in(base_key, it)
            )
            done = it + 1
            loss_f, skip_b = float(loss), bool(skip)
            if it == start:  # compiled: hand the compiler's freed heap (GBs for big students) back
                release_host_memory(clear_caches=False)
            skipped += int(skip_b)
            if skip_b:
                what = "meta-gradient" if np.isfinite(loss_f) else "loss"
                log.warning(
                    "distill: iteration %d: non-finite %s (loss %s), update skipped",
                    done,
                    what,
                    loss_f,
                )
            else:
                losses.append(loss_f)
                if len(first_losses) < 10 and history_known:
                    first_losses.append(loss_f)
            if done % log_every == 0 or done == iterations:
                # The per-iteration loss varies with the (expert, epoch) draw: log the window mean.
                window = losses[-min(log_every, len(losses)) :] if losses else [loss_f]
                extra = {}
                if lors:  # how far the learned targets have moved off the identity
                    extra["lors_offdiag"] = float(lors_offdiag(syn))
                logger.log(
                    done,
                    meta_loss=float(np.mean(window)),
                    lr_img=float(syn.lr_img),
                    lr_txt=float(syn.lr_txt),
                    skipped=skipped,
                    **extra,
                )
                pbar.set_postfix(loss=f"{np.mean(window):.4f}", skipped=skipped, refresh=False)
            stop = preemption.agreed()
            if done % ckpt_every == 0 or done == iterations or stop:
                extra = {
                    "skipped": skipped,
                    "experts_history": experts_history,
                    "grad_mode_history": modes_history,
                    **({"meta_losses": losses} if history_known else {}),
                }
                ckpt.save(done, {"syn": syn, "opt_state": opt_state}, extra=extra)
            if stop:
                ckpt.close()
                logger.close()
                raise preemption.stop("distill", done)
    train_s = time.time() - t0
    ran = max(iterations - start, 0)
    if ran and skipped - skipped_at_start == ran:
        log.warning(
            "distill: the NaN guard skipped all %d iterations of this run (non-finite meta-loss "
            "or meta-gradient): the synthetic set did not change. Lower distill.step_size_init "
            "or distill.lr_*%s, or check the experts (buffer.json: an expert that does not "
            "move between epochs makes the normalised distance 0/0)",
            ran,
            " / distill.lors_lr" if lors else "",
        )
    done_iterations = max(start, iterations)  # the set's iterations (restored at `start`)
    if start > iterations:
        log.warning(
            "distill: this workdir's set was learned for %d iterations, more than "
            "distill.iterations=%d; it is kept as it is (and reported as %d iterations)",
            start,
            iterations,
            start,
        )
    elif start == iterations:  # everything was done before; nothing to add to the curves
        log.info("distill: already finished (%d iterations)", iterations)
    ckpt.close()
    logger.close()

    images = np.asarray(syn.images)
    texts = np.asarray(syn.texts)
    lr_img, lr_txt = float(syn.lr_img), float(syn.lr_txt)
    sim = np.asarray(matching.similarity(syn)) if lors else None
    pixels = np.abs(normalize(np.array([0, 255], np.uint8)[:, None]))  # the pixel range's ends
    growth = {
        "images": float(np.max(np.abs(images))) / float(np.max(pixels)),
        "texts": float(np.max(np.abs(texts)))
        / max(float(np.max(np.abs(np.asarray(data.train_txt)))), 1e-12),
    }
    diverged = warn_if_diverged(
        first_losses,
        losses,
        (lr_img, lr_txt),
        float(d.step_size_init),
        similarity=sim,
        growth=growth,
    )
    nearest = nearest_captions(texts, data.train_txt)
    lors_arrays: dict[str, np.ndarray] = {}
    lors_summary = None
    if sim is not None:
        lors_arrays = {
            "sim_diag": np.asarray(syn.sim_diag),
            "sim_left": np.asarray(syn.sim_left),
            "sim_right": np.asarray(syn.sim_right),
            "similarity": sim,
        }
        off = sim[~np.eye(m, dtype=bool)]
        lors_summary = {
            "rank": int(syn.sim_left.shape[1]),
            "alpha": float(d.get("lors_alpha", 0.1)),
            "lr": float(d.get("lors_lr", 1.0)),
            "diag_mean": float(np.mean(np.diag(sim))),
            "offdiag_abs_mean": float(np.mean(np.abs(off))) if off.size else 0.0,
            "offdiag_abs_max": float(np.max(np.abs(off))) if off.size else 0.0,
        }
    if dist.is_main():
        io.write_npz(
            out_dir / "distilled.npz",
            images=images,
            texts=texts,
            lr_img=np.float32(lr_img),
            lr_txt=np.float32(lr_txt),
            init_index=init_idx,
            nearest_caption_index=nearest,
            iterations=np.int64(done_iterations),
            skipped=np.int64(skipped),  # of those, left out by the NaN guard
            **lors_arrays,
        )
        save_grid(out_dir / "distilled.png", images, [data.train_captions[i] for i in nearest])
    # Compared as text: identical captions at other rows are the same caption.
    captions = np.asarray(data.train_captions, dtype=object)
    kept_caption = (
        float(np.mean(captions[nearest] == captions[init_idx])) if d.init != "noise" else None
    )
    return {
        "num_pairs": m,
        "iterations": done_iterations,
        "iterations_asked": iterations,
        "resumed_from": start,
        "skipped": skipped,  # non-finite outer iterations (NaN guard); data rows: "data"
        "data": pretrain.data_summary(data.train, data.test),
        # The settings the latest iterations ran with (a rerun of a finished set runs none:
        # those of the run that made it), and per stretch of iterations (a rerun may change
        # them; empty for checkpoints written before they were recorded).
        "grad_mode": modes_history[-1][1] if modes_history else d.grad_mode,
        "grad_mode_history": [
            {"from_iteration": i, "grad_mode": g, "scan_unroll": su, "remat_chunk": rc}
            for i, g, su, rc in modes_history
        ],
        "scan_unroll": modes_history[-1][2] if modes_history else None,
        # devices each student step's batch is split over (1: every device runs it whole)
        "student_batch_devices": split_over,
        "init": d.init,
        "seed": seed,  # distill.seed, or the global seed where that is -1
        "syn_steps": syn_steps,
        # remat: student steps per nested checkpoint chunk (1 = every step's parameters kept)
        "remat_chunk": modes_history[-1][3] if modes_history else None,
        "expert_epochs": expert_epochs,
        "max_start_epoch": max_start,  # as drawn: capped where s + expert_epochs > epochs
        "max_start_epoch_asked": int(d.max_start_epoch),
        # Experts the set was matched against in its latest iterations (the buffer may have
        # had fewer finished when distill ran beside it), and per stretch of iterations.
        "num_experts_used": experts_history[-1][1] if experts_history else None,
        "num_experts_finished": len(trajs),
        "experts_history": [{"from_iteration": i, "num_experts": n} for i, n in experts_history],
        "lr_img": lr_img,
        "lr_txt": lr_txt,
        "meta_loss_first10": float(np.mean(first_losses)) if first_losses else None,
        "meta_loss_last10": float(np.mean(losses[-10:])) if losses else None,
        "diverged": diverged,  # what warn_if_diverged found (empty: nothing)
        "nearest_caption_is_init_caption": kept_caption,
        "lors": lors,
        **({"lors_similarity": lors_summary} if lors else {}),
        "distilled_npz": str(out_dir / "distilled.npz"),
        "time_s": {"distill": train_s},
    }
