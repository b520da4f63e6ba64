"""The PyTorch reference's distillation inner loop, for side-by-side runs against ours.

Not part of tldr-jax and never imported by it: this file needs only `torch` and `numpy`, and
runs in an interpreter of its own (torch is not a dependency of the project):

    python3.11 -m venv /tmp/torch-ref && /tmp/torch-ref/bin/pip install torch numpy
    python benchmarks/distill_memory.py --preset nf_resnet26_64 --modes remat --steps 5 \
        --reference-python /tmp/torch-ref/bin/python

What it runs is the reference's algorithm (SPEC B.3): the student's parameters as one flat
tensor per modality (the reference's ReparamModule), `syn_steps` SGD steps each taking
`torch.autograd.grad(..., create_graph=True)` and appending the new parameters to a list kept
for the whole unroll, the normalised parameter-distance loss, one `backward()` to the
synthetic images, texts and step sizes, and the outer SGD with momentum. The model is ours,
written again in PyTorch op for op (NF-ResNet with scaled weight standardisation and XLA's
"SAME" padding; the 768 -> 1000 projection head), so both sides do the same work: `--check`
loads our weights, data and results (written by distill_memory.py) and reports the relative
difference of the inner loss, the inner gradient and the meta-gradient.

One point per process (peak RSS is the process's; with `--device cuda`, `peak_mib` is the
GPU's peak allocation over all iterations): prints one JSON line,
{"peak_mib", "s_per_iter", "first_iter_s", ...} or, with --check, the relative errors.
`--tf32` runs CUDA matmuls and convolutions in TensorFloat-32 (off: true float32).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the layout helpers (image_specs, text_specs) need no torch: tests use them
    torch = F = None

RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def _vm_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------- model


def image_specs(depths, widths, stem, head_dim, alpha):
    """[(name, shape)] of the image encoder's parameters (torch layouts: OIHW kernels, (in,
    out) linear kernels) and the block layout [(prefix, in, out, stride, beta, shortcut)].
    Names are our NNX state paths joined by "/"."""
    specs = [("stem/kernel", (stem, 3, 7, 7)), ("stem/gain", (stem,)), ("stem/bias", (stem,))]
    blocks, expected_var, cin, b = [], 1.0, stem, 0
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        for i in range(depth):
            stride = 2 if (i == 0 and stage > 0) else 1
            mid = max(1, int(round(width * 0.25)))
            prefix = f"blocks/{b}"
            shortcut = stride != 1 or cin != width
            convs = [("conv1", cin, mid, 1), ("conv2", mid, mid, 3), ("conv3", mid, width, 1)]
            if shortcut:
                convs.append(("shortcut", cin, width, 1))
            for name, ci, co, k in convs:
                specs += [(f"{prefix}/{name}/kernel", (co, ci, k, k))]
                specs += [(f"{prefix}/{name}/gain", (co,)), (f"{prefix}/{name}/bias", (co,))]
            specs.append((f"{prefix}/skip_gain", ()))
            blocks.append((prefix, stride, math.sqrt(expected_var), shortcut))
            if i == 0:
                expected_var = 1.0
            expected_var += alpha**2
            cin, b = width, b + 1
    if head_dim:
        specs += [("head/kernel", (widths[-1], head_dim)), ("head/bias", (head_dim,))]
    return specs, blocks


def text_specs(in_dim, out_dim):
    return [
        ("projection/kernel", (in_dim, out_dim)),
        ("projection/bias", (out_dim,)),
        ("fc/kernel", (out_dim, out_dim)),
        ("fc/bias", (out_dim,)),
        ("norm/scale", (out_dim,)),
        ("norm/bias", (out_dim,)),
    ]


def unflatten(flat: torch.Tensor, specs) -> dict[str, torch.Tensor]:
    """Views of one flat parameter tensor (the reference's ReparamModule)."""
    sizes = [math.prod(shape) for _, shape in specs]
    parts = torch.split(flat, sizes)
    return {name: p.view(shape) for (name, shape), p in zip(specs, parts, strict=True)}


def init_flat(specs, generator: torch.Generator) -> torch.Tensor:
    """Our init: N(0, 1) kernels (standardised anyway), unit gains and LayerNorm scales, zero
    biases and skip gains (SkipInit), LeCun-normal linear kernels."""
    parts = []
    for name, shape in specs:
        leaf = name.rsplit("/", 1)[1]
        if leaf == "kernel" and len(shape) == 4:
            parts.append(torch.randn(shape, generator=generator))
        elif leaf == "kernel":
            parts.append(torch.randn(shape, generator=generator) / math.sqrt(shape[0]))
        elif leaf in ("gain", "scale"):
            parts.append(torch.ones(shape))
        else:
            parts.append(torch.zeros(shape))
    return torch.cat([p.reshape(-1) for p in parts])


def _same_pad(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, k: int, stride: int, value: float = 0.0) -> torch.Tensor:
    ph, pw = _same_pad(x.shape[2], k, stride), _same_pad(x.shape[3], k, stride)
    if not any(ph + pw):
        return x
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=value)


def ws_conv(p: dict, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w, gain, bias = p[f"{name}/kernel"], p[f"{name}/gain"], p[f"{name}/bias"]
    fan_in = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    w = (w - mean) * (torch.rsqrt(torch.clamp(var * fan_in, min=1e-4)) * gain.view(-1, 1, 1, 1))
    k = w.shape[-1]
    return F.conv2d(_pad_same(x, k, stride), w, bias, stride)


def scaled_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) * RELU_GAMMA


def image_forward(p: dict, x: torch.Tensor, blocks, alpha: float, head: bool) -> torch.Tensor:
    x = ws_conv(p, "stem", x, 2)
    x = F.max_pool2d(_pad_same(x, 3, 2, -math.inf), 3, 2)
    for prefix, stride, beta, has_shortcut in blocks:
        out = scaled_relu(x / beta)
        shortcut = ws_conv(p, f"{prefix}/shortcut", out, stride) if has_shortcut else x
        out = ws_conv(p, f"{prefix}/conv1", out)
        out = ws_conv(p, f"{prefix}/conv2", scaled_relu(out), stride)
        out = ws_conv(p, f"{prefix}/conv3", scaled_relu(out))
        x = shortcut + out * (alpha * p[f"{prefix}/skip_gain"])
    x = scaled_relu(x).mean(dim=(2, 3))
    return x @ p["head/kernel"] + p["head/bias"] if head else x


def text_forward(p: dict, t: torch.Tensor) -> torch.Tensor:
    projected = t @ p["projection/kernel"] + p["projection/bias"]
    h = F.gelu(projected) @ p["fc/kernel"] + p["fc/bias"]
    return F.layer_norm(h + projected, h.shape[-1:], p["norm/scale"], p["norm/bias"], 1e-5)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ------------------------------------------------------------------------- inner / outer


class Reference:
    def __init__(self, args: argparse.Namespace):
        self.img_specs, self.blocks = image_specs(
            args.depths, args.widths, args.stem, args.head_dim, args.alpha
        )
        self.txt_specs = text_specs(args.txt_dim, args.head_dim or args.widths[-1])
        self.alpha, self.head = args.alpha, bool(args.head_dim)
        self.scale = args.logit_scale

    def inner_loss(self, th_img, th_txt, x, t) -> torch.Tensor:
        img = image_forward(
            unflatten(th_img, self.img_specs), x, self.blocks, self.alpha, self.head
        )
        txt = text_forward(unflatten(th_txt, self.txt_specs), t)
        return clip_loss(img, txt, self.scale)

    def meta_loss(self, images, texts, lr_img, lr_txt, start, target, idx) -> torch.Tensor:
        """The reference's unroll: every step's parameters stay in a list, graph kept."""
        students = [(start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True))]
        for rows in idx:
            th_img, th_txt = students[-1]
            loss = self.inner_loss(th_img, th_txt, images[rows], texts[rows])
            g_img, g_txt = torch.autograd.grad(loss, [th_img, th_txt], create_graph=True)
            students.append((th_img - lr_img * g_img, th_txt - lr_txt * g_txt))
        terms = [
            ((end - tg) ** 2).sum() / ((s - tg) ** 2).sum()
            for end, s, tg in zip(students[-1], start, target, strict=True)
        ]
        return (terms[0] + terms[1]) / 2


def _permutation_batches(n: int, steps: int, batch: int, gen: torch.Generator) -> list:
    perms = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps * batch // n))])
    return [perms[i * batch : (i + 1) * batch] for i in range(steps)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timing(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)  # drawn on the CPU, the same values on any device
    ref = Reference(args)
    start = tuple(p.to(dev) for p in (init_flat(ref.img_specs, gen), init_flat(ref.txt_specs, gen)))
    target = tuple(s + 1e-3 * torch.randn(s.shape, generator=gen).to(dev) for s in start)
    images = torch.randn(args.pairs, 3, args.size, args.size, generator=gen)
    images = images.to(dev).requires_grad_(True)
    texts = torch.randn(args.pairs, args.txt_dim, generator=gen).to(dev).requires_grad_(True)
    lr_img = torch.tensor(0.1, device=dev, requires_grad=True)
    lr_txt = torch.tensor(0.1, device=dev, requires_grad=True)
    opt = torch.optim.SGD(
        [
            {"params": [images, texts], "lr": 1000.0},
            {"params": [lr_img, lr_txt], "lr": 1e-2},
        ],
        lr=1000.0,
        momentum=0.5,
    )

    def iteration() -> float:
        idx = _permutation_batches(args.pairs, args.syn_steps, args.pairs, gen)
        idx = [rows.to(dev) for rows in idx]
        opt.zero_grad()
        loss = ref.meta_loss(images, texts, lr_img, lr_txt, start, target, idx)
        loss.backward()
        opt.step()
        return loss.item()  # waits for the device

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    iteration()
    _sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        iteration()
    _sync(dev)
    sec = (time.perf_counter() - t0) / args.iters if args.iters else None
    host_peak = round(_vm_kib("VmHWM") / 1024, 1)
    out = {
        # On a GPU the device's peak (all iterations, warm-up included), else the process's RSS.
        "peak_mib": host_peak,
        "s_per_iter": round(sec, 3) if sec else None,
        "first_iter_s": round(first, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev),
        "params_img": int(start[0].numel()),
        "params_txt": int(start[1].numel()),
    }
    if dev.type == "cuda":
        out |= {
            "peak_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
            "peak_kind": "device",
            "host_peak_mib": host_peak,
            "device_name": torch.cuda.get_device_name(dev),
            "tf32": bool(args.tf32),
        }
    return out


def _to_torch_layout(name: str, a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.permute(3, 2, 0, 1).contiguous() if t.ndim == 4 else t  # HWIO -> OIHW


def _flat_from(npz, prefix: str, specs) -> torch.Tensor:
    return torch.cat([_to_torch_layout(n, npz[f"{prefix}:{n}"]).reshape(-1) for n, _ in specs])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_check(args: argparse.Namespace) -> dict:
    """Relative differences to the values our JAX side wrote (same weights and data)."""
    npz = np.load(args.check)
    ref = Reference(args)
    dev = torch.device(args.device)
    start = (
        _flat_from(npz, "start_img", ref.img_specs).to(dev),
        _flat_from(npz, "start_txt", ref.txt_specs).to(dev),
    )
    target = (
        _flat_from(npz, "target_img", ref.img_specs).to(dev),
        _flat_from(npz, "target_txt", ref.txt_specs).to(dev),
    )
    images = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2).contiguous()
    images = images.to(dev).requires_grad_(True)
    texts = torch.from_numpy(npz["texts"]).to(dev).requires_grad_(True)
    idx = [torch.from_numpy(r.astype(np.int64)).to(dev) for r in npz["idx"]]
    lr_img = torch.tensor(float(npz["lr_img"]), device=dev, requires_grad=True)
    lr_txt = torch.tensor(float(npz["lr_txt"]), device=dev, requires_grad=True)

    th = [start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True)]
    loss = ref.inner_loss(th[0], th[1], images[idx[0]], texts[idx[0]])
    g_img, g_txt = (g.cpu() for g in torch.autograd.grad(loss, th))
    meta = ref.meta_loss(images, texts, lr_img, lr_txt, start, target, idx)
    meta.backward()
    loss, meta = loss.detach().cpu(), meta.detach().cpu()
    theirs = {
        "images": images.grad.permute(0, 2, 3, 1).cpu(),
        "texts": texts.grad.cpu(),
        "lr_img": lr_img.grad.cpu(),
        "lr_txt": lr_txt.grad.cpu(),
    }
    # Both float32 meta-gradients against the float64 one (same inputs, computed by JAX).
    ours = {n: torch.from_numpy(np.asarray(npz[f"meta_grad_{n}"])) for n in theirs}
    truth = {n: torch.from_numpy(npz[f"f64_meta_grad_{n}"]) for n in theirs}
    vs_float64 = {
        side: {n: _rel(grads[n].double(), t) for n, t in truth.items()}
        for side, grads in (("reference", theirs), ("ours", ours))
    }
    # The inner gradient too (our float64 one, in the torch layout: its float32 rounding,
    # ~6e-8, is far below what is measured).
    inner = {"img": (g_img, ref.img_specs), "txt": (g_txt, ref.txt_specs)}
    for side in ("reference", "ours"):
        for tower, (g, specs) in inner.items():
            got = g if side == "reference" else _flat_from(npz, f"grad_{tower}", specs)
            vs_float64[side][f"inner_grad_{tower}"] = _rel(
                got, _flat_from(npz, f"f64grad_{tower}", specs)
            )
    return {
        "inner_loss": _rel(loss, torch.tensor(float(npz["inner_loss"]))),
        "inner_grad_img": _rel(g_img, _flat_from(npz, "grad_img", ref.img_specs)),
        "inner_grad_txt": _rel(g_txt, _flat_from(npz, "grad_txt", ref.txt_specs)),
        "meta_loss": _rel(meta, torch.tensor(float(npz["meta_loss"]))),
        **{f"meta_grad_{n}": _rel(theirs[n], ours[n]) for n in theirs},
        "vs_float64": vs_float64,
        "device": str(dev),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    parser.add_argument("--depths", type=ints, default=(2, 2, 2, 2))
    parser.add_argument("--widths", type=ints, default=(256, 512, 1024, 2048))
    parser.add_argument("--stem", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--txt-dim", type=int, default=768)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=100, help="synthetic pairs = batch")
    parser.add_argument("--logit-scale", type=float, default=1 / 0.07)
    parser.add_argument("--syn-steps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--check", default="", help="npz written by distill_memory.py")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: TensorFloat-32 matmuls and cuDNN convolutions (off: true float32 in both; "
        "torch's own default is TF32 convolutions and float32 matmuls)",
    )
    args = parser.parse_args()
    if torch is None:
        parser.error(f"PyTorch is not installed for {sys.executable} (the reference needs it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Set both ways explicitly: the two sides must run at one stated precision.
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    out = run_check(args) if args.check else run_timing(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
