"""TL;DR compression: codebook captioner -> codes -> k-means selection -> alignment filter ->
caption regeneration -> new training file, then the retrieval comparison.

Command lines:
  tldr-jax compress --config configs/tldr.py:small --workdir runs/tldr
  # one stage alone (each resumes and writes W/<stage>.json):
  tldr-jax train-captioner --config configs/tldr.py:small --workdir runs/tldr
  tldr-jax extract         --config configs/tldr.py:small --workdir runs/tldr
  tldr-jax select          --config configs/tldr.py:small --workdir runs/tldr
  tldr-jax score           --config configs/tldr.py:small --workdir runs/tldr
  tldr-jax caption         --config configs/tldr.py:small --workdir runs/tldr
  tldr-jax write           --config configs/tldr.py:small --workdir runs/tldr
  # a BLIP JSON on disk, COCO Karpathy for the caption model and the test:
  tldr-jax compress --config configs/tldr.py --workdir W \
      --config.data.train=cc3m.json --config.data.image_root=/data/cc3m \
      --config.data.test=coco_karpathy_test.json --config.data.test_image_root=/data/coco \
      --config.caption.data=coco_karpathy_train.json --config.caption.image_root=/data/coco
  # the reference captioner (ViT-B/16 at 224 px, 197 tokens, 1024 x 768 codebook):
  tldr-jax compress --config configs/tldr.py:reference --workdir W ...

`small` runs end to end in under 10 minutes on 2 CPU cores, the retrieval comparison
(full set vs TL;DR subset vs random subset) included. The full-size default leaves that
comparison off (three pre-training runs on the set): add --config.retrieval_eval.enabled=True.
`tiny` is a smoke test of every stage in about a minute (tests, CI), not for results.
"""

import ml_collections

from configs import pretrain
from tldr_jax import config_lib


def vit_kwargs(arg: ml_collections.ConfigDict) -> dict:
    if arg.reference:  # SPEC A.1: ViT-B/16 at 224 px, all 197 tokens
        return dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
    if arg.small:
        return dict(patch_size=4, width=96, depth=2, num_heads=4, mlp_dim=192)
    return dict(patch_size=8, width=256, depth=6, num_heads=8, mlp_dim=1024)


def decoder_kwargs(arg: ml_collections.ConfigDict) -> dict:
    if arg.reference:
        return dict(width=768, depth=12, heads=12, mlp_dim=3072)
    if arg.small:
        return dict(width=96, depth=2, heads=4, mlp_dim=192)
    return dict(width=256, depth=4, heads=8, mlp_dim=1024)


def captioner_train(arg: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.optimizer = "adamw"  # SPEC A.1: AdamW 3e-4, wd 0.05, warm-up then x0.9 per epoch
    t.lr = 3e-4 if arg.reference else 1e-3
    t.weight_decay = 0.05
    t.schedule = "epoch_decay"
    t.warmup_steps = 3000 if arg.reference else (30 if arg.small else 300)
    t.decay_per_epoch = 0.9
    t.min_lr = 1e-6
    t.batch_size = 64
    t.epochs = epochs
    # The reference does not clip: 0.0 for its recipe (kept at 1.0 in :reference so that
    # workdirs made with it go on; --config.captioner.train.grad_clip=0.0 and the same for
    # caption.train)
    t.grad_clip = 1.0
    t.log_every = 20
    t.ckpt_every = 200
    t.keep = 2
    return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, small=False, reference=False, tiny=False)
    if arg.tiny:
        arg.small = True
    config = pretrain.get_config("small" if arg.small else None)
    size = 224 if arg.reference else config.data.image_size
    config.data.image_size = size
    config.data.world = config_lib.world_config(
        image_size=size,
        num_pairs=3000 if arg.small else 20000,
        num_test=400 if arg.small else 1000,
        num_clean=1500 if arg.small else 5000,
        misaligned=0.3,
        duplicates=0.3,
    )

    # 1. Codebook captioner (SPEC A.1).
    c = config.captioner = ml_collections.ConfigDict()
    c.image = "vit"
    c.image_kwargs = vit_kwargs(arg)
    c.num_codes = 1024 if arg.reference else 256
    c.code_dim = 768 if arg.reference else 64
    c.vq_loss = "legacy"  # legacy (reference) | standard | ema
    c.beta = 0.25
    c.ema_decay = 0.99
    # ema: a code's usage count starts at 1 and decays by ema_decay while unused, so a code
    # is revived after ~log(threshold) / log(decay) unused steps (688 here)
    c.revive_threshold = 1e-3
    c.vq_weight = 1.0
    c.decoder = decoder_kwargs(arg)
    c.max_len = 30
    c.train = captioner_train(arg, 20 if arg.reference else (4 if arg.small else 10))

    # 2. Extraction: code indices per sample, chunks keyed by sample id.
    e = config.extract = ml_collections.ConfigDict()
    e.chunk_size = 1024
    e.batch_size = 256

    # 3. Selection (SPEC A.3).
    s = config.select = ml_collections.ConfigDict()
    s.feature = "histogram"  # sequence (reference) | histogram
    s.pca_dim = 256
    s.whiten = True
    s.num_clusters = 1000 if not arg.small else 64
    s.iterations = 20
    s.init = "kmeans++"
    s.spherical = False
    s.gemm_dtype = "float32"  # distance GEMM: float32 | bfloat16 (fp32 accumulation; GPU/TPU)
    s.strategy = "nearest"  # stride (reference) | ratio | nearest | random
    s.stride = 2
    # fraction of rows (<= 1) or a count (> 1); 0 with strategy=stride: every stride-th
    # member of each cluster, as many rows as that gives (the reference's rule and size)
    s.target = 0.5
    # k-means seeding and the strategies' draws: 0, as the README's seed table was made;
    # -1 = the global `seed`.
    s.seed = 0
    s.max_in_memory_mb = 4096.0  # larger feature matrices are memory-mapped and streamed
    s.stream_chunk_rows = 262144  # rows per device transfer when streaming

    # 4. Alignment score + top-fraction filter.
    sc = config.score = ml_collections.ConfigDict()
    sc.keep_fraction = 0.5  # of the selected rows, keep the best-aligned half
    # selected: the best keep_fraction of select's rows (an exact size) | all: select's rows
    # that are among the best keep_fraction of all rows (the reference's intersection)
    sc.filter_over = "selected"
    sc.scorer = "dual_encoder"  # a dual encoder trained on the full set (configs/pretrain.py)

    # 5. Plain captioner on human-quality captions (SPEC A.5).
    cap = config.caption = ml_collections.ConfigDict()
    cap.data = ""  # Karpathy COCO train JSON; "" = the embedded world's clean set
    cap.image_root = ""
    cap.image = "vit"
    cap.image_kwargs = vit_kwargs(arg)
    cap.decoder = decoder_kwargs(arg)
    cap.max_len = 30
    cap.prompt = "a picture of "
    cap.method = "beam"  # greedy | beam | nucleus
    cap.beam_size = 3
    cap.top_p = 0.9
    cap.temperature = 1.0
    cap.batch_size = 128
    cap.train = captioner_train(arg, 5 if arg.reference else 10)
    cap.train.schedule = "cosine"
    if arg.small:  # smaller batches: 6 epochs x 64 left the model nearly image-blind
        cap.train.batch_size = 32

    # 6. Write the new training file.
    w = config.write = ml_collections.ConfigDict()
    # append: original + "; " + generated (the reference) | replace: the generated caption,
    # else the original | generated: generated captions only (rows without one left out)
    w.mode = "append"

    # Built-in evaluation: full vs TL;DR vs random subset, same optimizer-step budget.
    r = config.retrieval_eval = ml_collections.ConfigDict()
    r.enabled = bool(arg.small)
    r.budget = "steps"  # steps: every run gets the full set's step count | epochs
    if arg.tiny:
        shrink_to_tiny(config)
    return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
    """`:tiny`: a smoke test of every stage in about a minute (tests, CI); not for results."""
    vit = dict(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    dec = dict(width=16, depth=1, heads=2, mlp_dim=32)
    config.data.image_size = 16
    config.data.world.update(image_size=16, num_pairs=192, num_test=24, num_clean=24)
    config.model.image_kwargs.update(depth=2, width=8)
    config.model.embed_dim = 32
    config.train.update(batch_size=32, epochs=2, warmup_steps=2, ckpt_every=4)
    c = config.captioner
    c.update(num_codes=16, code_dim=8, max_len=12)
    c.image_kwargs = vit
    c.decoder = dec
    c.train.update(batch_size=32, epochs=2, warmup_steps=1, ckpt_every=3)
    config.extract.update(chunk_size=64, batch_size=32)
    config.select.update(num_clusters=8, iterations=5, pca_dim=16)
    cap = config.caption
    cap.update(max_len=8, batch_size=16, beam_size=2)
    cap.image_kwargs = vit
    cap.decoder = dec
    # one step, at lr (a warm-up's first step runs at lr 0)
    cap.train.update(batch_size=16, epochs=1, warmup_steps=0, ckpt_every=2)
