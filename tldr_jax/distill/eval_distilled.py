"""Evaluation of a distilled set against coreset baselines: stage `eval-distilled` (SPEC B.4-5).

Protocol (SPEC B.4): `eval.num_models` fresh models (new seeds, never an expert's) train on a
set for ~`eval.epochs` epochs with minibatch SGD (batch 64, momentum 0.9, weight decay 5e-4, no
augmentation, dropout on in the text head as in any real training), then recall@1/5/10 both
ways on the test split; mean and std over the models. The distilled set trains with its
learned step sizes (image encoder lr = lr_img, text head lr = lr_txt) and, when the npz carries
a LoRS `similarity` (M, M), with its minibatch sub-matrices as soft contrastive targets.
Coresets of the same budget (random, herding, k-center, forgetting) train with
`eval.coreset_lr` for both modalities (default 0.1 = the experts' lr; no sweep) and hard
(identity) targets.

Coreset features: the first expert's final-epoch joint embeddings, L2-normalised image
embedding concatenated with the L2-normalised text embedding. Forgetting: the per-epoch "pair
retrieved at rank 1 both ways in its minibatch" record that `buffer` stored for that expert.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tldr_jax.config_check import ConfigError
from tldr_jax.distill import coresets
from tldr_jax.distill import expert_trajectories as et
from tldr_jax.distill.distill_stage import distill_signature
from tldr_jax.distill.matching import all_finite
from tldr_jax.distill.student import Student
from tldr_jax.eval.retrieval import nonfinite_rows, retrieval_metrics
from tldr_jax.train import pretrain
from tldr_jax.train.losses import loss_at_chance
from tldr_jax.utils import dist, io
from tldr_jax.utils.mesh import make_mesh

log = logging.getLogger(__name__)

METHODS = ("distilled", "random", "herding", "kcenter", "forgetting")
METHOD_LABELS = {"kcenter": "k-center"}  # as the table and the plot print them


class Evaluator:
    """Trains fresh models on small sets and evaluates them; caches one trainer per shape/lr."""

    def __init__(
        self, config: ml_collections.ConfigDict, student: Student, data: et.PairData
    ) -> None:
        self.config = config
        self.student = student
        self.data = data
        self.mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
        self.embed = et.embed_fn(student)
        self._trainers: dict[tuple, Any] = {}

    def _trainer(self, batch: int, lr_img: float, lr_txt: float) -> tuple[Any, Any, Any]:
        key = (batch, lr_img, lr_txt)
        if key not in self._trainers:
            e = self.config.eval

            def tx(lr: float) -> optax.GradientTransformation:
                return optax.chain(
                    optax.add_decayed_weights(float(e.weight_decay)),
                    optax.sgd(lr, momentum=float(e.momentum)),
                )

            tx_img, tx_txt = tx(lr_img), tx(lr_txt)
            trainer = et.make_trainer(self.student, self.mesh, batch, tx_img, tx_txt)
            self._trainers[key] = (trainer, tx_img, tx_txt)
        return self._trainers[key]

    def train_and_eval(
        self,
        images: np.ndarray,
        texts: np.ndarray,
        lr_img: float,
        lr_txt: float,
        tag: int,
        targets: np.ndarray | None = None,
    ) -> list[dict[str, float]]:
        """Recall of `eval.num_models` fresh models trained on (images, texts); with `targets`
        (N, N) (a LoRS similarity) each minibatch's sub-matrix is its soft contrastive target."""
        e = self.config.eval
        n = len(images)
        batch = min(int(e.batch_size), n)
        steps = int(e.epochs) * -(-n // batch)  # whole epochs, the last batch of each smaller
        if int(e.get("max_steps", 0)):
            steps = min(steps, int(e.max_steps))
        _, tx_img, tx_txt = self._trainer(batch, lr_img, lr_txt)
        x, t = np.asarray(images, np.float32), np.asarray(texts, np.float32)
        seed = int(self.config.seed)
        out = []
        for i in range(int(e.num_models)):
            # Seeds far from the experts' (seed * 1000 + expert) so no model starts on a buffer.
            model_seed = 1_000_003 + seed * 1000 + i
            theta = et.init_params(self.config, texts.shape[1], model_seed)
            opt_state = (tx_img.init(theta[0]), tx_txt.init(theta[1]))
            key = jax.random.fold_in(jax.random.key(model_seed), tag)
            k_batch, k_drop = jax.random.split(key)
            keys = jax.random.split(k_drop, steps)
            losses = []
            done = 0
            for idx in epoch_minibatches(k_batch, n, batch, steps):
                run = self._trainer(idx.shape[1], lr_img, lr_txt)[0]  # one per batch size
                # The block's keys at a traced offset into the fixed-size `keys`: slicing
                # keys[:k] / keys[k:] off a shrinking array compiled two slices per block (per
                # epoch), one for each length left.
                block_keys = jax.lax.dynamic_slice_in_dim(keys, done, len(idx))
                theta, opt_state, loss, _ = run(theta, opt_state, x, t, idx, block_keys, targets)
                done += len(idx)
                losses.append((float(loss), len(idx), idx.shape[1]))  # mean of k steps
            loss = sum(v * k for v, k, _ in losses) / steps
            img, txt = self.embed(theta, self.data.test_images, self.data.test_txt)
            recall = retrieval_metrics(img, txt, self.data.txt2img)
            recall["final_loss"] = float(loss)
            finite = (
                bool(np.isfinite(recall["final_loss"]))
                and bool(all_finite(theta))
                and nonfinite_rows(img) == 0
                and nonfinite_rows(txt) == 0
            )
            if not finite:
                # It scores 0 on every key: finite test embeddings of a model with some
                # non-finite parameters would otherwise keep a recall that means nothing.
                for k in et.RECALL_KEYS:
                    recall[k] = 0.0
                log.warning(
                    "eval-distilled: model %d diverged (non-finite loss, parameters or test "
                    "embeddings) at lr_img %g, lr_txt %g; it scores 0 on every key",
                    i,
                    lr_img,
                    lr_txt,
                )
            # Finite but dead (scale-invariant encoders blown up by an lr far too high, then
            # frozen): the last epoch's loss at chance. Its recall is chance's; said, not hidden.
            last = last_epoch_losses(losses, -(-n // batch))
            if finite and last and all(loss_at_chance(v, size) for v, size in last):
                log.warning(
                    "eval-distilled: model %d's last-epoch training loss is at chance (it tells "
                    "no training pair from another) at lr_img %g, lr_txt %g: an lr far too "
                    "high blows the encoders up and freezes them (eval.coreset_lr for the "
                    "coresets)",
                    i,
                    lr_img,
                    lr_txt,
                )
            recall["diverged"] = not finite
            out.append(recall)
        return out


def last_epoch_losses(
    losses: list[tuple[float, int, int]], steps_per_epoch: int
) -> list[tuple[float, int]]:
    """(mean loss, batch size) of the blocks of the last `steps_per_epoch` steps, from
    `losses` of (mean loss of k steps, k, batch size) blocks in order; batches of one pair
    (loss 0 always) left out."""
    last, left = [], steps_per_epoch
    for v, k, size in reversed(losses):
        if left <= 0:
            break
        left -= k
        if size > 1:
            last.append((v, size))
    return last


def epoch_minibatches(key: jax.Array, n: int, batch: int, steps: int) -> list[np.ndarray]:
    """`steps` minibatches of whole epochs over n rows, as (k, size) index blocks in order:
    each epoch a fresh permutation cut into batches of `batch`, the last one smaller where
    `batch` does not divide n (a PyTorch DataLoader with shuffle and without drop_last, the
    reference's evaluation), so every row is seen once per epoch."""
    full, rest = divmod(n, batch)
    blocks: list[np.ndarray] = []
    left, epoch = steps, 0
    while left > 0:
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n), np.int32)
        head = perm[: full * batch].reshape(full, batch)[:left]
        blocks.append(head)
        left -= len(head)
        if rest and left > 0:
            blocks.append(perm[full * batch :][None])
            left -= 1
        epoch += 1
    return blocks


# The training pairs each coreset took: {"<budget>": {"<method>": [pair id, ...]}}, in the
# order the method chose them (herding / k-center: greedy order; forgetting: most forgetting
# events first; random: sorted).
CORESET_IDS = "eval-distilled_coresets.json"


def coreset_indices(
    method: str,
    budget: int,
    seed: int,
    features: np.ndarray,
    correct: np.ndarray,
) -> np.ndarray:
    if method == "random":
        return coresets.random_coreset(len(features), budget, seed)
    if method == "herding":
        return coresets.herding(features, budget)
    if method == "kcenter":
        return coresets.kcenter(features, budget, seed)
    if method == "forgetting":
        return coresets.forgetting(correct, budget, seed)
    raise ValueError(f"unknown coreset {method!r}")


def _summarise(runs: list[dict[str, float]], **meta: Any) -> dict[str, Any]:
    """The six keys' mean and (population) std over the models, and each model's own
    recall, final training loss (None where not finite) and whether it diverged."""
    diverged = sum(bool(r.get("diverged")) for r in runs)
    models = [
        {
            **{k: r[k] for k in et.RECALL_KEYS},
            "final_loss": r["final_loss"] if np.isfinite(r["final_loss"]) else None,
            "diverged": bool(r.get("diverged")),
        }
        for r in runs
    ]
    return {**et.mean_std(runs), "diverged_models": diverged, "models": models, **meta}


def _key_label(key: str) -> str:
    """A recall key as the table and the plot print it: tr_r1 -> TR@1."""
    return key.upper().replace("_R", "@")


def markdown_table(results: dict[int, dict[str, dict]], experts: dict | None) -> str:
    keys = et.RECALL_KEYS
    head = "| pairs | method | " + " | ".join(_key_label(k) for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for budget in sorted(results):
        for name, r in results[budget].items():
            method = METHOD_LABELS.get(name, name)
            cells = " | ".join(f"{r[k]['mean']:.1f} ± {r[k]['std']:.1f}" for k in keys)
            if r.get("diverged_models"):
                method = f"{method} ({r['diverged_models']} diverged)"
            if r.get("skipped_iterations"):
                method = (
                    f"{method} ({r['skipped_iterations']} of {r['iterations']} iterations skipped)"
                )
            elif r.get("iterations") == 0:
                method = f"{method} (its initialisation: 0 iterations)"
            if "lr_img" in r and not (r["lr_img"] > 0 and r["lr_txt"] > 0):
                method = f"{method} (learned step sizes {r['lr_img']:g} / {r['lr_txt']:g})"
            lines.append(f"| {budget} | {method} | {cells} |")
    if experts:
        cells = " | ".join(f"{experts[k]['mean']:.1f} ± {experts[k]['std']:.1f}" for k in keys)
        lines.append(f"| all | experts (full data) | {cells} |")
    return "\n".join(lines) + "\n"


def recall_plot(path: Path, results: dict[int, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    budgets = sorted(results)
    for ax, key in zip(axes, ("tr_r1", "ir_r1"), strict=True):
        for method in METHODS:
            pts = [(b, results[b][method][key]) for b in budgets if method in results[b]]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            err = [p[1]["std"] for p in pts]
            style = dict(marker="*", markersize=12) if method == "distilled" else dict(marker="o")
            ax.errorbar(
                xs, ys, yerr=err, label=METHOD_LABELS.get(method, method), capsize=3, **style
            )
        ax.set_xscale("log")
        # The budgets themselves as plain ticks (a log axis labels 4 and 8 as 4x10^0 ...).
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.set_ylabel(_key_label(key) + " (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, path)


def check_distilled_iterations(
    syn: dict[str, np.ndarray], config: ml_collections.ConfigDict, npz: Path
) -> int | None:
    """The distilled set's outer iterations (None for a set saved before they were recorded).
    Refuses a set of fewer than distill.iterations: a distill run that was to go further
    stopped before its end, and the set on disk is the previous run's."""
    if "iterations" not in syn:
        return None
    have, want = int(syn["iterations"]), int(config.distill.iterations)
    if have < want:
        raise ConfigError(
            f"{npz} holds a set distilled for {have} iterations, not distill.iterations="
            f"{want}: distill has not run that far (a run stopped early, or "
            f"distill.iterations was raised since). Run `tldr-jax distill` with these settings "
            f"first (it resumes from iteration {have}), or evaluate with "
            f"--config.distill.iterations={have}"
        )
    if have > want:
        log.warning(
            "eval-distilled: the set was distilled for %d iterations (distill.iterations=%d)",
            have,
            want,
        )
    return have


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`tldr-jax eval-distilled`: distilled set vs coresets; json + md (+ png) in workdir."""
    workdir_p = Path(workdir)
    npz = workdir_p / "distill" / "distilled.npz"
    if not npz.exists():
        raise FileNotFoundError(f"{npz} not found: run `tldr-jax distill` first")
    syn = io.read_npz(npz, made_by="distill")
    seed = int(config.seed)
    b, e = config.buffer, config.eval
    data = et.load_pairs(config, workdir)
    sig = distill_signature(config, et.check_buffer(workdir, config, data))
    et.check_distill_signature(workdir_p / "distill" / "signature.json", sig)
    distilled_iterations = check_distilled_iterations(syn, config, npz)
    n = data.num_pairs
    student = et.build_student(config, data.train_txt.shape[1])
    evaluator = Evaluator(config, student, data)

    t0 = time.time()
    m = len(syn["images"])
    lr_img, lr_txt = float(syn["lr_img"]), float(syn["lr_txt"])
    if not (lr_img > 0 and lr_txt > 0):  # SPEC B.4 trains at the learned step sizes as they are
        log.warning(
            "eval-distilled: a learned step size is not positive (lr_img %g, lr_txt %g): the "
            "distilled set's models train with them as they are (at 0 a model does not train, "
            "below 0 it trains away from the data)%s",
            lr_img,
            lr_txt,
            "; distill.step_size_param=log keeps them positive"
            if str(config.distill.get("step_size_param", "log")) == "raw"
            else "; they collapsed in distill (distill.json's diverged, metrics/distill.csv)",
        )
    skipped = int(syn["skipped"]) if "skipped" in syn else None
    if distilled_iterations == 0:
        log.warning(
            "eval-distilled: the set was distilled for 0 iterations (distill.iterations=0): "
            "it is its initialisation, not a distilled set"
        )
    elif skipped and skipped == distilled_iterations:
        log.warning(
            "eval-distilled: the NaN guard skipped every one of the set's %d iterations: it is "
            "its initialisation, not a distilled set (distill.json's skipped)",
            skipped,
        )
    # SPEC B.4: one optimiser at the learned image step size (the reference's `lr_net`);
    # eval.text_head_lr=text trains the text head at the learned text step size instead.
    head_lr = lr_txt if str(e.get("text_head_lr", "image")) == "text" else lr_img
    # LoRS: the learned similarity is the distilled set's contrastive target (coresets: identity).
    similarity = syn.get("similarity")
    distilled = _summarise(
        evaluator.train_and_eval(
            syn["images"], syn["texts"], lr_img, head_lr, tag=0, targets=similarity
        ),
        num_pairs=m,
        iterations=distilled_iterations,
        skipped_iterations=skipped,  # of those, left out by distill's NaN guard
        lr_img=lr_img,
        lr_txt=lr_txt,
        lr_text_head=head_lr,
        soft_targets=similarity is not None,
    )
    log.info(
        "eval-distilled: distilled %d pairs: TR@1 %.1f IR@1 %.1f",
        m,
        distilled["tr_r1"]["mean"],
        distilled["ir_r1"]["mean"],
    )

    # Coreset features and forgetting events from the first finished expert.
    epochs = int(b.epochs)
    trajs = et.load_trajectories(workdir_p, int(b.num_experts), epochs, student.num_params, n)
    final = (jnp.asarray(trajs[0]["img"][-1]), jnp.asarray(trajs[0]["txt"][-1]))
    img_f, txt_f = evaluator.embed(final, data.train_images, data.train_txt)
    features = np.concatenate([img_f, txt_f], axis=1)
    correct = trajs[0]["correct"][1:]
    finals = []
    for i in range(int(b.num_experts)):
        _, extra, done = et.load_expert(workdir_p, i, epochs, student.num_params, n)
        if done == epochs and extra.get("recall"):
            finals.append(extra["recall"][-1])
    expert_recall = et.mean_std(finals) if finals else None

    asked = int(e.coreset_pairs) or m
    main_budget = min(asked, n)
    if asked > n:
        log.warning(
            "eval-distilled: coreset budget %d > %d training pairs; the coresets take all %d",
            asked,
            n,
            n,
        )
    extra_budgets = [int(x) for x in e.budgets]
    for bud in extra_budgets:
        if bud > n:
            log.warning("eval-distilled: budget %d > %d training pairs, left out", bud, n)
    budgets = sorted({main_budget, *(bud for bud in extra_budgets if bud <= n)})
    coreset_lr = float(e.coreset_lr)
    results: dict[int, dict[str, dict]] = {bud: {} for bud in budgets}
    results.setdefault(m, {})["distilled"] = distilled
    picks: dict[str, dict[str, list[str]]] = {str(bud): {} for bud in budgets}
    for bud in budgets:
        for j, method in enumerate(METHODS[1:]):
            idx = coreset_indices(method, bud, seed, features, correct)
            picks[str(bud)][method] = [data.train_pair_ids[i] for i in idx]
            runs = evaluator.train_and_eval(
                data.train_images[idx], data.train_txt[idx], coreset_lr, coreset_lr, tag=bud + j
            )
            results[bud][method] = _summarise(runs, num_pairs=bud, lr=coreset_lr)
            log.info(
                "eval-distilled: %s %d pairs: TR@1 %.1f IR@1 %.1f",
                method,
                bud,
                results[bud][method]["tr_r1"]["mean"],
                results[bud][method]["ir_r1"]["mean"],
            )

    summary: dict[str, Any] = {"distilled": distilled}
    for method in METHODS[1:]:
        summary[method] = results[main_budget][method]
    summary["budgets"] = {str(k): v for k, v in sorted(results.items())}
    summary["experts_full_data"] = expert_recall
    summary["train_pairs"] = n
    summary["protocol"] = {
        "num_models": int(e.num_models),
        "epochs": int(e.epochs),
        "max_steps": int(e.get("max_steps", 0)),  # > 0: each model's steps capped there
        "text_head_lr": str(e.get("text_head_lr", "image")),
        "batch_size": int(e.batch_size),
        "momentum": float(e.momentum),
        "weight_decay": float(e.weight_decay),
        "coreset_lr": coreset_lr,
        "coreset_pairs": main_budget,
        "coreset_pairs_asked": asked,
        "coreset_features": "expert 0 final epoch: [image emb, text emb] (L2-normalised)",
        "forgetting_events": "expert 0, rank-1 in-batch retrieval per epoch (recorded by buffer)",
    }
    summary["time_s"] = time.time() - t0
    summary.update(pretrain.data_summary(data.train, data.test))  # rows read, skipped per reason
    summary["coreset_ids"] = os.path.abspath(workdir_p / CORESET_IDS)
    if dist.is_main():
        io.write_json(workdir_p / CORESET_IDS, picks, indent=None)
        io.write_text(workdir_p / "eval-distilled.md", markdown_table(results, expert_recall))
        plot = workdir_p / "eval-distilled.png"
        if len(results) > 1:
            recall_plot(plot, results)
        else:  # one budget: no curve; an earlier run's would contradict the JSON
            plot.unlink(missing_ok=True)
    return summary
