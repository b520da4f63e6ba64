"""How far TESLA's meta-gradient is from the exact one, on a workdir's own experts.

    python benchmarks/tesla_vs_exact.py --config configs/distill.py:small --workdir W \
        --steps 5,10,20 --draws 8 --json W/tesla_vs_exact.json

TESLA (`distill.grad_mode=tesla`) drops the cross-step terms of the meta-gradient (how a
change of the synthetic data at step i moves the student at steps > i through the parameters;
`matching.tesla_meta_loss_and_grad`). This measures what that costs where it matters: on the
buffer's trajectories (W must have run `tldr-jax buffer`), at the synthetic set the stage
starts from (`distill.init`) and, when W has run `tldr-jax distill`, at the distilled set.
For each set, syn_steps and (expert, start epoch, minibatch) draw it computes both gradients
(`remat`, exact, and `tesla`) and reports per field (images, texts, the two step sizes) the
cosine to the exact gradient and the relative error |g_tesla - g_exact| / |g_exact|, as mean
and min / max over the draws. Output JSON:
{"<set>": {"<syn_steps>": {"<field>": {"cosine": {mean, min, max}, "rel_err": {...}}}}}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tldr_jax.utils.argtypes import positive_int, positive_ints

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIELDS = ("images", "texts", "lr_img", "lr_txt")


def _compare(a, b) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    nb = np.linalg.norm(b)
    rel = float(np.linalg.norm(a - b) / max(nb, 1e-30))
    cos = float(a @ b / max(np.linalg.norm(a) * nb, 1e-30))
    return cos, rel


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def measure(config, workdir: str, steps: list[int], draws: int) -> dict:
    """{set: {syn_steps: {field: {"cosine": ..., "rel_err": ...}}}} (see the module doc)."""
    import jax
    import numpy as np

    from tldr_jax.distill import distill_stage, matching
    from tldr_jax.distill import expert_trajectories as et

    d, b = config.distill, config.buffer
    seed, m = int(config.seed), int(d.num_pairs)
    data = et.load_pairs(config, workdir)
    et.check_buffer(workdir, config, data)
    student = et.build_student(config, data.train_txt.shape[1])
    epochs, expert_epochs = int(b.epochs), int(d.expert_epochs)
    trajs = et.load_trajectories(
        Path(workdir), int(b.num_experts), epochs, student.num_params, data.num_pairs
    )
    max_start = distill_stage.start_epochs(config)
    sets = {}
    init = d.init if d.init != "kmeans" else "real"  # k-means prototypes are real pairs too
    images0, texts0, _ = distill_stage.initial_pairs(
        init, m, seed, data.train_images, data.train_txt
    )
    sets[f"init ({init})"] = matching.SyntheticSet.create(images0, texts0, float(d.step_size_init))
    npz = Path(workdir) / "distill" / "distilled.npz"
    if npz.exists():
        z = np.load(npz)
        sets["distilled"] = matching.SyntheticSet.create(z["images"], z["texts"], 1.0).replace(
            lr_img=jax.numpy.asarray(z["lr_img"]), lr_txt=jax.numpy.asarray(z["lr_txt"])
        )
    inner = distill_stage.inner_loop(config)  # the stage's own (quirks, micro-batches, ...)
    batch_syn = int(d.batch_syn) or m
    grad = jax.jit(
        matching.meta_loss_and_grad, static_argnums=(1,), static_argnames=("grad_mode", "inner")
    )
    out: dict = {}
    for name, syn in sets.items():
        out[name] = {}
        for n in steps:
            per: dict[str, dict[str, list[float]]] = {f: {"cos": [], "rel": []} for f in FIELDS}
            t0 = time.time()
            for k in range(draws):
                draw = np.random.default_rng([seed, 7919, n, k])
                e, s = int(draw.integers(len(trajs))), int(draw.integers(max_start))
                start = (trajs[e]["img"][s], trajs[e]["txt"][s])
                target = (trajs[e]["img"][s + expert_epochs], trajs[e]["txt"][s + expert_epochs])
                key = jax.random.key(int(draw.integers(2**31)))
                idx = matching.sample_minibatches(key, m, n, batch_syn)
                args = (syn, student, start, target, idx, key)
                _, g_exact = grad(*args, inner=inner, grad_mode="remat")
                _, g_tesla = grad(*args, inner=inner, grad_mode="tesla")
                for f in FIELDS:
                    cos, rel = _compare(getattr(g_tesla, f), getattr(g_exact, f))
                    per[f]["cos"].append(cos)
                    per[f]["rel"].append(rel)
            out[name][str(n)] = {
                f: {"cosine": _summary(v["cos"]), "rel_err": _summary(v["rel"])}
                for f, v in per.items()
            }
            print(f"{name}, {n} steps: {draws} draws in {time.time() - t0:.0f} s", flush=True)
    return out


def table(result: dict) -> str:
    lines = [
        "| set | syn_steps | field | cosine mean (min) | relative error mean (max) |",
        "|---|---|---|---|---|",
    ]
    for name, by_steps in result.items():
        for n, fields in by_steps.items():
            for f, v in fields.items():
                c, r = v["cosine"], v["rel_err"]
                lines.append(
                    f"| {name} | {n} | {f} | {c['mean']:.3f} ({c['min']:.3f}) | "
                    f"{r['mean']:.3f} ({r['max']:.3f}) |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/distill.py[:arg]")
    parser.add_argument("--workdir", required=True, help="a workdir that has run `buffer`")
    parser.add_argument(
        "--steps", type=positive_ints, default="5,10,20", help="syn_steps values, comma-separated"
    )
    parser.add_argument(
        "--draws", type=positive_int, default=8, help="(expert, start) draws per point"
    )
    parser.add_argument("--json", default="", help="write the result here")
    parser.add_argument(
        "--override", action="append", default=[], help="a.b=v config override (repeatable)"
    )
    args = parser.parse_args(argv)
    from tldr_jax import cli
    from tldr_jax.config_check import ConfigError

    try:
        config = cli.load_config(args.config, args.override)
    except (ConfigError, KeyError, AttributeError, ValueError) as e:
        parser.error(str(e))
    result = measure(config, args.workdir, args.steps, args.draws)
    print(table(result))
    if args.json:
        from tldr_jax.utils import io as io_lib

        io_lib.write_json(args.json, result)


if __name__ == "__main__":
    main()
