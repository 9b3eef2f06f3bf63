"""Why rows trained in place at int2 lose AUC where int4 does not: a toy measurement.

    .venv/bin/python bench/low_bit_training_noise.py --seeds 5

Rows of 64 values are trained by SGD towards fixed targets with noisy gradients (the gradient
of 0.5 |x - target|^2 plus N(0, sigma^2) noise), 400 steps, in four ways:
- fp32: the reference;
- post-training: the fp32 result quantized once to nearest (what TorchRec's
  `quantize_embeddings` does to a trained model);
- in place: every step's new row requantized with stochastic rounding, as our store trains
  int8/int4/int2 rows (our `quantize_rows`, row-wise min/max grid, fp16 scale and bias);
- in place, clipped grid: the same with the grid cut to mean +- 1.5 std of the row (a
  tighter step; values outside are clamped).

Printed: the mean squared distance to the target, as a multiple of fp32's, per bit width (mean
and spread over seeds), and the same for post-training quantization. Stochastic rounding is
unbiased, but each rounding adds variance of about |update| x step, so a row updated many times
random-walks by about sqrt(steps x |update| x step): with int2's step (a third of the row's
range) that noise is larger than what the row learns. Written to
`bench/results/low_bit_noise/` (results.json, noise.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from common import pyplot  # noqa: E402
from shark_torchrec.precision.quantize import dequantize_rows, quantize_rows

ROOT = Path(__file__).resolve().parents[1]


def clipped(values: torch.Tensor, bits: int, noise: torch.Tensor | None, k: float = 1.5) -> torch.Tensor:
    top = (1 << bits) - 1
    mu, sd = values.mean(1, keepdim=True), values.std(1, keepdim=True)
    lo = torch.maximum(values.min(1, keepdim=True).values, mu - k * sd)
    hi = torch.minimum(values.max(1, keepdim=True).values, mu + k * sd)
    step = ((hi - lo) / top).clamp_min(1e-12)
    x = (values - lo) / step
    x = torch.floor(x + noise) if noise is not None else torch.round(x)
    return x.clamp(0, top) * step + lo


def train(seed: int, bits: int, how: str, rows: int, dim: int, steps: int, lr: float, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(rows, dim, generator=g) * 0.05
    x = torch.randn(rows, dim, generator=g) * 0.01
    for _ in range(steps):
        grad = (x - target) + torch.randn(rows, dim, generator=g) * sigma
        new = x - lr * grad
        noise = torch.rand(rows, dim, generator=g)
        if how == "fp32":
            x = new
        elif how == "in place":
            x = dequantize_rows(*quantize_rows(new, bits, noise))
        else:
            x = clipped(new, bits, noise)
    return ((x - target) ** 2).mean(), x, target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "low_bit_noise"))
    a = p.parse_args()
    ratios: dict = {}
    for seed in tqdm(range(a.seeds), desc="seeds", file=sys.stderr):
        ref, x32, target = train(seed, 0, "fp32", a.rows, a.dim, a.steps, a.lr, a.sigma)
        for bits in (8, 4, 2):
            post = ((dequantize_rows(*quantize_rows(x32, bits)) - target) ** 2).mean()
            ratios.setdefault(("post-training", bits), []).append(float(post / ref))
            for how in ("in place", "in place, clipped grid"):
                mse, _, _ = train(seed, bits, how, a.rows, a.dim, a.steps, a.lr, a.sigma)
                ratios.setdefault((how, bits), []).append(float(mse / ref))
    print(
        f"MSE to the target / fp32's, {a.seeds} seeds "
        f"({a.rows} rows x {a.dim}, {a.steps} SGD steps, lr {a.lr}, gradient noise {a.sigma})"
    )
    print(f"{'method':<24} {'int8':>16} {'int4':>16} {'int2':>16}")
    rows = []
    for how in ("post-training", "in place", "in place, clipped grid"):
        cells = []
        for bits in (8, 4, 2):
            r = ratios[(how, bits)]
            cells.append(f"{statistics.mean(r):7.2f} +- {statistics.stdev(r) if len(r) > 1 else 0:5.2f}")
            rows.append({"method": how, "bits": bits, "ratio_mean": statistics.mean(r), "ratios": r})
        print(f"{how:<24} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, how in enumerate(("post-training", "in place", "in place, clipped grid")):
        ys = [statistics.mean(ratios[(how, b)]) for b in (8, 4, 2)]
        ax.plot([8, 4, 2], ys, marker="o", label=how, color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xticks([8, 4, 2])
    ax.invert_xaxis()
    ax.set_xlabel("bits per value")
    ax.set_ylabel("MSE to target / fp32's (log)")
    ax.set_title("rows trained in place with stochastic rounding vs quantized once", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "noise.png", dpi=120)


if __name__ == "__main__":
    main()
