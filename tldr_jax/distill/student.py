"""A distillation student as a pure function of two flat parameter vectors.

Trajectory matching runs SGD on the student inside `jax.lax.scan` and differentiates through it,
so the student must be a pure function of its parameters: `nnx.split` the NNX modules once,
keep the graph definitions and non-trainable state (e.g. dropout RNG streams) aside, and
rebuild them with `nnx.merge` inside every call. Parameters travel as one flat float vector per
modality (image encoder, text head), the same layout as the expert snapshots, so the SGD step
and the parameter-distance loss are plain vector arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.flatten_util import ravel_pytree


@dataclasses.dataclass(frozen=True, eq=False)
class _PureModule:
    """One NNX module split into (graphdef, flat params, rest) with a pure `apply`."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    unravel: Callable[[jax.Array], nnx.State]
    rng_streams: tuple[str, ...]
    num_params: int

    def apply(
        self, theta: jax.Array | nnx.State, x: jax.Array, *, rng: jax.Array | None, train: bool
    ) -> jax.Array:
        params = self.unravel(theta) if isinstance(theta, jax.Array) else theta
        # Fresh Variables for the non-trainable state: merging the captured ones would try to
        # mutate Variables created outside the current trace (the RNG counters).
        module = nnx.merge(self.graphdef, params, jax.tree.map(jnp.asarray, self.rest))
        if train and self.rng_streams:
            if rng is None:
                raise ValueError("train=True with stochastic layers needs an rng key")
            nnx.reseed(module, **{name: rng for name in self.rng_streams})
        return module(x, train=train)


def _split(module: nnx.Module) -> tuple[_PureModule, jax.Array]:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)
    keys = jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.RngKey))
    streams = tuple(sorted({v.tag for v in keys if isinstance(v, nnx.RngKey)}))
    pure = _PureModule(graphdef, rest, unravel, streams, int(flat.size))
    return pure, flat


@dataclasses.dataclass(frozen=True, eq=False)
class Student:
    """Image encoder + text projection head as pure functions of flat parameter vectors.

    `apply(theta_img, theta_txt, images, text_emb, rng=, train_dropout=)` returns the
    (unnormalised) image and text embeddings. Close over it in jitted functions.
    """

    image: _PureModule
    text: _PureModule

    @property
    def num_params(self) -> tuple[int, int]:
        return self.image.num_params, self.text.num_params

    def apply(
        self,
        theta_img: jax.Array,
        theta_txt: jax.Array,
        images: jax.Array,
        text_emb: jax.Array,
        *,
        rng: jax.Array | None = None,
        train_dropout: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        k_img, k_txt = jax.random.split(rng) if rng is not None else (None, None)
        img = self.image.apply(theta_img, images, rng=k_img, train=train_dropout)
        txt = self.text.apply(theta_txt, text_emb, rng=k_txt, train=train_dropout)
        return img, txt

    def unflatten(self, theta_img: jax.Array, theta_txt: jax.Array) -> tuple[nnx.State, nnx.State]:
        """Flat vectors -> `nnx.Param` states (e.g. to `nnx.update` a module for evaluation).

        `apply` takes these states in place of the flat vectors too."""
        return self.image.unravel(theta_img), self.text.unravel(theta_txt)

    @staticmethod
    def flatten(state_img: nnx.State, state_txt: nnx.State) -> tuple[jax.Array, jax.Array]:
        """The inverse of `unflatten`: states -> flat vectors in the expert-snapshot layout."""
        return ravel_pytree(state_img)[0], ravel_pytree(state_txt)[0]


def make_student(
    image_encoder: nnx.Module, text_head: nnx.Module
) -> tuple[Student, jax.Array, jax.Array]:
    """Splits the two modules; returns the student and its initial flat (image, text) params.

    Both modules must be called as `module(x, train=...)`; the image encoder must have no
    batch statistics (its output may only depend on its parameters and its input).
    """
    image, theta_img = _split(image_encoder)
    text, theta_txt = _split(text_head)
    return Student(image, text), theta_img, theta_txt


def flatten_params(module: nnx.Module) -> jax.Array:
    """The module's `nnx.Param`s as one flat vector (the expert-snapshot layout)."""
    return ravel_pytree(nnx.state(module, nnx.Param))[0]
