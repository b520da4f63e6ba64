"""Helpers shared by the compress stages: stage directories, id <-> row maps, configs."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from tldr_jax.data.dataset import ImageTextSet, load_set


def stage_dir(workdir: str | Path, stage: str) -> Path:
    d = Path(workdir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


# stage -> (file under the workdir, the stage that writes it) it reads from earlier stages
INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "extract": (("train-captioner/vocab.json", "train-captioner"),),
    "select": (("extract.json", "extract"),),
    "score": (("select/selected.npz", "select"),),
    "caption": (("score/kept.npz", "score"),),
    "write": (
        ("select/clusters.npz", "select"),
        ("score/kept.npz", "score"),
        ("caption/generated.json", "caption"),
    ),
}


def require_inputs(workdir: str | Path, stage: str) -> None:
    """FileNotFoundError naming the earlier stage to run, before this one does any work (score
    and caption used to train a model first and fail on the missing file after it)."""
    for rel, writer in INPUTS.get(stage, ()):
        if not (Path(workdir) / rel).exists():
            raise FileNotFoundError(
                f"{Path(workdir) / rel} not found: run `tldr-jax {writer}` on this workdir "
                "first (`tldr-jax compress` runs every stage in order)"
            )


def shared_cache(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> ml_collections.ConfigDict:
    """A copy of the config whose cache_dir is the compress run's one shared cache."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.cache_dir = cfg.get("cache_dir", "") or str(Path(workdir) / "cache")
    return cfg


def load_train(config: ml_collections.ConfigDict) -> ImageTextSet:
    """The training set as (image, caption) pairs: TL;DR selects, scores and rewrites pairs,
    so a row with several captions is one pair per caption (`ImageTextSet.pairs`)."""
    return load_set(config.data.train, config.data, "train").pairs()[0]


def load_test(config: ml_collections.ConfigDict) -> ImageTextSet:
    return load_set(config.data.test, config.data, "test")


def rows_of(ds_ids: list[str], ids: np.ndarray | list[str]) -> np.ndarray:
    """Row positions of `ids` in a set whose ids are `ds_ids` (raises on an unknown id)."""
    pos = {sid: i for i, sid in enumerate(ds_ids)}
    missing = [str(i) for i in ids if str(i) not in pos]
    if missing:
        raise KeyError(f"{len(missing)} ids not in the training set, e.g. {missing[:3]}")
    return np.array([pos[str(i)] for i in ids], np.int64)
