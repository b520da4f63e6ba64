"""Stage `extract`: every training row's code-index sequence, keyed by its sample id (SPEC A.2).

Output: W/extract/codes-NNNNN.npz, chunk c holding rows [c * chunk_size, (c + 1) * chunk_size)
of the training set as `ids` (str) and `codes` (int32 (n, T)), plus W/extract/ids.json (every
sample id in input order). Every row travels with its id inside its chunk: readers match codes
to samples by id, never by chunk or file-listing order (the reference's bug).

Chunk c belongs to process c % process_count, which computes it on its own devices (the batch
split over them) and writes it atomically; an existing chunk file is complete and skipped, so
an interrupted run resumes where it stopped and a finished one reruns in seconds.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tldr_jax.compress.captioner_stage import (
    local_mesh,
    local_model,
    padded_batches,
    restore_codebook_captioner,
    round_up,
)
from tldr_jax.compress.common import (
    check_stage,
    data_counts,
    load_train,
    require_inputs,
    stage_dir,
)
from tldr_jax.data.dataset import ImageTextSet
from tldr_jax.data.images import normalize
from tldr_jax.models.captioner import CodebookCaptioner
from tldr_jax.utils import dist, io, preemption, progress
from tldr_jax.utils.mesh import data_sharding, make_mesh, replicated

log = logging.getLogger(__name__)

NAME = "extract"


def chunk_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / f"codes-{chunk:05d}.npz"


def chunk_plan(
    num_rows: int, chunk_size: int, process_index: int = 0, process_count: int = 1
) -> list[tuple[int, int, int]]:
    """(chunk, start row, stop row) of the chunks owned by one process: c % count == index.

    Over all processes the chunks partition [0, num_rows) exactly once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_chunks = -(-num_rows // chunk_size)
    return [
        (c, c * chunk_size, min((c + 1) * chunk_size, num_rows))
        for c in range(process_index, num_chunks, process_count)
    ]


def make_codes_fn(model: CodebookCaptioner, mesh: jax.sharding.Mesh) -> Any:
    """Jitted images (B, H, W, 3) -> codes int32 (B, T), batch split over `mesh`.

    The weights are an argument, not closed-over constants baked into the compiled program.
    """
    graphdef, variables = nnx.split(model)
    fn = jax.jit(
        lambda v, x: nnx.merge(graphdef, v).codes(x),
        in_shardings=(replicated(mesh), data_sharding(mesh)),
        out_shardings=data_sharding(mesh),
    )
    return functools.partial(fn, variables)


def extract_chunks(
    model: CodebookCaptioner,
    ds: ImageTextSet,
    out_dir: Path,
    *,
    chunk_size: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> int:
    """Writes this process's missing chunk files; returns how many it wrote."""
    mesh = local_mesh()
    batch_size = round_up(batch_size, mesh.size)  # every device gets the same number of rows
    codes_fn = make_codes_fn(model, mesh)
    plan = chunk_plan(len(ds), chunk_size, process_index, process_count)
    todo = [(c, a, b) for c, a, b in plan if not chunk_path(out_dir, c).exists()]
    done = len(plan) - len(todo)  # this process's chunks written by earlier runs
    with preemption.polling():
        for c, start, stop in progress.bar(
            todo, desc=NAME, disable=not dist.is_main(), leave=False
        ):
            rows = np.arange(start, stop)
            parts = []
            for idx in padded_batches(len(rows), batch_size):
                images = jax.device_put(normalize(ds.images[rows[idx]]), data_sharding(mesh))
                parts.append(np.asarray(codes_fn(images)))
            codes = np.concatenate(parts)[: len(rows)].astype(np.int32)
            ids = np.array([ds.ids[r] for r in rows], dtype=np.str_)
            io.write_npz(chunk_path(out_dir, c), ids=ids, codes=codes)
            done += 1
            if preemption.requested():
                raise preemption.stop(NAME, done)  # step = chunks written
    return len(todo)


def read_chunks(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, codes) of the chunk files, in chunk-number order."""
    ids, codes = [], []
    for f in sorted(out_dir.glob("codes-*.npz")):
        chunk_ids, chunk_codes = io.npz_arrays(f, "ids", "codes", made_by="extract")
        ids.append(chunk_ids.astype(str))
        codes.append(chunk_codes)
    return np.concatenate(ids), np.concatenate(codes)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    require_inputs(workdir, NAME)
    check_stage(config, workdir, NAME)  # this workdir's earlier runs: same settings and data
    out = stage_dir(workdir, NAME)
    e, c = config.extract, config.captioner
    train = load_train(config)
    if len(set(train.ids)) != len(train.ids):
        raise ValueError("training sample ids are not unique; codes could not be keyed by id")
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
    model_def, state, step = restore_codebook_captioner(config, workdir, mesh)
    model = local_model(model_def, state, local_mesh())
    load_s = time.time() - t0

    t1 = time.time()
    written = extract_chunks(
        model,
        train,
        out,
        chunk_size=int(e.chunk_size),
        batch_size=int(e.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    extract_s = time.time() - t1
    dist.barrier("extract-chunks-written")

    # Every process sees every chunk (shared filesystem): check that they cover the set once.
    ids, codes = read_chunks(out)
    if sorted(ids.tolist()) != sorted(train.ids):
        raise RuntimeError(f"{out}: chunks hold {len(ids)} ids, expected the {len(train)} rows")
    if dist.is_main():
        io.write_json(out / "ids.json", list(train.ids), indent=None)
    num_chunks = len(chunk_plan(len(train), int(e.chunk_size)))
    return {
        "rows": len(ids),
        **data_counts(train),
        "chunks": num_chunks,
        "chunks_written": written,  # by this process in this run; the rest existed
        "chunk_size": int(e.chunk_size),
        "tokens_per_image": int(codes.shape[1]),
        "codebook_size": int(c.num_codes),
        "codes_used": int(np.unique(codes).size),
        "code_usage": round(np.unique(codes).size / int(c.num_codes), 4),
        "checkpoint_step": step,
        "time_s": {
            "load": round(load_s, 3),
            "extract": round(extract_s, 3),
            "total": round(time.time() - t0, 3),
        },
    }
