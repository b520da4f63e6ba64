"""Image encoders (ConvNet, ViT, NFResNet), the BERT text encoder and projection heads."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from flax import nnx

from tldr_jax.models import convnet, nfresnet, vit

ENCODERS = ("convnet", "vit", "nfresnet")
log = logging.getLogger(__name__)
_WARNED: set[tuple[str, tuple[str, ...]]] = set()  # (encoder, left-out keys) already logged


_PRESETS: dict[str, dict[str, Callable[..., nnx.Module]]] = {
    "convnet": {},
    "vit": {"b16": vit.vit_b16_224, "tiny": vit.vit_tiny},
    "nfresnet": {"nf_resnet26": nfresnet.nf_resnet26, "tiny": nfresnet.nf_resnet_tiny},
}
_CLASSES: dict[str, Callable[..., nnx.Module]] = {
    "convnet": convnet.ConvNet,
    "vit": vit.ViT,
    "nfresnet": nfresnet.NFResNet,
}
# Positional or built-in arguments: not image_kwargs.
_NOT_KWARGS = {"self", "image_size", "rngs"}


def _keywords(fn: Callable[..., Any]) -> set[str]:
    # A class's own __init__ (an nnx.Module's metaclass hides it from signature(cls)).
    target = fn.__init__ if isinstance(fn, type) else fn
    params = inspect.signature(target).parameters.values()
    return {p.name for p in params if p.kind != p.VAR_KEYWORD} - _NOT_KWARGS


def _constructor(name: str, preset: str) -> Callable[..., nnx.Module]:
    if name not in _CLASSES:
        raise ValueError(f"unknown image encoder {name!r}: {' | '.join(ENCODERS)}")
    if not preset:
        return _CLASSES[name]
    if preset not in _PRESETS[name]:
        known = " | ".join(_PRESETS[name]) or "none"
        raise ValueError(f"unknown {name} preset {preset!r} (its presets: {known})")
    return _PRESETS[name][preset]


def encoder_kwargs(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the image_kwargs the encoder `name` takes, the keys left out as another encoder's).

    A config written for one encoder can switch to another with `--config.model.image=...`
    (and `--config.model.image_kwargs.preset=...`): keys only another encoder takes (a ConvNet's
    `norm` under nfresnet) are left out. An empty `preset` is no preset. Raises ValueError for
    an unknown encoder or preset and for a key no encoder takes.
    """
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", "") or ""
    ctor = _constructor(name, preset)
    takes = _keywords(ctor)
    used = {k: v for k, v in kwargs.items() if k in takes}
    rest = sorted(set(kwargs) - takes)
    anyone = set().union(*(_keywords(f) for f in _CLASSES.values()))
    anyone |= set().union(*(_keywords(f) for p in _PRESETS.values() for f in p.values()))
    unknown = [k for k in rest if k not in anyone]
    if unknown:
        what = f"{name} preset {preset!r}" if preset else name
        raise ValueError(
            f"image_kwargs {', '.join(unknown)}: not an argument of {what} (it takes "
            f"{', '.join(sorted(takes | {'preset'}))})"
        )
    if preset:
        used["preset"] = preset
    return used, rest


# Integer sizes an encoder needs at least 1 of (0 divided by zero inside the model, or built
# a network with no layers); and the encoders' names in messages.
_POSITIVE_ARGS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "stem_width")
_ENCODER_NAMES = {"convnet": "ConvNet", "vit": "ViT", "nfresnet": "NF-ResNet"}


def image_size_problem(name: str, kwargs: dict[str, Any], image_size: int) -> str | None:
    """Why the encoder `name` with `kwargs` cannot take `image_size` px images (a ViT's patch
    or a ConvNet's 2**depth pooling not dividing it, ViT-B/16 not at 224), or None. Read
    from the arguments and the constructor's defaults, before any model is built. A size
    below 1 (`_POSITIVE_ARGS`) is the argument's own fault: that message starts with
    `image_kwargs.KEY=VALUE:`."""
    kwargs, _ = encoder_kwargs(name, kwargs)
    preset = kwargs.pop("preset", "")
    if name == "vit" and preset == "b16":
        return None if image_size == 224 else "preset b16 is ViT-B/16 at 224 px"
    ctor = _constructor(name, preset)
    target = ctor.__init__ if isinstance(ctor, type) else ctor
    params = inspect.signature(target).parameters

    def arg(key: str) -> Any:
        return kwargs.get(key, params[key].default if key in params else None)

    for key in _POSITIVE_ARGS:
        value = arg(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            return f"image_kwargs.{key}={value}: must be >= 1 (the {_ENCODER_NAMES[name]}'s {key})"
    patch = arg("patch_size") if name == "vit" else None
    if isinstance(patch, int) and image_size % patch:
        return f"not a multiple of the ViT's patch_size {patch}"
    depth = arg("depth") if name == "convnet" else None
    if isinstance(depth, int) and image_size % 2**depth:
        return f"not a multiple of 2**depth = {2**depth} (the ConvNet halves it depth times)"
    return None


def make_image_encoder(
    name: str, kwargs: dict[str, Any], image_size: int, rngs: nnx.Rngs
) -> nnx.Module:
    """Builds an image encoder with `__call__(x, *, train=False) -> (B, out_dim)`.

    kwargs go to the constructor; a "preset" entry picks a factory instead:
      convnet:  ConvNet(image_size, width=128, depth=3, norm="instancenorm", pooling="flatten")
      vit:      ViT(image_size, patch_size, width, depth, num_heads, mlp_dim);
                presets "b16" (ViT-B/16, image_size must be 224) and "tiny"
      nfresnet: NFResNet(depths, widths, stem_width, bottle_ratio, alpha, skip_init, head_dim);
                presets "nf_resnet26" and "tiny" (NF-ResNets work at any image size)
    Keys of another encoder are left out with a warning (`encoder_kwargs`).
    """
    from tldr_jax.config_check import ConfigError  # a ValueError; the CLI prints one line

    try:
        why = image_size_problem(name, kwargs, image_size)
        kwargs, dropped = encoder_kwargs(name, kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    preset = kwargs.pop("preset", "")
    what = f"{name} preset {preset!r}" if preset else name
    if dropped and (what, tuple(dropped)) not in _WARNED:
        _WARNED.add((what, tuple(dropped)))
        log.warning("image encoder %s does not take image_kwargs %s: left out", what, dropped)
    if why:  # config_check says the same before any stage runs
        where = "" if why.startswith("image_kwargs.") else f"data.image_size={image_size}: "
        raise ConfigError(f"image encoder {what}: {where}{why}")
    ctor = _constructor(name, preset)
    args = () if name == "nfresnet" or preset == "b16" else (image_size,)
    try:
        return ctor(*args, **kwargs, rngs=rngs)
    except (ValueError, TypeError) as e:  # e.g. a width the ViT's heads do not divide
        raise ConfigError(f"image encoder {what} with image_kwargs {kwargs}: {e}") from e
