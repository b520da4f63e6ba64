"""Image encoders (ConvNet, ViT, NFResNet), the BERT text encoder and projection heads."""

from __future__ import annotations

from typing import Any

from flax import nnx

from tldr_jax.models import convnet, nfresnet, vit

ENCODERS = ("convnet", "vit", "nfresnet")


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
    """
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", "")
    if name == "convnet":
        if preset:
            raise ValueError(f"convnet has no presets (got {preset!r})")
        return convnet.ConvNet(image_size, **kwargs, rngs=rngs)
    if name == "vit":
        if preset == "b16":
            if image_size != 224:
                raise ValueError(f"preset b16 is ViT-B/16 at 224 px, got image_size {image_size}")
            return vit.vit_b16_224(**kwargs, rngs=rngs)
        if preset == "tiny":
            return vit.vit_tiny(image_size, **kwargs, rngs=rngs)
        if preset:
            raise ValueError(f"unknown vit preset {preset!r}: b16 | tiny")
        return vit.ViT(image_size, **kwargs, rngs=rngs)
    if name == "nfresnet":
        factories = {"nf_resnet26": nfresnet.nf_resnet26, "tiny": nfresnet.nf_resnet_tiny}
        if preset and preset not in factories:
            raise ValueError(f"unknown nfresnet preset {preset!r}: {' | '.join(factories)}")
        return factories.get(preset, nfresnet.NFResNet)(**kwargs, rngs=rngs)
    raise ValueError(f"unknown image encoder {name!r}: {' | '.join(ENCODERS)}")
