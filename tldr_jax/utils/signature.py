"""What a stage's output in a workdir was made from, and the one-line refusal of a rerun that
would reuse it with other settings.

A signature is a flat JSON dict: the config keys a stage reads (`a.b` -> value), and
`train_data.pairs` / `train_data.sha256`, the training set's fingerprint (its (image, caption)
pairs: how many, and a SHA-256 of their ids and captions, as the distillation buffer hashes
them). A stage writes it when it first starts in a workdir; a rerun whose signature differs
stops before doing anything with a `ConfigError` (one line, exit status 2 in the CLI) naming
each changed key (`select.target: 0.5 -> 0.25`) and what to do.

Keys that may change between runs without changing what a stage makes are never part of a
signature (`RERUN_FREE`): the mesh / device / process count, logging and checkpoint
cadence, decode threads, caches, strictness about bad rows, and the training data's path
(its content is in the fingerprint: the same pairs under another path are the same data).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tldr_jax.config_check import TRAINING_BLOCKS, ConfigError

log = logging.getLogger(__name__)

FILE = "signature.json"
DATA_KEYS = ("train_data.pairs", "train_data.sha256")
# (pair count, SHA-256) key names of a training-data fingerprint: the compress stages' (DATA_KEYS)
# and the distillation stages' buffer signature (top level in W/buffer, under `buffer.` in
# W/distill's). Either changing is said as one "training data changed (...)".
FINGERPRINTS = (DATA_KEYS, ("train_pairs", "train_sha256"))

# Config keys (fnmatch patterns on the dotted name) that never make a signature differ.
RERUN_FREE = (
    "mesh",
    "mesh.*",
    "*.log_every",
    "*.ckpt_every",
    "*.keep",
    "cache_dir",
    "data.cache_dir",
    "data.decode_workers",
    "data.strict",
    "data.train",  # its content: train_data.*
    "text.batch_size",
)


# Keys a later version added whose non-default values change a stage's output: a signature
# recorded before a key existed compares as made with the behaviour of that time (the value
# here), so a finished stage is not reused under a new value of the key.
ADDED_KEYS: dict[str, Any] = {
    "score.filter_over": "selected",  # 2026-12-05; before: the top fraction of select's rows
    # 2026-12-05 (config_values adds them where they hold); before, the first step at lr 0
    **{f"{b}.cosine_no_warmup_starts_at_lr": False for b in TRAINING_BLOCKS},
}


# Config keys that name inputs on disk: compared as the files they name, so the same command
# run from another working folder, or a relative path written absolute, is the same run.
PATH_KEYS = (
    "data.image_root",  # the images themselves are not hashed: where they are read from is
    "data.test",
    "data.test_image_root",
    "caption.data",
    "caption.image_root",
    "text.model_dir",
)


def normal_path(key: str, value: Any) -> Any:
    """`value` of a `PATH_KEYS` key as it names the input from any working folder (absolute;
    `tfds:` names as they are); any other key's value unchanged."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    if key.endswith("model_dir"):
        return os.path.abspath(value)
    if key.endswith("image_root"):
        from tldr_jax.data.readers import normal_roots

        return normal_roots(value)
    from tldr_jax.data.readers import input_identity

    return input_identity(value)


def jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(obj, default=str))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a refusal names the setting that changed."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pair_fingerprint(ids: Sequence[str], captions: Sequence[Sequence[str]]) -> dict[str, Any]:
    """{"pairs": N, "sha256": ...} of a set's (image, caption) pairs: a row with several
    captions counts as one pair per caption with the pair ids `ImageTextSet.pairs` gives
    them, so a set and its `.pairs()` view hash alike (and as the distillation buffer's
    `train_sha256`)."""
    from tldr_jax.data.dataset import pair_ids

    digest = hashlib.sha256()
    n = 0
    for sid, caps in zip(ids, captions, strict=True):
        for pid, caption in zip(pair_ids(sid, len(caps)), caps, strict=True):
            digest.update(f"{pid}\t{caption}\n".encode("utf-8", "surrogateescape"))
            n += 1
    return {"pairs": n, "sha256": digest.hexdigest()}


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_values(
    config: Any, include: Iterable[str], exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """The flat `a.b: value` keys of `config` under the `include` prefixes (`model` takes
    every `model.*` key), less `RERUN_FREE` and `exclude` (fnmatch patterns). A block with
    `image` + `image_kwargs` keeps only the kwargs that encoder takes (and a non-empty
    preset), as the encoder is built: keys left out after `--config.model.image=...` switched
    the encoder are not part of it."""
    tree = jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    _normalise_encoders(tree)
    flat = flatten(tree)
    prefixes = tuple(include)
    skip = (*RERUN_FREE, *exclude)
    out = {
        k: normal_path(k, v)
        for k, v in sorted(flat.items())
        if any(k == p or k.startswith(p + ".") for p in prefixes) and not matches(k, skip)
    }
    # A cosine schedule without warm-up started its first step at lr 0 before 2026-12-05 and
    # at lr since: a run checkpointed before is not resumed on the other schedule.
    for block in TRAINING_BLOCKS:
        if out.get(f"{block}.warmup_steps") == 0 and out.get(f"{block}.schedule") == "cosine":
            out[f"{block}.cosine_no_warmup_starts_at_lr"] = True
    return out


def _normalise_encoders(tree: dict[str, Any]) -> None:
    from tldr_jax.models import encoder_kwargs

    for value in tree.values():
        if not isinstance(value, dict):
            continue
        if isinstance(value.get("image"), str) and isinstance(value.get("image_kwargs"), dict):
            # Kwargs no encoder takes: the stage itself says so; keep them as they are here.
            with contextlib.suppress(ValueError):
                value["image_kwargs"] = jsonable(
                    encoder_kwargs(value["image"], dict(value["image_kwargs"]))[0]
                )
        _normalise_encoders(value)


def read(path: Path) -> dict[str, Any] | None:
    """The signature at `path`, or None where there is none. One that is there but cannot
    be read (truncated, not JSON, no permission) is a ConfigError naming it: taken as
    absent, it was overwritten with the rerun's settings and the outputs made with other
    ones were resumed as these."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _damaged(path, f"cannot be read: {e}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise _damaged(path, f"is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _damaged(path, "is not a JSON object")
    return flatten(obj)


def _damaged(path: Path, what: str) -> ConfigError:
    folder = Path(path).parent
    return ConfigError(
        f"{path} {what}: it records the settings {folder} was made with. Restore it, or "
        f"delete {folder} to redo that stage (or use a new --workdir)."
    )


def write(path: Path, sig: Mapping[str, Any]) -> None:
    """Writes `sig` at `path` from the main process (atomically)."""
    from tldr_jax.utils import dist, io

    if dist.is_main():
        io.write_json(Path(path), jsonable(dict(sig)))


def differences(
    have: Mapping[str, Any], want: Mapping[str, Any], *, known_only: bool = False
) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} for every key whose value differs. `known_only`: compare only
    the keys both name (a key a newer version added, or one the config leaves out, is not a
    change; `ADDED_KEYS` compare as their behaviour before they existed); the training-data
    fingerprint is compared whenever either side has it."""
    have, want = jsonable(dict(have)), jsonable(dict(want))
    # Paths recorded relative (older signatures) compare as the files they name from here.
    have = {k: normal_path(k, v) for k, v in have.items()}
    want = {k: normal_path(k, v) for k, v in want.items()}
    have = {**{k: v for k, v in ADDED_KEYS.items() if k in want}, **have}
    keys = set(have) | set(want)
    if known_only:
        keys = (set(have) & set(want)) | (keys & set(DATA_KEYS))
    changed = {k for k in keys if have.get(k) != want.get(k)}
    for pair in fingerprints(changed, set(have) | set(want)):  # the fingerprint is said whole
        changed |= set(pair)
    return {k: (have.get(k), want.get(k)) for k in sorted(changed)}


def fingerprints(
    keys: Iterable[str], present: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """The (pairs key, sha256 key) of every training-data fingerprint one of `keys` is part of
    (`FINGERPRINTS`, at the top level or under a prefix), in key order: only where both keys
    are among `present` (default: `keys`), so a lone key that merely ends like one is not."""
    keys = list(keys)
    present = set(keys if present is None else present)
    found = set()
    for k in keys:
        for names in FINGERPRINTS:
            for name in names:
                if k == name or k.endswith("." + name):
                    pair = tuple(k[: len(k) - len(name)] + n for n in names)
                    if all(n in present for n in pair):
                        found.add(pair)
    return sorted(found)


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """`training data changed (N pairs, sha256 ab12.. -> M pairs, sha256 cd34..); a.b: 1 -> 2`."""
    parts, said = [], set()
    for pair in fingerprints(diff):
        (n0, n1), (h0, h1) = (diff.get(k, (None, None)) for k in pair)
        parts.append(f"training data changed ({_data(n0, h0)} -> {_data(n1, h1)})")
        said |= set(pair)
    parts += [
        f"{k}: {_value(old)} -> {_value(new)}" for k, (old, new) in diff.items() if k not in said
    ]
    return "; ".join(parts)


def _value(v: Any) -> str:
    """A recorded value as the refusal says it: `unset` where none was recorded (a key a
    signature leaves out at its default, e.g. `distill.seed` following the global seed)."""
    return "unset" if v is None else repr(v)


def _data(pairs: Any, sha: Any) -> str:
    if pairs is None and sha is None:
        return "none recorded"
    return f"{pairs} pairs, sha256 {str(sha)[:12]}"


def check_signature(
    path: Path,
    want: dict[str, Any],
    *,
    create: bool,
    redo: str,
    retired: Iterable[str] = (),
    names: Callable[[str], str] | None = None,
) -> None:
    """Refuses a workdir whose stage output was made with other settings (`path` holds what
    they were); writes `want` there when absent and `create`. `redo`: what deleting the
    folder would do, for the message; `names`: the config key a signature key stands for,
    for the message. (The distillation stages' check: every key counts but the `retired`
    ones.)"""
    want = flatten(jsonable(want))
    have = read(path)
    if have is not None:
        # `retired`: keys an older version recorded that no longer bind a workdir.
        diff = differences({k: v for k, v in have.items() if k not in set(retired)}, want)
        if names is not None:
            diff = {names(k): v for k, v in diff.items()}
        if diff:
            folder = Path(path).parent
            raise refusal([folder], diff, f"Use a new workdir, or delete {folder} to {redo}.")
    elif create:
        write(path, want)


def refusal(
    folders: Sequence[Path], diff: Mapping[str, tuple[Any, Any]], remedy: str = ""
) -> ConfigError:
    """The one-line error for outputs in `folders` made with other settings (`diff`).
    `remedy`: what to do, where deleting the folders and rerunning is not it."""
    names = ", ".join(str(f) for f in folders)
    verb = "was" if len(folders) == 1 else "were"
    these = "that stage" if len(folders) == 1 else "those stages"
    remedy = remedy or (
        f"Use a new --workdir, or delete {' '.join(str(f) for f in folders)} to redo {these} "
        "with these settings."
    )
    return ConfigError(
        f"{names} {verb} made with other settings than this run's ({describe(diff)}). {remedy}"
    )
