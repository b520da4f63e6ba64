"""Vision-language dataset distillation by trajectory matching (SPEC B).

Command lines (the same workdir for all three stages):
  tldr-jax buffer         --config configs/distill.py:small --workdir /tmp/vld
  tldr-jax distill        --config configs/distill.py:small --workdir /tmp/vld
  tldr-jax eval-distilled --config configs/distill.py:small --workdir /tmp/vld
  # ablations override any key, e.g.
  tldr-jax distill --config configs/distill.py:small --workdir /tmp/vld2 \
      --config.distill.grad_mode=tesla --config.distill.init=kmeans

`small` runs all three stages in a few minutes on 2 CPU cores (32 px embedded world, a
3-layer ConvNet with instancenorm, 4 experts x 5 epochs, 100 pairs, 10 inner steps).
The default is the README setting: 100 pairs, syn_steps 8, expert_epochs 1,
max_start_epoch 2, 20 experts x 10 epochs.
"""

import ml_collections

from tldr_jax import config_lib


def model_config(small: bool) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # The image encoder must have no batch statistics (a student is a pure function of its
    # parameters): convnet with instancenorm or none, or nfresnet. Its output is the joint
    # space; the text head maps the frozen text embedding to it (SPEC B.1: no image projection).
    m.image = "convnet"
    m.image_kwargs = ml_collections.ConfigDict(
        dict(depth=3, width=32, norm="instancenorm", pooling="flatten")
        if small
        else dict(depth=4, width=128, norm="instancenorm", pooling="flatten")
    )
    m.head_dropout = 0.1
    return m


def buffer_config(small: bool) -> ml_collections.ConfigDict:
    b = ml_collections.ConfigDict()
    b.num_experts = 4 if small else 20
    b.epochs = 5 if small else 10
    b.lr = 0.1  # plain SGD, no momentum, no weight decay (SPEC B.2)
    b.batch_size = 128
    return b


def distill_config(small: bool) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.num_pairs = 100  # M
    d.syn_steps = 10 if small else 8
    d.expert_epochs = 1
    d.max_start_epoch = 2
    d.iterations = 300 if small else 2000
    d.batch_syn = 0  # student minibatch; 0 = all M pairs every step
    d.grad_mode = "remat"  # unroll | remat | tesla
    d.init = "real"  # real | noise | kmeans
    d.kmeans_features = "text"  # kmeans init clusters: text (embeddings) | image (expert features)
    d.step_size_init = 0.1
    d.lr_images = 1000.0
    d.lr_texts = 1000.0
    d.lr_step_size = 1e-2
    d.momentum = 0.5
    d.quirk_logit_scale = False  # reference inner loop: logits x ln(1/0.07) instead of 1/0.07
    d.quirk_dropout = False  # reference inner loop: dropout active in the student
    d.ckpt_every = 50
    d.log_every = 10
    return d


def eval_config(small: bool) -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.num_models = 3 if small else 5
    e.epochs = 50
    e.batch_size = 64
    e.momentum = 0.9
    e.weight_decay = 5e-4
    e.coreset_pairs = 0  # 0 = distill.num_pairs
    e.coreset_lr = 0.1  # both modalities; = the experts' lr (no sweep)
    e.budgets = (100, 1000) if small else ()  # extra coreset budgets for the recall-vs-pairs plot
    return e


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, small=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    size = 32 if arg.small else 64
    config.data = config_lib.data_config(image_size=size)
    config.data.world = config_lib.world_config(
        image_size=size,
        num_pairs=4000 if arg.small else 20000,
        num_test=500 if arg.small else 1000,
    )
    config.text = config_lib.text_config()
    config.mesh = config_lib.mesh_config()
    config.model = model_config(arg.small)
    config.buffer = buffer_config(arg.small)
    config.distill = distill_config(arg.small)
    config.eval = eval_config(arg.small)
    config.cache_dir = ""  # "" = WORKDIR/cache (text embeddings)
    return config
