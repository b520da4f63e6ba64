"""Train state as a pure pytree, and one jitted, sharded update step for any NNX model.

The model is split once (`nnx.split`) into a static graph definition, its parameters, its
RNG streams and any other variables (e.g. an EMA codebook). The step merges them inside the
traced function, so training is a pure function of `{"params", "rest", "opt_state", "step"}`:
easy to shard with `jax.jit(in_shardings=, out_shardings=)` and to checkpoint with Orbax.
RNG streams are re-seeded from (seed, step) every step, so they are never checkpointed and a
resumed run draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tldr_jax.utils.dtypes import x32_unless_wide

log = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, dict, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a split model."""

    graphdef: Any
    rng_state: Any

    def merge(self, params: Any, rest: Any, key: jax.Array | None = None) -> nnx.Module:
        """Rebuilds the module; with `key`, every RNG stream is re-seeded from it (a fresh,
        traced state: the stored one belongs to the outer trace and must not be mutated)."""
        rng_state = self.rng_state if key is None else reseeded(self.rng_state, key)
        return nnx.merge(self.graphdef, params, rng_state, rest)


def reseeded(rng_state: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(rng_state)
    new = []
    for i, x in enumerate(leaves):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            new.append(jax.random.fold_in(key, i))
        else:  # stream counters restart at zero for every new key
            new.append(jnp.zeros_like(x))
    return jax.tree.unflatten(treedef, new)


def split_model(model: nnx.Module) -> tuple[ModelDef, Any, Any]:
    graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return ModelDef(graphdef, rng_state), params, rest


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "epoch_decay")


def all_finite(tree: Any) -> jax.Array:
    """Whether every leaf of `tree` is finite, as a boolean scalar (traceable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_all_finite_jit = jax.jit(all_finite)


def params_finite(params: Any) -> bool:
    """Whether every parameter is finite (one jitted reduction; the same on every process)."""
    return bool(_all_finite_jit(params)) if jax.tree.leaves(params) else True


def check_finite(
    name: str,
    step: int,
    block: str,
    tc: ml_collections.ConfigDict,
    remedy: str,
    *,
    loss: float | None = None,
    params: Any = None,
) -> None:
    """Stops a training run that diverged (a NaN or infinite `loss`, or `params` that are not
    all finite: an update can blow up the parameters while the loss it was computed with is
    still finite) with one line naming the run, the step and its `block.lr`, before the
    state is saved or evaluated: a diverged model's outputs (NaN scores, empty captions,
    zero recall) are not results. `remedy`: what to do besides lowering the lr (which
    workdir folders the setting binds)."""
    from tldr_jax.config_check import ConfigError

    if loss is not None and not math.isfinite(loss):
        what = f"loss {loss}"
    elif params is not None and not params_finite(params):
        what = "non-finite parameters"
    else:
        return
    clip = "" if float(tc.get("grad_clip", 0.0)) else f" (or set {block}.grad_clip)"
    raise ConfigError(
        f"{name}: training diverged at step {step} ({what}) at {block}.lr={float(tc.lr):g}. "
        f"Lower {block}.lr{clip} and {remedy}"
    )


def checkpoints_remedy(ckpt_dir: os.PathLike) -> str:
    """`check_finite`'s remedy where a run's setting binds only its checkpoint folder."""
    return f"use a new --workdir, or delete {ckpt_dir} (its checkpoints were made with it)"


def make_schedule(
    cfg: ml_collections.ConfigDict,
    total_steps: int,
    steps_per_epoch: int = 1,
    block: str | None = None,
) -> optax.Schedule:
    """The learning-rate schedule of a `train` config block (`make_optimizer`).

    `cosine`: a linear warm-up from 0 over warmup_steps (none at 0: the first step runs at
    lr), then a cosine decay to min_lr at total_steps. `constant`: the same warm-up, then lr.
    `epoch_decay` is SPEC A.1's: linear warm-up, then lr x decay_per_epoch at each epoch
    boundary after the one the warm-up ends in (a warm-up longer than an epoch reaches lr and
    decays from there, no drop), floored at min_lr. `block` (the config block's name, for a
    run about to train for total_steps) warns where the warm-up takes the whole run.
    """
    lr = float(cfg.lr)
    warmup = int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "cosine")
    # cosine / constant reach lr at step `warmup`; epoch_decay's warm-up at step warmup - 1
    short = total_steps < warmup if kind == "epoch_decay" else total_steps <= warmup
    if block is not None and warmup and short:
        log.warning(
            "%s.warmup_steps=%d covers all %d steps of this run: the learning rate never "
            "reaches %s.lr=%g%s",
            block,
            warmup,
            total_steps,
            block,
            lr,
            " (its first step runs at lr 0)" if kind != "epoch_decay" else "",
        )
    if kind == "cosine":
        end = float(cfg.get("min_lr", 0.0))
        sched = (
            optax.warmup_cosine_decay_schedule(
                0.0, lr, warmup, max(total_steps, warmup + 1), end_value=end
            )
            if warmup
            else optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=end / lr if lr else 0.0)
        )
    elif kind == "constant":
        sched = (
            optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
            )
            if warmup
            else optax.constant_schedule(lr)
        )
    elif kind == "epoch_decay":
        decay = float(cfg.get("decay_per_epoch", 0.9))
        min_lr = float(cfg.get("min_lr", 1e-6))
        spe = max(int(steps_per_epoch), 1)

        def sched(step: jax.Array) -> jax.Array:
            warm = lr * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
            epochs = jnp.maximum(jnp.floor(step / spe) - warmup // spe, 0)
            decayed = jnp.maximum(lr * decay**epochs, min_lr)
            return jnp.where(step < warmup, warm, decayed)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return sched


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    total_steps: int,
    steps_per_epoch: int = 1,
    block: str | None = None,
) -> optax.GradientTransformation:
    """Optimiser + schedule (`make_schedule`; `block`: warn where the warm-up takes the
    whole run) from a `train` config block.

    Keys: optimizer (adamw | sgd), lr, weight_decay, momentum, warmup_steps,
    schedule (cosine | constant | epoch_decay), decay_per_epoch, min_lr, grad_clip.
    """
    sched = make_schedule(cfg, total_steps, steps_per_epoch, block)

    name = cfg.get("optimizer", "adamw")
    if name == "adamw":
        tx = optax.adamw(sched, weight_decay=float(cfg.get("weight_decay", 0.0)))
    elif name == "sgd":
        mom = float(cfg.get("momentum", 0.0)) or None
        tx = optax.sgd(sched, momentum=mom)
        if cfg.get("weight_decay", 0.0):
            tx = optax.chain(optax.add_decayed_weights(float(cfg.weight_decay)), tx)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if cfg.get("grad_clip", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), tx)
    return without_x64(tx)


def without_x64(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` traced as without jax_enable_x64. Under x64 optax computes the schedules' learning
    rate and Adam's bias corrections (1 - decay**count) from the int32 step count in float64
    before casting them to the parameters' dtype: other roundings, another update. Trees with
    a 64-bit leaf keep optax's own behaviour."""

    def init(params: Any) -> Any:
        with x32_unless_wide(params):
            return tx.init(params)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        with x32_unless_wide((updates, state, params)):
            return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)


def init_state(params: Any, rest: Any, tx: optax.GradientTransformation) -> dict:
    return {
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }


def param_spec(x: jax.Array, fsdp: int) -> P:
    """FSDP rule: shard the largest axis divisible by the fsdp size; replicate the rest."""
    if fsdp <= 1 or x.ndim == 0 or x.size < 4096:
        return P()
    axes = sorted(range(x.ndim), key=lambda a: -x.shape[a])
    for a in axes:
        if x.shape[a] % fsdp == 0:
            spec = [None] * x.ndim
            spec[a] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a train state on `mesh` (parameters replicated, or FSDP-sharded when the
    mesh has an 'fsdp' axis of size > 1). Optimiser moments follow the parameter rule."""
    fsdp = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x, fsdp)), state)


def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    seed: int,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Returns the pure `step(state, batch) -> (state, metrics)`; jit it with shardings."""
    base_key = jax.random.key(seed)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(base_key, state["step"])

        def compute(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
            model = model_def.merge(params, state["rest"], key)
            loss, metrics = loss_fn(model, batch, True)
            _, _, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return loss, (metrics, rest)

        (loss, (metrics, rest)), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        new_state = {
            "params": params,
            "rest": rest,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    return step
