"""Helpers shared by the compress stages: stage directories, id <-> row maps, configs, and
what each stage's output in a workdir was made from (its signature)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from tldr_jax import config_lib
from tldr_jax.config_check import ConfigError
from tldr_jax.data.dataset import ImageTextSet, data_counts, load_set  # noqa: F401 (re-export)
from tldr_jax.utils import dist, signature

log = logging.getLogger(__name__)


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


# A training set loaded for a stage's signature check, handed to the stage's own
# `load_train` (taken once, so it is not held after the stage): {input key: set}.
_LOADED: dict[str, ImageTextSet] = {}
# The training set's fingerprint per input key (a compress run checks every stage's
# signature up front; the stages it then runs check theirs again).
_FINGERPRINTS: dict[str, dict[str, Any]] = {}


def _train_key(config: ml_collections.ConfigDict) -> str:
    """What the loaded training set is a function of: the data block and, for files on disk,
    their names, sizes and modification times (a file rewritten in place is another set)."""
    from tldr_jax.data import imagestore

    data = config.data
    spec: dict[str, Any] = {"data": signature.jsonable(data.to_dict())}
    if data.train:
        spec["inputs"] = imagestore.cache_key(str(data.train), data, "train", bool(data.strict))
    return json.dumps(spec, sort_keys=True)


def load_train(config: ml_collections.ConfigDict) -> ImageTextSet:
    """The training set as (image, caption) pairs: TL;DR selects, scores and rewrites pairs,
    so a row with several captions is one pair per caption (`ImageTextSet.pairs`)."""
    loaded = _LOADED.pop(_train_key(config), None)
    if loaded is not None:
        return loaded
    return load_set(config.data.train, config.data, "train").pairs()[0]


def train_fingerprint(config: ml_collections.ConfigDict, keep: bool = False) -> dict[str, Any]:
    """{"pairs", "sha256"} of the training pairs (`signature.pair_fingerprint`). `keep`: the
    stage reads the set next; its `load_train` gets this load instead of decoding again."""
    key = _train_key(config)
    if key not in _FINGERPRINTS:
        train = load_set(config.data.train, config.data, "train").pairs()[0]
        _FINGERPRINTS[key] = signature.pair_fingerprint(train.ids, train.captions)
        if keep:
            _LOADED.clear()
            _LOADED[key] = train
    return _FINGERPRINTS[key]


DATA_COUNT_KEYS = ("rows_read", "input_records", "skipped", "captions_dropped", "inputs")


def load_test(config: ml_collections.ConfigDict) -> ImageTextSet:
    return load_set(config.data.test, config.data, "test")


def rows_of(ds_ids: list[str], ids: np.ndarray | list[str]) -> np.ndarray:
    """Row positions of `ids` in a set whose ids are `ds_ids` (raises on an unknown id)."""
    pos = {sid: i for i, sid in enumerate(ds_ids)}
    missing = [str(i) for i in ids if str(i) not in pos]
    if missing:
        raise KeyError(f"{len(missing)} ids not in the training set, e.g. {missing[:3]}")
    return np.array([pos[str(i)] for i in ids], np.int64)


# -- signatures: what each stage's output in a workdir was made from ----------------------------

# stage -> its output folder under the workdir, where its signature.json lives. "eval" is the
# compress pipeline's retrieval comparison (the tldr and random arms, W/eval).
FOLDERS: dict[str, str] = {
    "train-captioner": "train-captioner",
    "extract": "extract",
    "select": "select",
    "score": "score",
    "caption": "caption",
    "write": "compress",
    "eval": "eval",
}
# stage -> the stage whose output it is made from (its signature includes that one's).
UPSTREAM: dict[str, str | None] = {
    "train-captioner": None,
    "extract": "train-captioner",
    "select": "extract",
    "score": "select",
    "caption": "score",
    "write": "caption",
    "eval": "write",
}
# Stages that do all their work again when run alone (nothing to resume): a rerun with
# other settings of their own redoes them (`tldr-jax write --config.write.mode=replace`).
REDO = ("select", "write")
# Stages that read the training set right after their check (it hands them its load).
READS_TRAIN = ("train-captioner", "extract", "score", "write", "eval")
_TEXT_ENCODER = ("text.model_dir", "text.pooling", "text.max_len")


def _own_keys(config: ml_collections.ConfigDict, stage: str) -> tuple[dict, dict]:
    """(the config keys `stage` reads that shape what later stages read, those that shape
    only its own output): the later stages' signatures include the first part. The
    training data (image size, rows, the embedded world, the fingerprint) enters at the
    first stage and so every signature."""
    values = signature.config_values

    def world_if(*paths: Any) -> tuple[str, ...]:
        return ("data.world",) if any(not str(p) for p in paths) else ()

    d = config.data
    caption_data = config.get("caption", {}).get("data", "")
    test_keys = ("data.test", "data.test_image_root", *world_if(d.test))
    if stage == "train-captioner":
        keys = (
            "captioner",
            "text.model_dir",
            "seed",
            "data.image_size",
            "data.max_rows",
            "data.image_root",  # where the images are read from (they are not hashed)
        )
        return values(config, (*keys, *world_if(d.train))), {}
    if stage == "extract":
        return values(config, ("extract",), ("extract.batch_size",)), {}
    if stage == "select":
        skip = ("select.max_in_memory_mb", "select.stream_chunk_rows")
        own = values(config, ("select",), skip)
        # The resolved seed: -1 (the global seed) and that seed written out are the same run.
        own["select.seed"] = config_lib.stage_seed(config, "select")
        return own, {}
    if stage == "score":
        keys = ("score", "model", "train", *_TEXT_ENCODER, "seed")
        # data.test: only the full set's retrieval (the comparison's baseline) reads it.
        return values(config, keys), values(config, test_keys)
    if stage == "caption":
        keys = ("caption", "text.model_dir", "seed", *world_if(caption_data))
        return values(config, keys, ("caption.batch_size",)), {}
    if stage == "write":
        return values(config, ("write",)), {}
    if stage == "eval":
        keys = ("retrieval_eval", "train", "model", *_TEXT_ENCODER, "seed", *test_keys)
        return values(config, keys, ("retrieval_eval.enabled",)), {}
    raise ValueError(f"no signature for stage {stage!r}")


def _inherited(config: ml_collections.ConfigDict, stage: str, fingerprint: dict) -> dict:
    up = UPSTREAM[stage]
    out = (
        _inherited(config, up, fingerprint)
        if up
        else {f"train_data.{k}": v for k, v in fingerprint.items()}
    )
    return {**out, **_own_keys(config, stage)[0]}


def stage_signature(config: ml_collections.ConfigDict, stage: str, fingerprint: dict) -> dict:
    """The flat signature of `stage` run with `config` on training data `fingerprint`."""
    return {**_inherited(config, stage, fingerprint), **_own_keys(config, stage)[1]}


def signature_path(workdir: str | Path, stage: str) -> Path:
    return Path(workdir) / FOLDERS[stage] / signature.FILE


def _chain(stage: str) -> list[str]:
    """`stage` and the stages it is made from, first stage first."""
    out: list[str] = []
    s: str | None = stage
    while s:
        out.insert(0, s)
        s = UPSTREAM[s]
    return out


# Files a stage writes at its start, before any of its checks can fail, that it makes again
# when they are missing: they alone are not output that binds the workdir to the settings.
# (Both captioner stages build their `CompactVocab` first: captioner_stage.VOCAB_FILE and
# the hash of the captions it was built from beside it.)
_VOCAB_FILES = ("vocab.json", "vocab.json.texts-sha256")
START_FILES: dict[str, tuple[str, ...]] = {"train-captioner": _VOCAB_FILES, "caption": _VOCAB_FILES}


def _has_output(workdir: Path, stage: str) -> bool:
    """Whether `stage` made anything in its folder: a file other than its signature and its
    `START_FILES` (a stage that stopped at its start, on a batch larger than the set or an
    image size the encoder cannot take, leaves nothing that a rerun with the fix would
    reuse)."""
    folder = workdir / FOLDERS[stage]
    keep = {signature.FILE, *START_FILES.get(stage, ())}
    return folder.is_dir() and any(
        p.is_file() and p.relative_to(folder).as_posix() not in keep for p in folder.rglob("*")
    )


class _PerFolder:
    """A key's recorded values where the folders disagree (`write` run alone with another
    mode than the `compress` summary's): shown per folder, not the last folder's alone."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def __repr__(self) -> str:
        return " / ".join(f"{v!r} in {folder}" for folder, v in self.values.items())


def _refuse(workdir: Path, conflicts: list[tuple[str, dict]]) -> ConfigError:
    recorded: dict[str, dict[str, Any]] = {}
    now: dict[str, Any] = {}
    for stage, d in conflicts:
        for key, (old, new) in d.items():
            recorded.setdefault(key, {})[FOLDERS[stage]] = old
            now[key] = new
    diff = {
        key: (
            next(iter(olds.values()))
            if len(set(map(repr, olds.values()))) == 1
            else _PerFolder(olds),
            now[key],
        )
        for key, olds in sorted(recorded.items())
    }
    folders = [workdir / FOLDERS[s] for s, _ in conflicts]
    return signature.refusal(folders, diff)


# Stages that read only their upstream stage's files, never the training set: their
# signature takes the training data's fingerprint from the one `extract` recorded.
FROM_UPSTREAM_FILES = ("select",)


def _recorded_fingerprint(workdir: Path, stage: str) -> dict[str, Any] | None:
    if stage not in FROM_UPSTREAM_FILES:
        return None
    have = signature.read(signature_path(workdir, UPSTREAM[stage]))
    if have is None:  # made before signatures, or extract's files made by hand: no data claim
        return {}
    prefix = "train_data."
    return {k[len(prefix) :]: v for k, v in have.items() if k.startswith(prefix)}


def check_stage(config: ml_collections.ConfigDict, workdir: str | Path, stage: str) -> None:
    """At a stage's start, before it does any work: refuses (a one-line ConfigError) a
    workdir whose outputs this stage would reuse were made with other settings or data:
    its own earlier output (a stage that resumes), or an earlier stage's output it reads.
    Then records this run's signature in W/<folder>/signature.json. Output from before
    signatures (none recorded) is taken as made with this run's settings (a warning)."""
    w = Path(workdir)
    fingerprint = _recorded_fingerprint(w, stage)
    if fingerprint is None:
        fingerprint = train_fingerprint(config, keep=stage in READS_TRAIN)
    conflicts = []
    for s in _chain(stage):
        have = signature.read(signature_path(w, s))
        if have is None or (s == stage and s in REDO) or not _has_output(w, s):
            continue
        diff = signature.differences(have, stage_signature(config, s, fingerprint), known_only=True)
        if diff:
            conflicts.append((s, diff))
    if conflicts:
        raise _refuse(w, conflicts)
    path = signature_path(w, stage)
    want = stage_signature(config, stage, fingerprint)
    have = signature.read(path)
    has_output = _has_output(w, stage)
    if have is None and stage not in REDO and has_output:
        log.warning(
            "%s: %s has no %s (made before signatures were recorded): taking it as made with "
            "this run's settings",
            stage,
            path.parent,
            signature.FILE,
        )
    if have is not None and stage in REDO and has_output:
        warn_stale_downstream(w, stage, signature.differences(have, want, known_only=True))
    # Every process has read the folder before the main process writes in it: one still
    # reading took the signature's temporary file for output (a "made before signatures"
    # warning on a fresh workdir) or the signature just written for the one it had.
    dist.barrier(f"check-stage-{stage}")
    if have != signature.jsonable(want):
        if have is not None and not has_output and dist.is_main():
            for name in START_FILES.get(stage, ()):  # made with the earlier settings
                (path.parent / name).unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        signature.write(path, want)


def downstream(stage: str) -> list[str]:
    """The stages made from `stage`'s output, directly or not, in pipeline order."""
    after: list[str] = []
    for s in FOLDERS:
        up = UPSTREAM[s]
        if up == stage or up in after:
            after.append(s)
    return after


def warn_stale_downstream(workdir: Path, stage: str, diff: dict[str, tuple[Any, Any]]) -> None:
    """A stage run alone that redoes its work (`REDO`) with other settings leaves the outputs
    made from its earlier output describing that one: says which, so they are not read as
    this run's (`compress` refuses them until they are deleted)."""
    if not diff or not dist.is_main():
        return
    stale = [str(workdir / FOLDERS[s]) for s in downstream(stage) if _has_output(workdir, s)]
    stale += [str(workdir / n) for n in ("compress.json", "report.md") if (workdir / n).exists()]
    if stage == "write":  # its own folder holds train.json; the comparison is made from it
        stale = [p for p in stale if p != str(workdir / FOLDERS["write"])]
    if stale:
        log.warning(
            "%s: redoing it with other settings (%s): %s were made from its earlier output and "
            "no longer match it (a `compress` rerun names what to delete)",
            stage,
            signature.describe(diff),
            ", ".join(stale),
        )


def check_pipeline(
    config: ml_collections.ConfigDict, workdir: str | Path, stages: tuple[str, ...]
) -> set[str]:
    """The compress pipeline's check, before it runs or skips anything: every stage in
    `stages` whose output exists must have been made with this run's settings and data (a
    finished stage is skipped, so even one that a lone rerun would redo). Returns the
    finished stages (summary W/<stage>.json and folder present). Raises one ConfigError
    naming every changed key and the folders to delete. Stages finished before signatures
    existed get this run's signature (one warning)."""
    w = Path(workdir)
    done = {
        s
        for s in stages
        if (w / FOLDERS[s]).is_dir() and (s == "eval" or (w / f"{s}.json").exists())
    }
    # The first stage to run takes the set loaded for the fingerprint (the comparison always
    # runs: its finished arms are read back).
    to_run = [s for s in stages if s not in done or s == "eval"]
    fingerprint = train_fingerprint(config, keep=bool(to_run) and to_run[0] in READS_TRAIN)
    conflicts, legacy = [], []
    for s in stages:
        have = signature.read(signature_path(w, s))
        want = stage_signature(config, s, fingerprint)
        if have is None:
            if s in done:
                legacy.append(s)
            continue
        diff = signature.differences(have, want, known_only=True)
        if diff and (s in done or (s not in REDO and _has_output(w, s))):
            conflicts.append((s, diff))
    if conflicts:
        raise _refuse(w, conflicts)
    if legacy:
        log.warning(
            "compress: %s finished before signatures were recorded (no %s): taking them as "
            "made with this run's settings; a rerun with other settings is refused from now on",
            ", ".join(str(w / FOLDERS[s]) for s in legacy),
            signature.FILE,
        )
        for s in legacy:
            signature.write(signature_path(w, s), stage_signature(config, s, fingerprint))
    return done
