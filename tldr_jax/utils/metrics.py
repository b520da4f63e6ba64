"""Metric logging: a long-format CSV (step,name,value) plus PNG curves, main process only."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from tldr_jax.utils import io

log = logging.getLogger(__name__)


class MetricLogger:
    """Appends scalars to `workdir/metrics/<name>.csv`; `close()` draws `<name>.png`.

    Appending (not truncating) keeps the history of a resumed run in one file; rows from
    steps after the resume point are dropped on open so a rerun never duplicates them.
    """

    def __init__(self, workdir: str | os.PathLike, name: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.dir = Path(workdir) / "metrics"
        self.csv_path = self.dir / f"{name}.csv"
        self.png_path = self.dir / f"{name}.png"
        self.name = name
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.csv_path, self.png_path):  # a killed run's, half-written
            io.remove_stale_temps_of(path)
        rows = self._read()
        if resume_step is not None:
            rows = [r for r in rows if int(r[0]) <= resume_step]
        else:
            rows = []
        with (
            io.atomic_path(self.csv_path) as tmp,
            open(tmp, "w", newline="", encoding="utf-8") as f,
        ):
            w = csv.writer(f)
            w.writerow(["step", "name", "value"])
            w.writerows(rows)
        self._file = open(self.csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._file)

    def _read(self) -> list[list[str]]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        return [r for r in rows[1:] if len(r) == 3]

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._writer.writerow([int(step), k, float(v)])
        self._file.flush()
        log.info(
            "%s step %d: %s",
            self.name,
            step,
            " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items()),
        )

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for step, k, v in self._read():
            series[k].append((int(step), float(v)))
        if not series:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(series)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, (k, pts) in zip(axes.flat, sorted(series.items()), strict=False):
            pts_arr = np.array(sorted(pts))
            ax.plot(pts_arr[:, 0], pts_arr[:, 1])
            ax.set_title(k)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(self.name)
        io.save_figure(fig, self.png_path)
