"""Dual-encoder pre-training + retrieval evaluation.

Command lines:
  tldr-jax pretrain --config configs/pretrain.py:small --workdir /tmp/pt
  tldr-jax evaluate --config configs/pretrain.py:small --workdir /tmp/pt
  # on a BLIP JSON + a Karpathy test set on disk:
  tldr-jax pretrain --config configs/pretrain.py --workdir W \
      --config.data.train=cc3m.json --config.data.image_root=/data/cc3m \
      --config.data.test=coco_karpathy_test.json --config.data.test_image_root=/data/coco

`small` runs in a few minutes on 2 CPU cores (32 px embedded world, a small ConvNet);
`tiny` is a smoke test of both stages in well under a minute (16 px, 2 epochs; not for results).
"""

import ml_collections

from tldr_jax import config_lib


def model_config(small: bool) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.image = "convnet"  # convnet | vit | nfresnet
    m.image_kwargs = ml_collections.ConfigDict(
        dict(depth=3, width=32, norm="instancenorm", pooling="flatten")
        if small
        else dict(depth=4, width=128, norm="instancenorm", pooling="flatten")
    )
    # --config.model.image=vit|nfresnet --config.model.image_kwargs.preset=tiny switches the
    # encoder; keys only the ConvNet takes are then left out (logged).
    m.image_kwargs.preset = ""
    m.embed_dim = 256  # 0 = no image projection (the head maps text to the image feature size)
    m.head_dropout = 0.1
    m.temperature = 0.07
    m.learn_temperature = True
    return m


def train_config(small: bool) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.optimizer = "adamw"
    t.lr = 2e-3 if small else 1e-3
    t.weight_decay = 0.05
    t.schedule = "cosine"
    t.warmup_steps = 50 if small else 500
    t.batch_size = 128
    t.epochs = 12 if small else 30
    t.grad_clip = 1.0
    t.log_every = 20
    t.ckpt_every = 200
    t.keep = 2
    return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, small=False, tiny=False)
    small = arg.small or arg.tiny
    config = config_lib.base_config(small)
    config.model = model_config(small)
    config.train = train_config(small)
    if arg.tiny:
        config.data.image_size = 16
        config.data.world.update(image_size=16, num_pairs=256, num_test=32, num_clean=32)
        config.model.image_kwargs.update(depth=2, width=8)
        config.model.embed_dim = 32
        config.train.update(batch_size=32, epochs=2, warmup_steps=2, ckpt_every=4)
    return config
