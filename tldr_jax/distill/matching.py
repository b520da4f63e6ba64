"""Trajectory matching for vision-language dataset distillation: the pure math.

What is learned is a `SyntheticSet` (images in normalised pixel space, text embeddings, one step
size per modality). How it is scored: a student starts at an expert's parameters at epoch s,
takes `syn_steps` SGD steps on the synthetic set, and the normalised parameter distance to the
expert at epoch s + expert_epochs is the meta loss (SPEC B.3). Its gradient w.r.t. the synthetic
set comes from one of three modes:

- "unroll": reverse mode through the `lax.scan`; memory grows linearly with syn_steps (every
  step's parameters and activations are kept), like the PyTorch reference.
- "remat": the same exact gradient with every student step `jax.checkpoint`ed: the backward
  pass keeps one parameter vector per step plus one step's activations. When those N vectors
  would pass `InnerLoop.remat_budget_mib`, nested (sqrt(N)) checkpointing: the scan runs over
  chunks of ~sqrt(N) steps, each chunk checkpointed too, so O(sqrt(N)) vectors are kept for
  one more inner gradient per step.
- "tesla": the TESLA estimator (Cui et al. 2023), memory independent of syn_steps. See
  `tesla_meta_loss_and_grad` for exactly which terms it drops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from tldr_jax.distill.student import Student
from tldr_jax.train.state import all_finite  # noqa: F401 (also imported from here)

GradMode = Literal["unroll", "remat", "tesla"]
GRAD_MODES: tuple[str, ...] = ("unroll", "remat", "tesla")
LOGIT_SCALE = 1.0 / 0.07  # SPEC B.1
QUIRK_LOGIT_SCALE = math.log(1.0 / 0.07)  # the reference's inner loop: ln(1/0.07) = 2.66

Params = tuple[jax.Array, jax.Array]  # (flat image-encoder params, flat text-head params)


@struct.dataclass
class SyntheticSet:
    """Everything the outer loop learns. `lr_img` / `lr_txt` are scalar student step sizes.

    Optional LoRS (Xu et al. 2024) fields, None when off: a learned soft image-text similarity
    S = diag(sim_diag) + sim_scale * sim_left @ sim_right.T (M x M) that replaces the identity
    as the student's contrastive targets (`similarity`). `sim_scale` (alpha / rank) is static.
    """

    images: jax.Array  # (M, H, W, 3) normalised pixels
    texts: jax.Array  # (M, D) text-encoder embeddings
    lr_img: jax.Array
    lr_txt: jax.Array
    sim_diag: jax.Array | None = None  # (M,)
    sim_left: jax.Array | None = None  # (M, r)
    sim_right: jax.Array | None = None  # (M, r)
    sim_scale: float = struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(cls, images: ArrayLike, texts: ArrayLike, step_size: float = 0.1) -> SyntheticSet:
        lr = jnp.asarray(step_size, jnp.float32)
        return cls(jnp.asarray(images), jnp.asarray(texts), lr, lr)

    @property
    def lors(self) -> bool:
        return self.sim_diag is not None

    def with_lors(self, key: jax.Array, rank: int = 10, alpha: float = 0.1) -> SyntheticSet:
        """Adds LoRS factors initialised at S = I: diag ones, left ~ N(0, 1), right zeros."""
        m = self.images.shape[0]
        dtype = self.texts.dtype
        return self.replace(
            sim_diag=jnp.ones((m,), dtype),
            sim_left=jax.random.normal(key, (m, rank), dtype),
            sim_right=jnp.zeros((m, rank), dtype),
            sim_scale=float(alpha) / int(rank),
        )


def lors_similarity(
    diag: jax.Array, left: jax.Array, right: jax.Array, scale: float, idx: jax.Array | None = None
) -> jax.Array:
    """S[idx][:, idx] for S = diag(diag) + scale * left @ right.T; the whole S if idx is None.

    The diagonal part is exact for repeated indices too (entries where idx[i] == idx[j])."""
    if idx is None:
        return jnp.diag(diag) + scale * left @ right.T
    d = jnp.where(idx[:, None] == idx[None, :], diag[idx][:, None], 0.0)
    return d + scale * left[idx] @ right[idx].T


def similarity(syn: SyntheticSet, idx: jax.Array | None = None) -> jax.Array | None:
    """The LoRS soft targets of minibatch `idx` (B, B) (all M x M if None); None without LoRS."""
    if not syn.lors:
        return None
    return lors_similarity(syn.sim_diag, syn.sim_left, syn.sim_right, syn.sim_scale, idx)


@dataclasses.dataclass(frozen=True)
class InnerLoop:
    """How the student trains on the synthetic set. The defaults follow SPEC B.1; the
    reference's quirks are `logit_scale=QUIRK_LOGIT_SCALE` and `train_dropout=True`."""

    logit_scale: float = LOGIT_SCALE
    train_dropout: bool = False
    # Fully unroll the student's `lax.scan`s (`distill.scan_unroll`; compile time then grows
    # with syn_steps). Was the CPU default while XLA:CPU's second-order convs ran ~35x slower
    # inside loops; the matmul-form convs (models/conv.py) removed that penalty, so the loop
    # stays rolled by default (what unrolling still buys: README, distillation figures).
    unroll: bool = False
    # > 1: the image tower of each student step runs in this many micro-batches (GradCache:
    # embeddings first, then each micro-batch's parameter VJP with its slice of dL/d
    # embedding, rematerialised), so a step's second-order intermediates are those of one
    # micro-batch. The same gradient; it must divide the student batch.
    micro_batches: int = 1
    # `remat` keeps one parameter vector per student step while all N of them fit in this many
    # MiB; above it, nested sqrt(N) chunks keep ~2 sqrt(N) for one more inner gradient per
    # step (+25% work). NF-ResNet-26 at 10 steps (71 MB vectors): peak RSS 3300 MiB unnested vs
    # 3338 nested, 84.6 vs 91.8 s per iteration: nesting there bought nothing.
    remat_budget_mib: float = 1024.0
    # A NamedSharding of the student batch's leading axis (data parallel over the mesh's
    # devices: each takes a slice of every student step's batch, the parameter gradients are
    # summed across them); None: the batch is not split.
    batch_sharding: Any = None


def shard_student_batch(x: jax.Array, inner: InnerLoop, axis: int = 0) -> jax.Array:
    """`x` with its batch axis `axis` laid out by `inner.batch_sharding` (when set)."""
    sharding = inner.batch_sharding
    if sharding is None:
        return x
    spec = P(*([None] * axis), *sharding.spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def _minibatch(syn: SyntheticSet, idx: jax.Array, inner: InnerLoop) -> tuple[jax.Array, jax.Array]:
    """Rows `idx` of the synthetic images and texts, laid out for the student's batch."""
    return shard_student_batch(syn.images[idx], inner), shard_student_batch(syn.texts[idx], inner)


def contrastive_loss(
    img_emb: jax.Array,
    txt_emb: jax.Array,
    logit_scale: float,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Symmetric InfoNCE on L2-normalised embeddings; pair i matches pair i.

    `targets` (B, B): soft InfoNCE (LoRS) instead, 0.5 * (mean_i -sum_j S_ij log_softmax(
    logits)_ij + the same on logits.T with S.T); S = I gives the hard loss.
    """
    img = img_emb / jnp.linalg.norm(img_emb, axis=-1, keepdims=True).clip(1e-12)
    txt = txt_emb / jnp.linalg.norm(txt_emb, axis=-1, keepdims=True).clip(1e-12)
    logits = logit_scale * img @ txt.T
    if targets is not None:
        targets = targets.astype(logits.dtype)
        i2t = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1).mean()
        t2i = -jnp.sum(targets.T * jax.nn.log_softmax(logits.T, axis=1), axis=1).mean()
        return 0.5 * (i2t + t2i)
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (i2t + t2i)


def sample_minibatches(key: jax.Array, num_syn: int, syn_steps: int, batch_syn: int) -> jax.Array:
    """(syn_steps, batch_syn) int32 indices: consecutive chunks of fresh permutations, so every
    synthetic pair is used once before any repeats (as the reference does) where batch_syn
    divides num_syn; otherwise each permutation's last num_syn % batch_syn pairs are left
    out (the reference takes them as a smaller last chunk; one static batch shape here)."""
    batch_syn = min(batch_syn, num_syn)
    per_perm = num_syn // batch_syn
    num_perms = -(-syn_steps // per_perm)
    keys = jax.random.split(key, num_perms)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_syn)[: per_perm * batch_syn])(keys)
    return perms.reshape(-1, batch_syn)[:syn_steps].astype(jnp.int32)


def param_distance_loss(end: Params, start: Params, target: Params) -> jax.Array:
    """Mean over modalities of |end - target|^2 / |start - target|^2 (SPEC B.3).

    1 when the student does not move, 0 when it lands on the target. The reference sums the
    two terms (2 at rest); the mean keeps the loss on the scale "fraction of the expert's
    segment left to cover" and halves every meta-gradient: `distill.lr_images` 1000 here moves
    the images as the reference's lr 500 would on its summed loss.
    """
    terms = [
        jnp.sum(jnp.square(e - t)) / jnp.sum(jnp.square(s - t))
        for e, s, t in zip(end, start, target, strict=True)
    ]
    return sum(terms) / len(terms)


def _inner_loss(
    student: Student,
    inner: InnerLoop,
    theta: Params,
    images: jax.Array,
    texts: jax.Array,
    rng: jax.Array,
    targets: jax.Array | None = None,
) -> jax.Array:
    img, txt = student.apply(
        theta[0], theta[1], images, texts, rng=rng, train_dropout=inner.train_dropout
    )
    return contrastive_loss(img, txt, inner.logit_scale, targets)


def inner_grad(
    student: Student,
    inner: InnerLoop,
    theta: Params,
    images: jax.Array,
    texts: jax.Array,
    rng: jax.Array,
    targets: jax.Array | None = None,
) -> Params:
    """Gradient of the student's contrastive loss on one minibatch w.r.t. its parameters
    (soft InfoNCE against `targets` (B, B) when given: LoRS).

    With `inner.micro_batches = k > 1` the image tower is evaluated in k slices: all image
    embeddings first, then dL/d(embeddings) on the whole batch (InfoNCE couples every pair),
    then the sum over slices of each slice's parameter VJP. Both slice loops are
    `jax.checkpoint`ed scans, so differentiating this gradient again (the meta-gradient) keeps
    one slice's intermediates instead of the whole batch's. Exact: only the summation order
    changes. Image-tower dropout keys differ per slice (the encoders here have none).
    """
    k = int(inner.micro_batches)
    if k <= 1:
        return jax.grad(lambda t: _inner_loss(student, inner, t, images, texts, rng, targets))(
            theta
        )
    if images.shape[0] % k:
        raise ValueError(f"micro_batches={k} does not divide the student batch {images.shape[0]}")
    k_img, k_txt = jax.random.split(rng)
    train = inner.train_dropout
    slices = shard_student_batch(
        images.reshape(k, images.shape[0] // k, *images.shape[1:]), inner, 1
    )
    slice_keys = jax.random.split(k_img, k)

    def tower(th: jax.Array, x: jax.Array, key: jax.Array) -> jax.Array:
        return student.image.apply(th, x, rng=key if train else None, train=train)

    @jax.checkpoint
    def embed(_, xs):
        return None, tower(theta[0], *xs)

    img = jax.lax.scan(embed, None, (slices, slice_keys))[1].reshape(images.shape[0], -1)
    txt, txt_vjp = jax.vjp(
        lambda th: student.text.apply(th, texts, rng=k_txt if train else None, train=train),
        theta[1],
    )
    d_img, d_txt = jax.grad(
        lambda a, b: contrastive_loss(a, b, inner.logit_scale, targets), argnums=(0, 1)
    )(img, txt)

    @jax.checkpoint
    def slice_grad(x: jax.Array, key: jax.Array, d: jax.Array):
        _, vjp = jax.vjp(lambda th: tower(th, x, key), theta[0])
        return vjp(d)[0]

    def accumulate(g, xs):
        # Only the slice's VJP is checkpointed: its residuals are the slice's inputs. The
        # running sum is linear, so the meta-gradient saves no per-slice copy of `g`.
        return jax.tree.map(jnp.add, g, slice_grad(*xs)), None

    d_slices = d_img.reshape(k, -1, d_img.shape[-1])
    zeros = jax.tree.map(jnp.zeros_like, theta[0])
    g_img = jax.lax.scan(accumulate, zeros, (slices, slice_keys, d_slices))[0]
    return g_img, txt_vjp(d_txt)[0]


def _sgd(theta: Params, grad: Params, syn: SyntheticSet) -> Params:
    """One plain SGD step of both modalities with the learned step sizes (flat vectors or
    parameter-leaf states alike)."""

    def update(t, g, lr: jax.Array):
        return jax.tree.map(lambda p, d: p - lr * d, t, g)

    return update(theta[0], grad[0], syn.lr_img), update(theta[1], grad[1], syn.lr_txt)


def _step_fn(
    student: Student, inner: InnerLoop, syn: SyntheticSet
) -> Callable[[Params, tuple[jax.Array, jax.Array]], tuple[Params, None]]:
    """One student SGD step on minibatch `idx` of `syn`, as a `lax.scan` body."""

    def step(theta: Params, xs: tuple[jax.Array, jax.Array]) -> tuple[Params, None]:
        idx, rng = xs
        targets = similarity(syn, idx)
        g = inner_grad(student, inner, theta, *_minibatch(syn, idx, inner), rng, targets)
        return _sgd(theta, g, syn), None

    return step


# Fewer student steps than this: `remat` never nests. Nesting saves parameter vectors
# (N -> ~2 sqrt(N)) but replays every chunk once more in the backward pass, one more inner
# gradient per step; below ~9 steps it saves almost nothing.
NEST_MIN_STEPS = 9


def _chunk_size(n: int, vector_mib: float = math.inf, budget_mib: float = 0.0) -> int:
    """Steps per checkpointed chunk of `remat`: ceil(sqrt(n)), or 1 (no chunks) for short runs
    and where the n per-step parameter vectors (`vector_mib` each) fit in `budget_mib`."""
    if n < NEST_MIN_STEPS or n * vector_mib <= budget_mib:
        return 1
    return math.isqrt(n - 1) + 1


def remat_chunk(n: int, theta: Params, inner: InnerLoop = InnerLoop()) -> int:
    """Student steps per nested chunk that `remat` uses for `n` steps from parameters shaped
    like `theta` (arrays or `jax.ShapeDtypeStruct`s); 1 = not nested."""
    mib = sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(theta)) / 2**20
    return _chunk_size(n, mib, inner.remat_budget_mib)


def student_unroll(
    student: Student,
    syn: SyntheticSet,
    theta0: Params,
    batch_idx: jax.Array,
    rng: jax.Array,
    inner: InnerLoop = InnerLoop(),
    *,
    remat: bool = False,
) -> Params:
    """Runs `batch_idx.shape[0]` student SGD steps from `theta0`; differentiable in `syn`.

    `remat=True` checkpoints each step: N parameter vectors are kept for the backward pass. Where
    they would pass `inner.remat_budget_mib` (and N >= `NEST_MIN_STEPS`) it nests: an outer scan
    over chunks of ceil(sqrt(N)) steps whose body is checkpointed (only chunk-boundary
    parameters are saved), and a checkpointed step inside (a chunk's backward keeps one
    parameter vector per step and one step's activations). Steps that do not fill a whole
    chunk run in a trailing checkpointed scan.
    """
    n = batch_idx.shape[0]
    xs = (batch_idx, jax.random.split(rng, n))
    step = _step_fn(student, inner, syn)
    unroll = inner.unroll
    # The scan carries the parameters as the modules' own leaves, flattened only at the ends,
    # so no step concatenates its gradient (or, in the meta-gradient, its cotangent) into a
    # full-size vector and slices it apart again (a small saving: nf_resnet26's one-step
    # meta-backward 1610 -> 1603 MiB XLA temp).
    theta = student.unflatten(*theta0)
    if not remat:
        return student.flatten(*jax.lax.scan(step, theta, xs, unroll=unroll)[0])

    step = jax.checkpoint(step)
    k = remat_chunk(n, theta0, inner)
    if k == 1:
        return student.flatten(*jax.lax.scan(step, theta, xs, unroll=unroll)[0])
    n_chunks, rem = divmod(n, k)

    @jax.checkpoint
    def chunk(theta: Params, chunk_xs: tuple[jax.Array, jax.Array]) -> tuple[Params, None]:
        return jax.lax.scan(step, theta, chunk_xs, unroll=unroll)[0], None

    head = jax.tree.map(lambda a: a[: n_chunks * k].reshape(n_chunks, k, *a.shape[1:]), xs)
    theta = jax.lax.scan(chunk, theta, head, unroll=unroll)[0]
    if rem:
        tail = jax.tree.map(lambda a: a[n_chunks * k :], xs)
        theta = jax.lax.scan(step, theta, tail, unroll=unroll)[0]
    return student.flatten(*theta)


def meta_loss(
    syn: SyntheticSet,
    student: Student,
    expert_start: Params,
    expert_target: Params,
    batch_idx: jax.Array,
    rng: jax.Array,
    inner: InnerLoop = InnerLoop(),
    *,
    remat: bool = False,
) -> jax.Array:
    """The trajectory-matching loss of `syn` for one (expert, start epoch) draw."""
    end = student_unroll(student, syn, expert_start, batch_idx, rng, inner, remat=remat)
    return param_distance_loss(end, expert_start, expert_target)


def tesla_meta_loss_and_grad(
    syn: SyntheticSet,
    student: Student,
    expert_start: Params,
    expert_target: Params,
    batch_idx: jax.Array,
    rng: jax.Array,
    inner: InnerLoop = InnerLoop(),
) -> tuple[jax.Array, SyntheticSet]:
    """TESLA (Cui et al. 2023): two forward passes, memory independent of syn_steps.

    With plain SGD, theta_N = theta_0 - sum_i lr * g_i(theta_i, X), so the exact gradient is
      dL/dX = sum_i (-lr) [d g_i/dX + d g_i/d theta_i . d theta_i/dX]^T dL/dtheta_N.
    TESLA keeps only the direct term d g_i/dX with theta_i held constant (a stop-gradient on
    the student's parameters at every step), dropping every cross-step term that flows through
    theta_i's own dependence on X. Likewise dL/dlr = -sum_i g_i . dL/dtheta_N (the exact value
    also carries the lr-dependence of theta_i); the LoRS factors (when present) get the same
    direct term as the data, through each step's soft targets. It is exact for syn_steps = 1
    and close when the Hessian terms lr * H_i are small. Pass 1 runs the student storing
    nothing to get theta_N and c = dL/dtheta_N; pass 2 replays the identical steps (same
    minibatches and dropout keys) and accumulates the VJP of each step's gradient with
    cotangent -lr * c.
    """
    n = batch_idx.shape[0]
    xs = (batch_idx, jax.random.split(rng, n))
    step = _step_fn(student, inner, syn)

    theta_end = jax.lax.scan(step, expert_start, xs, unroll=inner.unroll)[0]
    loss, c = jax.value_and_grad(param_distance_loss)(theta_end, expert_start, expert_target)
    cot = (-syn.lr_img * c[0], -syn.lr_txt * c[1])

    lors = syn.lors
    sim = (syn.sim_diag, syn.sim_left, syn.sim_right) if lors else ()

    def replay(carry, step_xs):
        theta, g_images, g_texts, g_lr_img, g_lr_txt, g_sim = carry
        idx, key = step_xs

        def step_grad(images: jax.Array, texts: jax.Array, sim_rows: tuple) -> Params:
            # LoRS: the (B, B) targets from the minibatch's rows of the factors (same values as
            # `similarity(syn, idx)`), so the VJP also gives the factors' direct term.
            targets = lors_similarity(*sim_rows, syn.sim_scale, idx) if lors else None
            return inner_grad(student, inner, theta, images, texts, key, targets)

        # Full-size factors, gathered inside `lors_similarity`: their VJP is already scattered.
        g, vjp = jax.vjp(step_grad, *_minibatch(syn, idx, inner), sim)
        d_images, d_texts, d_sim = vjp(cot)
        carry = (
            _sgd(theta, g, syn),
            g_images.at[idx].add(d_images),
            g_texts.at[idx].add(d_texts),
            g_lr_img - jnp.vdot(g[0], c[0]),
            g_lr_txt - jnp.vdot(g[1], c[1]),
            jax.tree.map(jnp.add, g_sim, d_sim),
        )
        return carry, None

    zero = jnp.zeros((), loss.dtype)
    zeros_sim = jax.tree.map(jnp.zeros_like, sim)
    init = (
        expert_start,
        jnp.zeros_like(syn.images),
        jnp.zeros_like(syn.texts),
        zero,
        zero,
        zeros_sim,
    )
    out = jax.lax.scan(replay, init, xs, unroll=inner.unroll)[0]
    _, g_images, g_texts, g_lr_img, g_lr_txt, g_sim = out
    grads = syn.replace(images=g_images, texts=g_texts, lr_img=g_lr_img, lr_txt=g_lr_txt)
    if lors:
        grads = grads.replace(sim_diag=g_sim[0], sim_left=g_sim[1], sim_right=g_sim[2])
    return loss, grads


def meta_loss_and_grad(
    syn: SyntheticSet,
    student: Student,
    expert_start: Params,
    expert_target: Params,
    batch_idx: jax.Array,
    rng: jax.Array,
    inner: InnerLoop = InnerLoop(),
    *,
    grad_mode: GradMode = "remat",
) -> tuple[jax.Array, SyntheticSet]:
    """(meta loss, its gradient w.r.t. every field of `syn`) under the chosen `grad_mode`.

    `batch_idx`: (syn_steps, batch) rows of `syn` each student step trains on, each in
    [0, M) (under jit JAX clamps an index out of range instead of failing). The loss is
    normalised by the expert's own movement, so `expert_start` must differ from
    `expert_target` (equal ones give inf; the NaN guard of `outer_step` then skips)."""
    args = (student, expert_start, expert_target, batch_idx, rng, inner)
    if grad_mode == "tesla":
        return tesla_meta_loss_and_grad(syn, *args)
    if grad_mode not in ("unroll", "remat"):
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    return jax.value_and_grad(meta_loss)(syn, *args, remat=grad_mode == "remat")


StepSizeParam = Literal["log", "raw"]


def log_space_sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """SGD with momentum on log(step size), applied to the raw positive step size.

    The step size enters the student linearly, so a raw SGD step of fixed absolute size can
    cross zero (a negative step size trains the student *away* from the data, and the meta
    loss explodes). Descending on u = log(lr) instead: du = lr * dL/dlr, the momentum buffer
    lives in u-space, and the update lr * expm1(-eta * m) keeps lr > 0 and moves it by a
    relative amount. The `SyntheticSet` keeps storing the raw step size.
    """
    inner = optax.sgd(learning_rate, momentum=momentum)

    def update(grads, state, params):
        log_updates, state = inner.update(jax.tree.map(jnp.multiply, grads, params), state)
        return jax.tree.map(lambda u, p: p * jnp.expm1(u), log_updates, params), state

    return optax.GradientTransformation(inner.init, update)


def make_outer_optimizer(
    lr_images: float = 1000.0,
    lr_texts: float = 1000.0,
    lr_step_size: float = 1e-2,
    momentum: float = 0.5,
    *,
    step_size_param: StepSizeParam = "log",
    max_grad_norm: float = 0.0,
    lr_lors: float | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and one learning rate per field (SPEC B.3).

    `step_size_param="log"` descends on the log of the step sizes (`log_space_sgd`; then
    `lr_step_size` is a rate in log space); "raw" is the reference's plain SGD on the step size.
    `max_grad_norm > 0` clips each field's meta-gradient to that global norm first (the three
    LoRS factors together as one field). `lr_lors`: the one learning rate of the LoRS factors;
    None (no LoRS) keeps the optimiser state free of a LoRS group.
    """
    if step_size_param not in ("log", "raw"):
        raise ValueError(f"step_size_param must be log | raw, got {step_size_param!r}")

    def sgd(lr: float, log_space: bool = False) -> optax.GradientTransformation:
        tx = log_space_sgd(lr, momentum) if log_space else optax.sgd(lr, momentum=momentum)
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx) if max_grad_norm else tx

    log_space = step_size_param == "log"
    transforms = {
        "images": sgd(lr_images),
        "texts": sgd(lr_texts),
        "lr_img": sgd(lr_step_size, log_space),
        "lr_txt": sgd(lr_step_size, log_space),
    }
    if lr_lors is not None:
        transforms["lors"] = sgd(float(lr_lors))

    def labels(syn: SyntheticSet) -> SyntheticSet:
        if syn.lors and lr_lors is None:
            raise ValueError("the synthetic set has LoRS factors: pass lr_lors")
        lors = "lors" if syn.lors else None
        return syn.replace(
            images="images",
            texts="texts",
            lr_img="lr_img",
            lr_txt="lr_txt",
            sim_diag=lors,
            sim_left=lors,
            sim_right=lors,
        )

    return optax.multi_transform(transforms, labels)


def outer_step(
    syn: SyntheticSet,
    opt_state: optax.OptState,
    optimizer: optax.GradientTransformation,
    student: Student,
    expert_start: Params,
    expert_target: Params,
    batch_idx: jax.Array,
    rng: jax.Array,
    inner: InnerLoop = InnerLoop(),
    *,
    grad_mode: GradMode = "remat",
) -> tuple[SyntheticSet, optax.OptState, jax.Array, jax.Array]:
    """One outer iteration. Returns (syn, opt_state, loss, skipped): a non-finite loss or
    gradient leaves `syn` and the optimizer state untouched and sets `skipped` (the NaN guard).
    """
    loss, grads = meta_loss_and_grad(
        syn, student, expert_start, expert_target, batch_idx, rng, inner, grad_mode=grad_mode
    )
    ok = jnp.isfinite(loss) & all_finite(grads)
    # Zero the grads before the update so NaNs cannot leak into the momentum buffers either.
    safe = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_state = optimizer.update(safe, opt_state, syn)
    new_syn = optax.apply_updates(syn, updates)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return jax.tree.map(keep, new_syn, syn), jax.tree.map(keep, new_state, opt_state), loss, ~ok
