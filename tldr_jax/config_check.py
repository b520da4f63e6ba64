"""Up-front checks of a stage's config: names and ranges, before any data is read.

A value out of range used to surface deep inside a stage, after loading the data or training
experts (`distill.syn_steps=0` as an empty scan, `score.keep_fraction=1.5` as a keep-all
filter, `retrieval_eval.budget=epoch` silently as "epochs"). `check(config)` reads every key it
knows that the config has and raises one `ConfigError` listing each bad value with what is
allowed; the CLI prints it without a traceback and exits 2. Keys a config lacks are skipped:
the three config families share this one table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config value the stages cannot run with (the message names the key)."""


Rule = Callable[[Any], str | None]  # None = fine, else what is allowed


def choice(*allowed: str) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v in allowed else "one of " + " | ".join(allowed)

    return rule


def integer(lo: int | None = None, hi: int | None = None, also: Sequence[int] = ()) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool)
        ok = ok and (v in also or ((lo is None or v >= lo) and (hi is None or v <= hi)))
        if ok:
            return None
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        return "an integer " + rng + "".join(f" or {a}" for a in also)

    return rule


def number(
    lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo)
        ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return None
        left = ("(" if lo_open else "[") + f"{lo:g}, "
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        return "a finite number in " + left + right

    return rule


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def integers(lo: int) -> Rule:
    def rule(v: Any) -> str | None:
        ok = isinstance(v, (tuple, list)) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v
        )
        return None if ok else f"a tuple of integers >= {lo}, e.g. (100, 1000) or ()"

    return rule


def fraction_or_count(v: Any) -> str | None:
    """select.target: a fraction of the rows or a whole number of them (select/strategies.py),
    or 0: the stride rule's own size (`_select_problems` checks the strategy)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    fraction = ok and isinstance(v, float) and 0 < v <= 1
    count = ok and v > 1 and v == int(v)  # an int 1 is ambiguous (strategies.target_count)
    return (
        None
        if fraction or count or (ok and v == 0)
        else "a fraction in (0, 1], a whole count > 1 (e.g. 0.5 or 100000), or 0 with "
        "select.strategy='stride' (every stride-th member of each cluster: the reference's size)"
    )


POSITIVE = number(0.0, lo_open=True)
NONNEG = number(0.0)
FRACTION = number(0.0, 1.0)
PROB = number(0.0, 1.0, hi_open=True)
COUNT = integer(1)
NONNEG_INT = integer(0)
# A contrastive batch of one pair has a zero loss (its one logit is its own target): nothing
# trains. Batches and sets the dual encoders train on contrastively take at least two.
PAIRS = integer(2)


TRAINING_BLOCKS = ("train", "captioner.train", "caption.train")  # train/state.py make_optimizer


def _training_rules(prefix: str) -> dict[str, Rule]:
    from tldr_jax.train import state

    return {
        f"{prefix}.batch_size": COUNT,
        f"{prefix}.epochs": COUNT,
        f"{prefix}.lr": POSITIVE,
        f"{prefix}.min_lr": NONNEG,
        f"{prefix}.optimizer": choice(*state.OPTIMIZERS),
        f"{prefix}.schedule": choice(*state.SCHEDULES),
        f"{prefix}.warmup_steps": NONNEG_INT,
        f"{prefix}.weight_decay": NONNEG,
        f"{prefix}.grad_clip": NONNEG,
        f"{prefix}.decay_per_epoch": number(0.0, 1.0, lo_open=True),
        f"{prefix}.ckpt_every": COUNT,
        f"{prefix}.log_every": COUNT,
        f"{prefix}.keep": COUNT,
    }


def rules() -> dict[str, Rule]:
    """Every checked key (dotted path) and its rule."""
    from tldr_jax import models
    from tldr_jax.caption import generate
    from tldr_jax.compress import write
    from tldr_jax.distill import distill_stage, matching
    from tldr_jax.models import bert, conv, vq
    from tldr_jax.select import features, kmeans, strategies

    r: dict[str, Rule] = {
        "seed": integer(0),
        # data
        "data.image_size": COUNT,
        "data.max_rows": NONNEG_INT,
        "data.strict": boolean,
        "data.decode_workers": COUNT,
        "data.world.num_pairs": COUNT,
        "data.world.num_test": COUNT,
        "data.world.num_clean": NONNEG_INT,
        "data.world.misaligned": FRACTION,
        "data.world.duplicates": FRACTION,
        "data.world.caption_noise": FRACTION,
        "data.world.image_size": COUNT,
        "mesh.data": integer(1, also=(-1,)),
        "mesh.fsdp": COUNT,
        "text.batch_size": COUNT,
        "text.max_len": integer(3),
        "text.pooling": choice(*bert.POOLINGS),
        # models
        "model.image": choice(*models.ENCODERS),
        "model.embed_dim": NONNEG_INT,  # 0: no image projection (configs/pretrain.py)
        "model.head_dropout": PROB,
        # 1/temperature scales the logits: below 1e-3 it overflows float32's softmax, and
        # above 1e3 every logit is alike (nothing trains).
        "model.temperature": number(1e-3, 1e3),
        "model.learn_temperature": boolean,
        "model.image_kwargs.matmul_dtype": choice(*conv.MATMUL_DTYPES),
        # compress (TL;DR)
        "captioner.vq_loss": choice(*vq.LOSS_FORMS),
        "captioner.num_codes": integer(2),
        "captioner.code_dim": COUNT,
        "captioner.beta": NONNEG,
        "captioner.ema_decay": PROB,
        "captioner.max_len": integer(3),
        "extract.batch_size": COUNT,
        "extract.chunk_size": COUNT,
        "select.feature": choice(*features.FEATURES),
        "select.init": choice("kmeans++", "kmeans||"),
        "select.gemm_dtype": choice(*kmeans.GEMM_DTYPES),
        "select.strategy": choice(*strategies.STRATEGIES),
        "select.num_clusters": COUNT,
        "select.iterations": COUNT,
        "select.pca_dim": NONNEG_INT,
        "select.target": fraction_or_count,
        "select.stride": COUNT,
        "select.spherical": boolean,
        "select.whiten": boolean,
        "select.max_in_memory_mb": POSITIVE,
        "select.stream_chunk_rows": COUNT,
        "select.seed": integer(0, also=(-1,)),
        "score.keep_fraction": number(0.0, 1.0, lo_open=True),
        "score.filter_over": choice("selected", "all"),
        "score.scorer": choice("dual_encoder"),
        "caption.method": choice(*generate.METHODS),
        "caption.beam_size": COUNT,
        "caption.max_len": COUNT,
        "caption.top_p": number(0.0, 1.0, lo_open=True),
        "caption.temperature": POSITIVE,
        "caption.batch_size": COUNT,
        "write.mode": choice(*write.MODES),
        "retrieval_eval.enabled": boolean,
        "retrieval_eval.budget": choice("steps", "epochs"),
        # distillation
        "buffer.num_experts": COUNT,
        "buffer.epochs": COUNT,
        "buffer.lr": POSITIVE,
        "buffer.batch_size": PAIRS,
        "distill.num_pairs": PAIRS,
        "distill.syn_steps": COUNT,
        "distill.expert_epochs": COUNT,
        "distill.max_start_epoch": COUNT,
        "distill.iterations": NONNEG_INT,
        "distill.batch_syn": integer(2, also=(0,)),
        "distill.grad_mode": choice(*matching.GRAD_MODES),
        "distill.micro_batches": COUNT,
        "distill.remat_budget_mib": NONNEG,
        "distill.scan_unroll": boolean,
        "distill.shard_student_batch": boolean,
        "distill.init": choice(*distill_stage.INITS),
        "distill.seed": integer(0, also=(-1,)),
        "distill.kmeans_features": choice("text", "image"),
        "distill.step_size_init": POSITIVE,
        "distill.lr_images": NONNEG,
        "distill.lr_texts": NONNEG,
        "distill.lr_step_size": NONNEG,
        "distill.step_size_param": choice("log", "raw"),
        "distill.max_grad_norm": NONNEG,
        "distill.momentum": PROB,
        "distill.quirk_logit_scale": boolean,
        "distill.quirk_dropout": boolean,
        "distill.ckpt_every": COUNT,
        "distill.log_every": COUNT,
        "distill.lors": boolean,
        "distill.lors_rank": COUNT,
        "distill.lors_alpha": NONNEG,
        "distill.lors_lr": NONNEG,
        "eval.num_models": COUNT,
        "eval.epochs": COUNT,
        "eval.batch_size": PAIRS,
        "eval.momentum": PROB,
        "eval.weight_decay": NONNEG,
        "eval.max_steps": NONNEG_INT,
        "eval.coreset_pairs": integer(2, also=(0,)),
        "eval.coreset_lr": POSITIVE,
        "eval.text_head_lr": choice("image", "text"),
        "eval.budgets": integers(2),
    }
    for prefix in TRAINING_BLOCKS:
        r.update(_training_rules(prefix))
    r["train.batch_size"] = PAIRS  # the dual encoder's; the captioners' may be 1
    return r


def lookup(config: ml_collections.ConfigDict, path: str) -> tuple[bool, Any]:
    """(present, value) of the dotted key `path` in `config`."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _world_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The embedded world's row kinds must fit its rows: duplicates copy non-duplicate rows,
    and misaligned rows are non-duplicate rows describing another one (each fraction alone
    in [0, 1] let `duplicates=1.0` or `misaligned + duplicates > 1` through)."""
    values = [lookup(config, f"data.world.{k}") for k in ("num_pairs", "misaligned", "duplicates")]
    if not all(ok for ok, _ in values):
        return []
    n, mis, dup = (v for _, v in values)
    if not (isinstance(n, int) and n > 0 and all(isinstance(x, int | float) for x in (mis, dup))):
        return []
    base, n_mis = n - int(round(dup * n)), int(round(mis * n))
    if base >= 1 and n_mis <= base and (n_mis == 0 or base >= 2):
        return []
    return [
        f"data.world.misaligned={mis!r} + data.world.duplicates={dup!r} of {n} pairs: "
        "duplicates copy the other rows and misaligned rows are drawn from those, so "
        "misaligned + duplicates must be <= 1 and leave at least one row that is not a "
        "duplicate (two where any are misaligned)"
    ]


def _select_problems(config: ml_collections.ConfigDict) -> list[str]:
    """select.target=0 (the stride rule's own size) needs select.strategy='stride'."""
    (has_target, target), (_, strategy) = (
        lookup(config, f"select.{k}") for k in ("target", "strategy")
    )
    if not has_target or fraction_or_count(target) or target != 0 or strategy == "stride":
        return []
    return [
        f"select.target={target!r} with select.strategy={strategy!r}: 0 (keep every "
        "select.stride-th member of each cluster) is the stride strategy's own size; give "
        "the others a fraction or a count"
    ]


def _distill_problems(config: ml_collections.ConfigDict) -> list[str]:
    """distill.expert_epochs must fit in buffer.epochs (a start epoch plus expert_epochs is
    an epoch the experts snapshot): checked for `buffer` too, before it trains experts that
    `distill` could not use."""
    (has_e, expert_epochs), (has_b, epochs) = (
        lookup(config, k) for k in ("distill.expert_epochs", "buffer.epochs")
    )
    if not (has_e and has_b) or COUNT(expert_epochs) or COUNT(epochs) or expert_epochs <= epochs:
        return []
    return [
        f"distill.expert_epochs={expert_epochs} > buffer.epochs={epochs}: distill matches an "
        "expert's epoch s + expert_epochs, which must be one the buffer trains; raise "
        "buffer.epochs or lower distill.expert_epochs"
    ]


def micro_batch_problems(config: ml_collections.ConfigDict) -> list[str]:
    """distill.micro_batches must divide the student batch (distill.batch_syn, or num_pairs
    where that is 0 or larger): checked for `buffer` too, before it trains experts that
    `distill` would refuse, and by `distill` itself for callers past the CLI."""
    values = [lookup(config, f"distill.{k}") for k in ("micro_batches", "batch_syn", "num_pairs")]
    if not all(ok for ok, _ in values):
        return []
    slices, batch_syn, num_pairs = (v for _, v in values)
    if COUNT(slices) or integer(2, also=(0,))(batch_syn) or PAIRS(num_pairs):
        return []  # each key's own rule says what is wrong
    batch = min(batch_syn or num_pairs, num_pairs)
    if batch % slices == 0:
        return []
    return [
        f"distill.micro_batches={slices}: must divide the student batch {batch} "
        "(distill.batch_syn, or distill.num_pairs where batch_syn is 0 or larger)"
    ]


def _min_lr_problems(config: ml_collections.ConfigDict) -> list[str]:
    """A decaying schedule's floor (min_lr) above its lr would become the learning rate."""
    out = []
    for block in TRAINING_BLOCKS:
        (has_lr, lr), (has_min, min_lr), (_, kind) = (
            lookup(config, f"{block}.{k}") for k in ("lr", "min_lr", "schedule")
        )
        if not (has_lr and has_min) or POSITIVE(lr) or NONNEG(min_lr):
            continue
        if kind in ("cosine", "epoch_decay", None) and min_lr > lr:
            out.append(
                f"{block}.min_lr={min_lr!r} > {block}.lr={lr!r}: the {kind or 'cosine'} "
                f"schedule decays from lr to min_lr; lower {block}.min_lr"
            )
    return out


def problems(config: ml_collections.ConfigDict) -> list[str]:
    """`key=value: must be ...` for each checked key the config has with a bad value."""
    out = []
    for path, rule in rules().items():
        present, value = lookup(config, path)
        if present and (why := rule(value)) is not None:
            out.append(f"{path}={value!r}: must be {why}")
    out += _world_problems(config) + _select_problems(config) + _distill_problems(config)
    out += micro_batch_problems(config)
    out += _min_lr_problems(config)
    # Each block that builds an image encoder (model, captioner, caption): its image_kwargs
    # must suit the encoder it names (keys only another encoder takes are left out then).
    from tldr_jax import models

    for block in ("model", "captioner", "caption"):
        present, kwargs = lookup(config, f"{block}.image_kwargs")
        name = config[block].get("image") if present else None
        if present and name in models.ENCODERS:
            try:
                models.encoder_kwargs(name, dict(kwargs))
            except ValueError as e:
                out.append(f"{block}.image={name!r}: {e}")
                continue
            size_ok, size = lookup(config, "data.image_size")
            if size_ok and isinstance(size, int) and size > 0:
                why = models.image_size_problem(name, dict(kwargs), size)
                if why and why.startswith("image_kwargs."):  # the argument's own fault
                    out.append(f"{block}.{why}")
                elif why:
                    out.append(f"data.image_size={size}: {block}.image={name!r}: {why}")
    return out


_PRETRAIN = ("data", "model", "text", "train")
_TLDR = (*_PRETRAIN, "captioner", "extract", "select", "score", "caption", "write")
_DISTILL = ("data", "model", "text", "buffer", "distill", "eval")
# stage -> (config blocks it reads, the config file that has them)
STAGE_BLOCKS: dict[str, tuple[tuple[str, ...], str]] = {
    "make-world": (("data",), "any config"),
    "pretrain": (_PRETRAIN, "configs/pretrain.py"),
    "evaluate": (_PRETRAIN, "configs/pretrain.py"),
    **{
        s: (_TLDR, "configs/tldr.py")
        for s in ("train-captioner", "extract", "select", "score", "caption", "write")
    },
    "compress": ((*_TLDR, "retrieval_eval"), "configs/tldr.py"),
    **{s: (_DISTILL, "configs/distill.py") for s in ("buffer", "distill", "eval-distilled")},
}


# The path keys a stage reads -> what each must name (a file or folder, or a folder).
_READS_TRAIN = (
    "pretrain",
    "train-captioner",
    "extract",
    "score",
    "caption",
    "write",
    "compress",
    "buffer",
    "distill",
    "eval-distilled",
)
_READS_TEST = ("pretrain", "evaluate", "score", "compress", "buffer", "distill", "eval-distilled")
_INPUT_KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "data.train": (_READS_TRAIN, False),
    "data.image_root": ((*_READS_TRAIN, "evaluate"), True),
    "data.test": (_READS_TEST, False),
    "data.test_image_root": (_READS_TEST, True),
    "caption.data": (("caption", "compress"), False),
    "caption.image_root": (("caption", "compress"), True),
    "text.model_dir": ((*(s for s in _READS_TRAIN if s != "write"), "evaluate"), True),
}


def missing_inputs(config: ml_collections.ConfigDict, stage: str) -> list[str]:
    """`key='path': no such file or folder` for each input path the stage reads that is not
    there, before any stage has run (a bad `caption.data` surfaced only at the fifth of
    compress's stages). Each of several inputs joined by commas is checked; a Karpathy
    `:split` suffix is left off; `tfds:` names and shard patterns (`{00000..00099}.tar`, a
    missing shard of which is a counted gap) are the readers' to check."""
    from tldr_jax.data import readers

    out = []
    for key, (stages, folder) in _INPUT_KEYS.items():
        present, value = lookup(config, key)
        if key == "text.model_dir" and present and value == "" and stage in stages:
            from tldr_jax.models.pretrained import default_text_model_dir

            try:  # the default encoder's wheel, found before any set is read
                default_text_model_dir()
            except FileNotFoundError as e:
                out.append(f"text.model_dir='' (the default text encoder): {e}")
            continue
        if not present or stage not in stages or not isinstance(value, str) or not value:
            continue
        if key.endswith("image_root"):  # one root, or one per input
            parts = readers.split_roots(value)
        else:
            parts = [value] if folder else readers.split_inputs(value)
        for part in parts:
            path = part if folder else readers.split_suffix_of(part)[0]
            if not path or path.startswith("tfds:"):
                continue  # an empty root of several: that input's own folder
            if not folder and readers.is_shard_pattern(path):
                continue
            if folder and not os.path.isdir(path):
                what = "not a folder" if os.path.exists(path) else "no such folder"
                out.append(f"{key}={path!r}: {what}")
            elif not folder and not os.path.exists(path):
                out.append(f"{key}={path!r}: no such file or folder")
    return out + root_count_problems(config, stage)


# (inputs key, its image root key, the root key used where that one is empty, stages)
_ROOTS_OF = (
    ("data.train", "data.image_root", "", _READS_TRAIN),
    ("data.test", "data.test_image_root", "data.image_root", _READS_TEST),
    ("caption.data", "caption.image_root", "", ("caption", "compress")),
)


def root_count_problems(config: ml_collections.ConfigDict, stage: str) -> list[str]:
    """An image root key holding several roots (one per input, joined by commas) must hold
    one per input of the set it serves: the test set takes data.image_root's roots where
    data.test_image_root is empty, which fit it only when it has as many inputs."""
    from tldr_jax.data import readers

    out = []
    for inputs_key, root_key, fallback, stages in _ROOTS_OF:
        present, inputs = lookup(config, inputs_key)
        if not present or stage not in stages or not isinstance(inputs, str) or not inputs:
            continue
        key = root_key
        _, root = lookup(config, root_key)
        if not root and fallback:
            key, root = fallback, lookup(config, fallback)[1]
        if not isinstance(root, str) or not root:
            continue
        roots, parts = readers.split_roots(root), readers.split_inputs(inputs)
        if len(roots) > 1 and len(roots) != len(parts):
            hint = f" (set {root_key} for {inputs_key}'s images)" if key != root_key else ""
            out.append(
                f"{key}={root!r}: {len(roots)} roots for the {len(parts)} input(s) of "
                f"{inputs_key}: give one root, or one per input in the same order{hint}"
            )
    return out


def local_path(part: str) -> str:
    """A path value as the shell would not give it: a leading `~` expanded, a `file:` URL
    as the path it names; anything else unchanged."""
    text = part.strip()
    if text.startswith("~"):
        return os.path.expanduser(text)
    if text[:5].lower() == "file:":
        from tldr_jax.data.readers import file_url_path

        local = file_url_path(text)
        return part if local is None else local
    return part


def expand_home(config: ml_collections.ConfigDict) -> None:
    """Expands a leading `~` / `~user` in every string value in place, and in each part of
    one joined by commas (`data.train`, `data.image_root`, `caption.data`, ...): the shell
    leaves `--config.data.train=~/x` as it is, and a path with a literal `~` folder is never
    what was meant. A `file://` URL is the path it names, as in the readers' rows."""
    for key in list(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            expand_home(value)
        elif isinstance(value, str) and ("~" in value or "file:" in value.lower()):
            # each of several inputs joined by commas (`data.train=~/a.json, ~/b.json`)
            several = re.search(r",\s*(~|[fF][iI][lL][eE]:)", value)
            parts = value.split(",") if several else [value]
            expanded = ",".join(local_path(p) for p in parts)
            if expanded != value:
                config[key] = expanded


def check_batch_fits(pairs: int, batch_size: int, key: str, what: str = "training pairs") -> None:
    """A ConfigError where a training set of `pairs` examples (`what`) is smaller than one
    batch."""
    if pairs < batch_size:
        raise ConfigError(f"{pairs} {what} < {key}={batch_size}: lower it or use more data")


def check_contrastive_set(pairs: int, what: str, fix: str) -> None:
    """A ConfigError where a set trained on contrastively has fewer than two pairs (see
    `PAIRS`): `what` names the set, `fix` what to do."""
    if pairs < 2:
        raise ConfigError(
            f"{what} has {pairs} pair{'s' * (pairs != 1)}: contrastive training needs at "
            f"least 2 per batch (one pair's loss is always 0, so nothing would train); {fix}"
        )


def check(config: ml_collections.ConfigDict, stage: str | None = None) -> None:
    """Raises ConfigError naming every bad value (see `problems`), or, given the stage, the
    blocks it reads that the config lacks (a config of another stage family)."""
    if stage in STAGE_BLOCKS:
        blocks, source = STAGE_BLOCKS[stage]
        missing = [b for b in blocks if b not in config]
        if missing:
            raise ConfigError(
                f"stage {stage!r} reads config blocks {', '.join(blocks)} ({source}); this "
                f"config has no {', '.join(missing)}"
            )
    found = problems(config) + (missing_inputs(config, stage) if stage else [])
    if found:
        head = "bad config value" + ("s" if len(found) > 1 else "")
        raise ConfigError(head + ": " + "; ".join(found))
