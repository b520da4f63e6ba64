"""`tldr-jax select`: features -> PCA -> L2 -> JIT k-means -> per-cluster selection.

Reads the `extract` stage's chunks (W/extract/codes-NNNNN.npz with `ids` and `codes`, written
in any order by any number of processes) and keys every row by its sample id, never by file
order. Writes W/select/{selected,clusters,random}.npz and W/select/cluster_sizes.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tldr_jax.select import features as features_lib
from tldr_jax.select import kmeans as kmeans_lib
from tldr_jax.select import pca as pca_lib
from tldr_jax.select import strategies
from tldr_jax.utils import dist, io
from tldr_jax.utils import mesh as mesh_lib

log = logging.getLogger(__name__)


def load_codes(extract_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, codes) from the chunk files, ordered by W/extract/ids.json when present.

    Without ids.json rows are ordered by chunk file name, then row. Duplicate ids (a chunk
    rewritten after a restart) keep one copy; ids listed in ids.json but missing are an error.
    """
    extract_dir = Path(extract_dir)
    files = sorted(extract_dir.glob("codes-*.npz"))
    if not files:
        raise FileNotFoundError(f"no codes-*.npz chunks in {extract_dir}; run `extract` first")
    ids_parts, code_parts = [], []
    for f in files:
        with np.load(f) as z:
            ids_parts.append(np.asarray(z["ids"]).astype(str))
            code_parts.append(np.asarray(z["codes"], np.int32))
    ids = np.concatenate(ids_parts)
    codes = np.concatenate(code_parts)
    _, first = np.unique(ids, return_index=True)
    if len(first) != len(ids):
        log.warning("select: %d duplicate ids across chunks dropped", len(ids) - len(first))
    keep = np.sort(first)
    ids, codes = ids[keep], codes[keep]
    order_file = extract_dir / "ids.json"
    if order_file.exists():
        wanted = np.asarray(io.read_json(order_file), dtype=str)
        position = {sid: i for i, sid in enumerate(ids)}
        missing = [sid for sid in wanted if sid not in position]
        if missing:
            raise ValueError(f"{len(missing)} ids of ids.json have no codes, e.g. {missing[:3]}")
        rows = np.fromiter((position[sid] for sid in wanted), np.int64, len(wanted))
        ids, codes = ids[rows], codes[rows]
    return ids, codes


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


def run(config: Any, workdir: str) -> dict:
    cfg = config.select
    out = Path(workdir) / "select"
    seed = int(cfg.get("seed", config.get("seed", 0)))
    timings: dict[str, float] = {}

    # Features.
    t0 = time.time()
    ids, codes = load_codes(Path(workdir) / "extract")
    codebook_size = int(io.read_json(Path(workdir) / "extract.json")["codebook_size"])
    feats = features_lib.make_features(codes, cfg.get("feature", "sequence"), codebook_size)
    n, dim = feats.shape
    timings["load_s"] = time.time() - t0

    # PCA (clamped to min(pca_dim, D, N)) and L2 normalisation.
    t0 = time.time()
    pca_dim = int(cfg.get("pca_dim", 256))
    if pca_dim > 0:
        pca = pca_lib.fit_pca(feats, pca_dim, whiten=bool(cfg.get("whiten", True)))
        feats = pca.transform(feats)
    feats = features_lib.l2_normalize(feats)
    timings["pca_s"] = time.time() - t0

    # k-means.
    t0 = time.time()
    k = min(int(cfg.get("num_clusters", 1000)), n)
    mesh_cfg = config.get("mesh", None)
    mesh = mesh_lib.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp)) if mesh_cfg else None
    result = kmeans_lib.kmeans(
        feats,
        k,
        iterations=int(cfg.get("iterations", 20)),
        init=cfg.get("init", "kmeans++"),
        spherical=bool(cfg.get("spherical", False)),
        seed=seed,
        mesh=mesh,
    )
    timings["kmeans_s"] = time.time() - t0

    # Selection, and the random baseline of the same size.
    count = strategies.target_count(cfg.get("target", 0.5), n)
    keep = strategies.select(
        cfg.get("strategy", "stride"),
        result.assignments,
        result.sq_distances,
        count,
        stride=int(cfg.get("stride", 2)),
        seed=seed,
    )
    baseline = strategies.select_random(n, count, seed + 1)
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
        io.write_npz(out / "random.npz", ids=ids[baseline])
        _plot_cluster_sizes(sizes, out / "cluster_sizes.png")
    return {
        "input_rows": n,
        "feature_dim": dim,
        "pca_dim": feats.shape[1],
        "kept_rows": len(keep),
        "fraction": len(keep) / n,
        "num_clusters": k,
        "nonempty_clusters": int((sizes > 0).sum()),
        "objective": result.objective,
        "empty_reseeded": result.empty_reseeded,
        **{key: round(v, 3) for key, v in timings.items()},
    }
