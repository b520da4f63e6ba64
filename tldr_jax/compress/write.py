"""Stage `write`: the new BLIP-format training file and its manifest (SPEC A.6).

caption = original + "; " + generated (mode `append`, the reference), or the generated caption
replacing the original (`replace`); in both a kept sample with no generated caption keeps its
original. `generated`: a file of generated captions only, kept samples without one left out
(counted in the summary's `left_out_without_generated_caption`).
Image paths are written exactly as the input had them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections

from tldr_jax.compress.common import (
    check_stage,
    data_counts,
    load_train,
    require_inputs,
    rows_of,
    stage_dir,
)
from tldr_jax.config_check import ConfigError
from tldr_jax.utils import dist, io

MODES = ("append", "replace", "generated")


def combine(original: str, generated: str | None, mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"write.mode must be one of {MODES}, got {mode!r}")
    if not generated:
        return original
    if mode == "append":
        return f"{original}; {generated}"
    return generated


def materialise_encoded_images(
    config: ml_collections.ConfigDict, ids: list[str], out: Path
) -> dict[str, str] | None:
    """Webdataset shards and TFDS sources have no image files: write the kept images' encoded
    bytes (unchanged) under out/images/, once per distinct image (a webdataset with one
    sample per caption repeats each image), and return {sample_id: path relative to out}.
    Returns None for path-based inputs (an image folder too), whose paths are kept exactly
    as written. Several inputs (`data.train=a.json,shards/`): their path-based rows map to
    absolute paths, since one image root cannot serve files from several folders."""
    from tldr_jax.data.readers import is_shard_input, read_records, split_inputs

    source = str(config.data.train)
    parts = split_inputs(source) if source else []
    encoded = [p for p in parts if p.startswith("tfds:") or is_shard_input(p)]
    several = len(parts) > 1
    if not encoded and not several:
        return None
    from tldr_jax.config_lib import image_root_of
    from tldr_jax.data import dataset
    from tldr_jax.data.imagestore import image_identity
    from tldr_jax.data.records import LazyImage, Skips

    wanted = set(ids)
    paths: dict[str, str] = {}
    written: dict[bytes, str] = {}  # one file per distinct image (`image_identity`)
    names: set[str] = set()
    # Read as load_train reads it (a Karpathy split file among the inputs: its train split).
    root = image_root_of(config.data, "train")
    for rec in read_records(source, root, Skips(strict=False), role="train"):
        # TL;DR's stages see one pair per caption (`ImageTextSet.pairs`).
        pair_ids = [p for p in dataset.pair_ids(rec.sample_id, len(rec.captions)) if p in wanted]
        if pair_ids and several and isinstance(rec.image, str):
            paths.update(dict.fromkeys(pair_ids, os.path.abspath(rec.image)))
        if not pair_ids or not isinstance(rec.image, bytes | LazyImage):
            continue
        identity = image_identity(rec.image)
        if identity not in written:
            name = rec.image_key.replace(".tar/", "/").replace(":", "_").replace("\\", "/")
            # Never outside out/images: no absolute, empty, "." or ".." parts.
            name = "/".join(p for p in name.split("/") if p not in ("", ".", "..")) or "image"
            stem, dot, ext = name.rpartition(".")
            k = 0
            while name in names:  # the same key in two inputs' shards, different images
                k += 1
                name = f"{stem}-{k}{dot}{ext}" if dot else f"{ext}-{k}"
            names.add(name)
            written[identity] = str(Path("images") / name)
            if dist.is_main():
                with io.atomic_path(out / written[identity]) as tmp:
                    data = rec.image.read() if isinstance(rec.image, LazyImage) else rec.image
                    tmp.write_bytes(data)
        paths.update(dict.fromkeys(pair_ids, written[identity]))
    return paths


def image_root_for(config: ml_collections.ConfigDict, workdir: str | Path) -> str:
    """Where the file's relative image paths resolve. The embedded world is written to
    WORKDIR/world once so its training file is usable by any BLIP-format reader."""
    if config.data.train:
        from tldr_jax.data.readers import (
            annotation_folder,
            coco_image_folder,
            split_inputs,
            split_suffix_of,
        )

        if len(split_inputs(str(config.data.train))) > 1:
            return ""  # several inputs: their rows carry absolute paths
        source = split_suffix_of(str(config.data.train))[0]
        if os.path.isdir(source):  # an image folder: its image keys are paths below it
            return os.path.abspath(source)
        coco = coco_image_folder(source, str(config.data.image_root))
        if coco is not None:  # COCO's layout: images beside the annotation folder
            return os.path.abspath(coco)
        if config.data.image_root:
            return os.path.abspath(str(config.data.image_root))
        return annotation_folder(source) if os.path.isfile(source) else ""
    from tldr_jax.data.world import make_world, write_world

    world_dir = Path(workdir) / "world"
    if not (world_dir / "train.json").exists() and dist.is_main():
        write_world(make_world(config.data.world), world_dir)
    dist.barrier("world-written")
    return os.path.abspath(world_dir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    require_inputs(workdir, "write")
    # Redone whole on every run (a changed write.mode too); refused where the earlier stages'
    # outputs were made with other settings or data than this run's.
    check_stage(config, workdir, "write")
    out = stage_dir(workdir, "compress")
    train = load_train(config)
    kept_ids, kept_scores = io.npz_arrays(
        Path(workdir) / "score" / "kept.npz", "ids", "scores", made_by="score"
    )
    rows = rows_of(train.ids, kept_ids)
    generated: dict[str, str] = io.read_json(
        Path(workdir) / "caption" / "generated.json", made_by="caption"
    )
    cluster_ids, assignments = io.npz_arrays(
        Path(workdir) / "select" / "clusters.npz", "ids", "assignments", made_by="select"
    )
    cluster_of = dict(zip(cluster_ids.tolist(), assignments.tolist(), strict=True))

    mode = str(config.write.mode)
    extracted = materialise_encoded_images(config, [train.ids[r] for r in rows], out)
    entries, manifest, written = [], [], []
    left_out = 0
    for r, score in zip(rows, kept_scores, strict=True):
        sid = train.ids[r]
        original = train.captions[r][0]
        if mode == "generated" and not generated.get(sid):
            left_out += 1  # a generated-captions-only file
            continue
        caption = combine(original, generated.get(sid), mode)
        image = extracted.get(sid, train.image_keys[r]) if extracted else train.image_keys[r]
        entries.append({"image": image, "caption": caption})
        written.append(r)
        manifest.append(
            {
                "id": sid,
                "image": image,
                "cluster": int(cluster_of.get(sid, -1)),
                "score": float(score),
                "original": original,
                "generated": generated.get(sid),
            }
        )
    if not entries:  # an empty train.json is no compressed set (caption.json says why)
        raise ConfigError(
            f"write.mode={mode!r}: none of the {len(rows)} kept rows has a generated caption "
            "(caption.json: empty_generations); nothing to write. Use write.mode='append' or "
            "'replace', or redo the caption stage"
        )
    # Absolute, so the manifest and summary say where train.json's paths resolve from any
    # working directory (the paths themselves stay as the input wrote them).
    image_root = os.path.abspath(out) if extracted else image_root_for(config, workdir)
    without_generated = sum(1 for m in manifest if not m["generated"])
    if dist.is_main():
        io.write_json(out / "train.json", entries, indent=None)
        io.write_json(
            out / "manifest.json",
            {
                "image_root": image_root,
                "mode": mode,
                "rows": manifest,
                "config": config.to_dict(),
            },
            indent=None,
        )
    return {
        "input_rows": len(train),
        **data_counts(train),
        # Distinct images among the pairs (one file however its path is spelled).
        "input_images": train.distinct_images(),
        "kept_images": train.distinct_images(written),
        "kept_rows": len(entries),
        "fraction": len(entries) / max(len(train), 1),
        "mode": mode,
        "kept_without_generated_caption": without_generated,
        "left_out_without_generated_caption": left_out,
        "train_json": os.path.abspath(out / "train.json"),
        "image_root": image_root,
    }
