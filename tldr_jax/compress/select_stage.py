"""`tldr-jax select`: features -> PCA -> L2 -> JIT k-means -> per-cluster selection.

Reads the `extract` stage's chunks (W/extract/codes-NNNNN.npz with `ids` and `codes`, written
in any order by any number of processes) and keys every row by its sample id, never by file
order. Writes W/select/{selected,clusters,random}.npz and W/select/cluster_sizes.png.

Memory: the features are built chunk by chunk into one float32 (N, D) array, PCA'd and
normalised in place, so the host holds about one copy (plus the devices' copy). Above
`select.max_in_memory_mb` that array is a memory map under W/select/ and k-means streams it.
Several processes: each reads every row in the same order, k-means shards the rows over all
devices, every process gets every assignment, process 0 writes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tldr_jax import config_lib
from tldr_jax.compress.common import DATA_COUNT_KEYS, check_stage, require_inputs
from tldr_jax.select import features as features_lib
from tldr_jax.select import kmeans as kmeans_lib
from tldr_jax.select import pca as pca_lib
from tldr_jax.select import strategies
from tldr_jax.utils import dist, io
from tldr_jax.utils import mesh as mesh_lib

log = logging.getLogger(__name__)


def _row_order(extract_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """Chunk files, the chunk row offsets, ordered ids, and each file row's output row (-1: drop).

    Reads only the `ids` of every chunk. Ids are kept as one fixed-width numpy string array
    and matched by sorting (no per-id Python objects: millions of rows).
    """
    files = sorted(extract_dir.glob("codes-*.npz"))
    if not files:
        raise FileNotFoundError(f"no codes-*.npz chunks in {extract_dir}; run `extract` first")
    parts = []
    for f in files:
        parts.append(io.npz_arrays(f, "ids", made_by="extract")[0].astype(str))
    offsets = np.cumsum([0] + [len(p) for p in parts])
    file_ids = np.concatenate(parts)
    uniq, first = np.unique(file_ids, return_index=True)
    if len(first) != len(file_ids):
        log.warning("select: %d duplicate ids across chunks dropped", len(file_ids) - len(first))
    order_file = extract_dir / "ids.json"
    if order_file.exists():
        wanted = np.asarray(io.read_json(order_file, made_by="extract"), dtype=str)
        pos = np.minimum(np.searchsorted(uniq, wanted), len(uniq) - 1)
        missing = wanted[uniq[pos] != wanted]
        if len(missing):
            raise ValueError(f"{len(missing)} ids of ids.json have no codes, e.g. {missing[:3]}")
        src = first[pos]
    else:  # chunk file name, then row order
        src = np.sort(first)
    dest = np.full(len(file_ids), -1, np.int64)
    dest[src] = np.arange(len(src))
    return files, offsets, file_ids[src], dest


def _fill_rows(
    files: list[Path],
    offsets: np.ndarray,
    dest: np.ndarray,
    fn: Any,
    alloc: Any,
    check: Any = None,
) -> np.ndarray:
    """out[dest[r]] = fn(codes of file row r) chunk by chunk; `alloc(width, dtype)` makes out.

    `check(file, rows, out_rows)`, if given, sees each chunk's rows before they are stored."""
    out = None
    for i, f in enumerate(files):
        d = dest[offsets[i] : offsets[i + 1]]
        keep = d >= 0
        rows = fn(io.npz_arrays(f, "codes", made_by="extract")[0][keep])
        if check is not None:
            check(f, rows, d[keep])
        if out is None:
            out = alloc(rows.shape[1], rows.dtype)
        out[d[keep]] = rows
    return out


def load_codes(extract_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, codes) from the chunk files, ordered by W/extract/ids.json when present.

    Without ids.json rows are ordered by chunk file name, then row. Duplicate ids (a chunk
    rewritten after a restart) keep one copy; ids listed in ids.json but missing are an error.
    """
    files, offsets, ids, dest = _row_order(Path(extract_dir))
    codes = _fill_rows(
        files,
        offsets,
        dest,
        lambda c: c.astype(np.int32),
        lambda width, dtype: np.empty((len(ids), width), dtype),
    )
    return ids, codes


def load_features(
    extract_dir: str | Path,
    feature: features_lib.Feature,
    codebook_size: int,
    memmap_path: Path,
    max_in_memory_mb: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 features) built chunk by chunk straight into one (N, D) array.

    The int32 codes never exist whole. Features larger than `max_in_memory_mb` live in a
    memory-mapped .npy at `memmap_path` instead of in RAM (an `np.memmap`). A NaN/inf feature
    row (codes come from our own model, so only a corrupt chunk file has one) stops the stage
    with a ValueError naming the chunk file, the number of such rows and the first id: one
    such row would turn the PCA mean, and so every row, into NaN.
    """
    files, offsets, ids, dest = _row_order(Path(extract_dir))

    def finite(f: Path, rows: np.ndarray, out_rows: np.ndarray) -> None:
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise ValueError(
                f"select: {int(bad.sum())} of {len(rows)} feature rows from {f} contain NaN or "
                f"inf (first id {ids[out_rows[bad.argmax()]]!r}); its codes are corrupt: "
                "re-run `extract` for that chunk"
            )

    def alloc(width: int, dtype: Any) -> np.ndarray:
        shape = (len(ids), width)
        if len(ids) * width * 4 <= max_in_memory_mb * 2**20:
            return np.empty(shape, np.float32)
        memmap_path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(memmap_path, "w+", np.float32, shape)

    feats = _fill_rows(
        files,
        offsets,
        dest,
        lambda c: features_lib.make_features(c, feature, codebook_size),
        alloc,
        finite,
    )
    return ids, feats


def _plot_cluster_sizes(sizes: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)))
    ax.set_xlabel("cluster size (rows)")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes)} clusters, {int((sizes == 0).sum())} empty")
    io.save_figure(fig, path)


def _kmeans(feats: np.ndarray, k: int, cfg: Any, seed: int, mesh: Any, stream: bool) -> Any:
    iterations = int(cfg.get("iterations", 20))
    init = cfg.get("init", "kmeans++")
    spherical = bool(cfg.get("spherical", False))
    gemm_dtype = cfg.get("gemm_dtype", "float32")
    if not stream:
        return kmeans_lib.kmeans(
            feats,
            k,
            iterations=iterations,
            init=init,
            spherical=spherical,
            seed=seed,
            mesh=mesh,
            gemm_dtype=gemm_dtype,
        )
    # Out of core: seeds from a seeded subsample (64 rows per cluster, as the in-memory
    # k-means++), then one pass over the memory-mapped rows per iteration.
    n = feats.shape[0]
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, 64 * k), replace=False))
    c0 = kmeans_lib.seed_centroids(np.asarray(feats[sample]), k, init=init, seed=seed, mesh=mesh)
    chunk = int(cfg.get("stream_chunk_rows", 262144))
    return kmeans_lib.kmeans_streaming(
        lambda: (feats[s : s + chunk] for s in range(0, n, chunk)),
        c0,
        iterations=iterations,
        spherical=spherical,
        mesh=mesh,
        gemm_dtype=gemm_dtype,
    )


def run(config: Any, workdir: str) -> dict:
    require_inputs(workdir, "select")
    check_stage(config, workdir, "select")  # the outputs it reads: same settings and data
    cfg = config.select
    out = Path(workdir) / "select"
    seed = config_lib.stage_seed(config, "select")
    timings: dict[str, float] = {}

    # Features: every process reads every row (same order, same features); k-means shards the rows.
    t0 = time.time()
    extract_dir = Path(workdir) / "extract"
    feature = cfg.get("feature", "sequence")
    extract_summary = io.read_json(Path(workdir) / "extract.json")
    codebook_size = int(extract_summary["codebook_size"])
    # Per-process file: every process builds its own copy of the rows.
    memmap_path = out / f"features-{jax.process_index()}.tmp.npy"
    if dist.is_main():  # maps left by processes a killed run had and this one has not
        for tmp in out.glob("features*-*.tmp.npy"):
            index = tmp.name[: -len(".tmp.npy")].rsplit("-", 1)[-1]
            if index.isdigit() and int(index) >= jax.process_count():
                tmp.unlink(missing_ok=True)
    budget = float(cfg.get("max_in_memory_mb", 4096))
    ids, feats = load_features(extract_dir, feature, codebook_size, memmap_path, budget)
    stream = isinstance(feats, np.memmap)
    n, dim = feats.shape
    timings["load_s"] = time.time() - t0
    # A count target above the rows there are keeps them all (said, and recorded as
    # `target_asked`), before the k-means time is spent.
    target_asked = cfg.get("target", 0.5)
    target = target_asked
    if float(target) > 1.0 and float(target) > n:
        log.warning("select.target %s is more than the %d rows there are: keeping all", target, n)
        target = 1.0  # all rows
    # 0: the stride rule's own size, known once the clusters are (config_check: stride only)
    count = strategies.target_count(target, n) if float(target) else 0

    # PCA (clamped to min(pca_dim, D, N)) and L2 normalisation, in place where shapes allow.
    t0 = time.time()
    pca_dim = int(cfg.get("pca_dim", 256))
    if pca_dim > 0:
        pca = pca_lib.fit_pca(feats, pca_dim, whiten=bool(cfg.get("whiten", True)))
        k_pca = pca.components.shape[0]
        if k_pca == dim:
            feats = pca.transform(feats, out=feats)
        elif stream:
            reduced = np.lib.format.open_memmap(
                out / f"features-pca-{jax.process_index()}.tmp.npy", "w+", np.float32, (n, k_pca)
            )
            feats = pca.transform(feats, out=reduced)
        else:
            feats = pca.transform(feats)
    features_lib.l2_normalize_(feats)
    timings["pca_s"] = time.time() - t0

    # k-means.
    t0 = time.time()
    k = min(int(cfg.get("num_clusters", 1000)), n)
    if k < int(cfg.get("num_clusters", 1000)):
        log.warning("select: select.num_clusters=%d > %d rows: %d clusters", cfg.num_clusters, n, k)
    mesh_cfg = config.get("mesh", None)
    mesh = mesh_lib.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp)) if mesh_cfg else None
    result = _kmeans(feats, k, cfg, seed, mesh, stream)
    timings["kmeans_s"] = time.time() - t0
    pca_out_dim = feats.shape[1]
    del feats
    for tmp in out.glob(f"features*-{jax.process_index()}.tmp.npy"):
        tmp.unlink()

    # Selection (the compress report's random baseline is drawn at the final kept size).
    stride = int(cfg.get("stride", 2))
    count = count or strategies.stride_count(result.assignments, stride)
    keep = strategies.select(
        cfg.get("strategy", "stride"),
        result.assignments,
        result.sq_distances,
        count,
        stride=stride,
        seed=seed,
    )
    sizes = np.bincount(result.assignments, minlength=k)
    if dist.is_main():
        io.write_npz(
            out / "selected.npz",
            ids=ids[keep],
            cluster=result.assignments[keep],
            distance=np.sqrt(result.sq_distances[keep]),
        )
        io.write_npz(
            out / "clusters.npz",
            ids=ids,
            assignments=result.assignments,
            distance=np.sqrt(result.sq_distances),
        )
        _plot_cluster_sizes(sizes, out / "cluster_sizes.png")
    # Outputs are complete before any process reports the stage done.
    dist.barrier("select_written")
    return {
        "input_rows": n,
        # The data rows behind the features (read and skipped by `extract`).
        **{k: extract_summary[k] for k in DATA_COUNT_KEYS if k in extract_summary},
        "feature_dim": dim,
        "pca_dim": pca_out_dim,
        "kept_rows": len(keep),
        "target_asked": target_asked,
        "fraction": len(keep) / n,
        "num_clusters": k,
        "nonempty_clusters": int((sizes > 0).sum()),
        "objective": result.objective,
        "empty_reseeded": result.empty_reseeded,
        "streamed": stream,
        "gemm_dtype": cfg.get("gemm_dtype", "float32"),
        "seed": seed,  # select.seed, or the global seed where that is -1
        **{key: round(v, 3) for key, v in timings.items()},
    }
