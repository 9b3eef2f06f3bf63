"""GPU check of our Triton kernels (`shark_torchrec.triton_kernels`), needing only torch and
triton (no fbgemm_gpu, no torchrec, no C++ build).

On the same ids (default: 65,536 bags of 32 ids, Zipf-distributed over a table of 8 M rows x
128), it times, interleaved and repeated:
- the lookup: our Triton `mixed_lookup` over a fixed tier mix against torch's
  `embedding_bag` (sum) on the table in fp32 and in fp16;
- a training step of the embeddings: forward, backward and a row-wise Adagrad step, the same
  steps for both but the rows' reads and writes. Both: the lookup, each id's gradient (its
  bag's: `embedding_bag`'s backward, written out) summed per distinct row (`torch.unique`,
  `index_add_`), the Adagrad state of those rows. Then torch reads, steps and writes the rows
  of the fp32 or fp16 table (fp16 steps in fp32); ours is the Triton `update_rows_`, writing the
  rows back in their tiers with stochastic rounding.

The tier mix (`--mix`, shares of rows from the hottest down): 5% fp32, 15% fp16, 30% int8, 30%
int4, 15% int2, 5% dropped. A row's tier follows its popularity rank, as Eq. 7's priorities
would put it.

Before timing, it checks the kernels against their plain-torch references
(`shark_torchrec.triton_kernels.reference`), bit for bit: small random tables for every
pooling, weighted and unweighted bags, and several dims, then the whole lookup (in every timed
configuration) and one whole update at the benchmark's size. Any difference exits with
status 1. It prints the medians and the spread of the per-repeat ratios, and writes them as
JSON with `--out`.

On CPU it runs through Triton's interpreter (`TRITON_INTERPRET=1`, set by `--device cpu`) at a
tiny size; the tests run it so.

    python bench/gpu_kernels.py                       # on a CUDA machine, under 5 minutes
    python bench/gpu_kernels.py --device cpu --rows 4000 --dim 16 --bags 32 --ids-per-bag 4 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402

from shark_torchrec.precision.priority import GROUP_NAMES, INT_BITS  # noqa: E402
from shark_torchrec.precision.quantize import pack_codes, quantize_rows, rounding_noise_starts  # noqa: E402
from shark_torchrec.triton_kernels import mixed_lookup, update_rows_  # noqa: E402
from shark_torchrec.triton_kernels.layout import row_bytes  # noqa: E402
from shark_torchrec.triton_kernels.reference import mixed_lookup_torch, update_rows_torch  # noqa: E402

TIERS = GROUP_NAMES  # fp32, fp16, int8, int4, int2, dropped


class Tables:
    """One table's rows in group tables: row r's tier by its popularity rank (`mix`: shares of
    rows from the hottest down), values random (as trained rows: N(0, 0.1)), one fallback row."""

    def __init__(
        self,
        rows: int,
        dim: int,
        mix: List[float],
        alignment: int,
        gen: torch.Generator,
        device: str,
        values_gen: torch.Generator,
    ):
        self.rows, self.dim, self.alignment = rows, dim, alignment
        self.rank_of_row = torch.randperm(rows, generator=gen)
        counts = [int(x * rows) for x in mix]
        counts[2] += rows - sum(counts)
        self.counts = counts
        tier = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))[self.rank_of_row]
        cap = counts[:5]
        cap[0] += 1  # the fallback row sits after the fp32 rows
        rb = row_bytes(dim, alignment)
        offsets, at = [], 0
        for k in range(5):
            offsets.append(at)
            at += (cap[k] * rb[k] + 15) // 16 * 16
        w = torch.zeros(at, dtype=torch.uint8, device=device)
        for k in range(5):
            tab = w[offsets[k] : offsets[k] + cap[k] * rb[k]].view(cap[k], rb[k])
            values = torch.randn(cap[k], dim, generator=values_gen, device=device) * 0.1
            if k == 0:
                tab[:, : 4 * dim].copy_(values.view(torch.uint8).view(cap[k], 4 * dim))
            elif k == 1:
                tab[:, : 2 * dim].copy_(values.half().view(torch.uint8).view(cap[k], 2 * dim))
            else:
                codes, sb = quantize_rows(values, INT_BITS[k])
                tab[:, :4].copy_(sb.contiguous().view(torch.uint8))
                tab[:, 4 : 4 + dim * INT_BITS[k] // 8].copy_(pack_codes(codes, INT_BITS[k]))
        starts = [0]
        for k in range(5):
            starts.append(starts[-1] + cap[k])
        row_map = torch.empty(rows, dtype=torch.int32)
        for k in range(5):
            mine = (tier == k).nonzero().flatten()
            row_map[mine] = (starts[k] + torch.arange(len(mine))).to(torch.int32)
        row_map[tier == 5] = starts[5]  # dropped: the one fallback row, slot counts[0]
        self.weights = w
        self.group_offsets = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.row_map = row_map.to(device)
        self.range_ends = torch.tensor(starts[1:], dtype=torch.int32, device=device)
        self.range_shift = torch.tensor(starts[:5] + [starts[5] - counts[0]], dtype=torch.int32, device=device)

    def layout(self) -> Tuple[torch.Tensor, ...]:
        return self.weights, self.group_offsets, self.row_map, self.range_ends, self.range_shift

    def zipf_ids(self, n: int, s: float, gen: torch.Generator) -> torch.Tensor:
        """n row ids whose popularity ranks follow Zipf(s) (inverse CDF of the continuous law)."""
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        N = float(self.rows)
        rank = ((N ** (1 - s) - 1) * u + 1) ** (1 / (1 - s)) - 1
        rank = rank.long().clamp_(0, self.rows - 1)
        row_of_rank = torch.argsort(self.rank_of_row)
        return row_of_rank[rank]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit."""
    if a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    return bool(torch.equal(a, b))


def check_small(device: str, gen: torch.Generator, values_gen: torch.Generator, dims: List[int]) -> List[str]:
    """Kernels against references on small random tables: every pooling, weighted or not, the
    given dims (alignment 1 for the first, 16 for the others), random tier mixes. Returns the
    failures."""
    failures = []
    for dim, alignment in zip(dims, [1] + [16] * len(dims)):
        mix = torch.rand(6, generator=gen) + 0.2
        t = Tables(300, dim, (mix / mix.sum()).tolist(), alignment, gen, device, values_gen)
        B = 7
        lengths = torch.randint(0, 6, (2 * B,), generator=gen)
        lengths[1] = 0
        ids = t.zipf_ids(int(lengths.sum()), 1.05, gen).to(device)
        base = torch.tensor([0, 0], device=device)
        rows = torch.tensor([t.rows, t.rows], device=device)
        for pooling in ("sum", "mean", "none"):
            for weighted in (False, True):
                psw = torch.rand(ids.numel(), generator=gen).to(device) if weighted else None
                args = (*t.layout(), base, rows, ids, lengths.to(device), psw, dim, B, pooling, alignment, ["a", "b"])
                want = mixed_lookup_torch(*args)
                if not same(mixed_lookup(*args), want):
                    failures.append(f"lookup dim {dim} alignment {alignment} {pooling} weighted={weighted}")
        keys = torch.randperm(t.rows, generator=gen)[:200].to(device)
        grad = torch.randn(200, dim, generator=gen).to(device)
        grad[:20] *= 1e4
        grad[20:40] *= 1e-7
        scale = torch.rand(200, generator=gen).to(device)
        start, table = rounding_noise_starts(3, 5, 0, keys, torch.zeros_like(keys))
        a, b = t.weights.clone(), t.weights.clone()
        rest = (
            t.group_offsets,
            t.row_map,
            t.range_ends,
            t.range_shift,
            keys,
            grad,
            scale,
            table.to(device),
            start.to(device),
            dim,
            alignment,
        )
        update_rows_(a, *rest)
        update_rows_torch(b, *rest)
        if not same(a, b):
            failures.append(f"update dim {dim} alignment {alignment}: {int((a != b).sum())} bytes differ")
    return failures


def config_name(config: Tuple[int, int]) -> str:
    """A lookup configuration's label: ids a block, warps."""
    return f"{config[0]} ids a block, {config[1]} warps"


def timer(device: str) -> Callable[[Callable[[], object], int], float]:
    def run(fn: Callable[[], object], inner: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / inner

    return run


def profile_kernels(device: str, config: Tuple[int, int], lookup: Callable, step: Callable, calls: int) -> Dict:
    """Each kernel's mean time per call (torch.profiler) in `calls` lookups and steps of
    `config`; printed, and returned as {"lookup"|"step": {kernel: ms a call}}."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    out: Dict[str, Dict[str, float]] = {}
    for kind, fn in (("lookup", lookup), ("step", step)):
        with profile(activities=[activity]) as prof:
            for _ in range(calls):
                fn(config)
            if device == "cuda":
                torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            us = e.device_time_total if device == "cuda" else e.self_cpu_time_total
            if us > 0 and (device != "cuda" or e.device_type.name == "CUDA"):
                rows.append((us / calls / 1e3, e.key))
        rows.sort(reverse=True)
        out[kind] = {k: ms for ms, k in rows[:12]}
        print(f"\nkernels of one {kind}, {config_name(config)} (ms a call, mean of {calls}; top 12):")
        for ms, k in rows[:12]:
            print(f"  {ms:8.4f}  {k[:90]}")
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bags", type=int, default=65_536)
    ap.add_argument("--ids-per-bag", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument(
        "--mix", default="0.05,0.15,0.30,0.30,0.15,0.05", help="shares of fp32,fp16,int8,int4,int2,dropped rows"
    )
    ap.add_argument("--block-ids", default="2", help="how deep the pooling loop is unrolled; a list times each")
    ap.add_argument("--warps", default="1", help="warps a lookup program runs on; a list times each")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-dims", default="16,24,128", help="dims of the small random tables checked first")
    ap.add_argument("--checks-only", action="store_true", help="the checks against the references, no timing")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print each kernel's time (torch.profiler) in the lookup and step of the first configuration",
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the interpreter)")
    dev, D = a.device, a.dim
    alignment = 16 if dev == "cuda" else 1
    gen = torch.Generator().manual_seed(a.seed)
    mix = [float(x) for x in a.mix.split(",")]
    if len(mix) != 6 or abs(sum(mix) - 1) > 1e-6:
        raise SystemExit(f"--mix: six shares adding up to 1 ({', '.join(TIERS)}), got {a.mix}")
    configs = [(int(b), int(w)) for b in a.block_ids.split(",") for w in a.warps.split(",")]
    values_gen = torch.Generator(device=dev).manual_seed(a.seed)

    print(
        f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (Triton interpreter)'}, "
        f"torch {torch.__version__}"
    )
    failures = check_small(dev, gen, values_gen, [int(d) for d in a.small_dims.split(",")])

    t0 = time.perf_counter()
    tables = Tables(a.rows, D, mix, alignment, gen, dev, values_gen)
    n = a.bags * a.ids_per_bag
    ids = tables.zipf_ids(n, a.zipf, gen).to(dev)
    offsets = torch.arange(0, n, a.ids_per_bag, device=dev)
    lengths = torch.full((a.bags,), a.ids_per_bag, device=dev)
    table32 = torch.randn(a.rows, D, generator=values_gen, device=dev) * 0.1
    table16 = table32.half()
    mom32 = torch.zeros(a.rows, device=dev)
    mom16 = torch.zeros(a.rows, device=dev)
    mom = torch.zeros(a.rows, device=dev)
    grad_out = torch.randn(a.bags, D, generator=values_gen, device=dev) * 0.01
    base = torch.zeros(1, dtype=torch.int64, device=dev)
    frows = torch.tensor([a.rows], device=dev)
    noise_table = rounding_noise_starts(0, 0, 0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))[
        1
    ].to(dev)
    bag_of_id = torch.arange(a.bags, device=dev).repeat_interleave(a.ids_per_bag)
    lr, eps = 0.01, 1e-8
    print(
        f"tables built in {time.perf_counter() - t0:.1f} s: {a.rows:,} rows x {D}, "
        f"tiers {dict(zip(TIERS, tables.counts))}, {n:,} ids over {int(ids.unique().numel()):,} distinct rows"
    )

    def ours_lookup(config: Tuple[int, int]) -> torch.Tensor:
        return mixed_lookup(
            *tables.layout(),
            base,
            frows,
            ids,
            lengths,
            None,
            D,
            a.bags,
            "sum",
            alignment,
            ["t"],
            ids_per_block=config[0],
            num_warps=config[1],
        )

    # Checks at full size.
    want = mixed_lookup_torch(*tables.layout(), base, frows, ids, lengths, None, D, a.bags, "sum", alignment, ["t"])
    for c in configs:
        got = ours_lookup(c)
        if not same(got, want):
            failures.append(f"lookup at full size, {config_name(c)}: {int((got != want).sum())} values differ")
    del want, got
    keys, inverse = torch.unique(ids, return_inverse=True)
    row_grad = torch.zeros(len(keys), D, device=dev).index_add_(0, inverse, grad_out[bag_of_id])
    scale = lr / ((row_grad * row_grad).mean(1).sqrt() + eps)
    start = rounding_noise_starts(0, 1, 0, keys, torch.zeros_like(keys))[0]
    before = tables.weights.clone()
    update_rows_(tables.weights, *tables.layout()[1:], keys, row_grad, scale, noise_table, start, D, alignment)
    update_rows_torch(before, *tables.layout()[1:], keys, row_grad, scale, noise_table, start, D, alignment)
    if not same(tables.weights, before):
        failures.append(f"update at full size: {int((tables.weights != before).sum())} bytes differ")
    del before
    for f in failures:
        print("DIFFERS:", f)
    print("checks against the torch references:", "FAILED" if failures else "all equal, bit for bit")
    if a.checks_only:
        return 1 if failures else 0

    def torch_step(table: torch.Tensor, momentum: torch.Tensor) -> None:
        nnf.embedding_bag(ids, table, offsets, mode="sum")  # the forward (its output unused, as ours)
        k, inv = torch.unique(ids, return_inverse=True)
        rg = torch.zeros(len(k), D, device=dev).index_add_(0, inv, grad_out[bag_of_id])
        m = momentum[k] + (rg * rg).mean(1)
        momentum[k] = m
        table[k] = (table[k].float() - rg * (lr / (m.sqrt() + eps))[:, None]).to(table.dtype)

    step_counter = [1]

    def our_step(config: Tuple[int, int]) -> None:
        ours_lookup(config)
        k, inv = torch.unique(ids, return_inverse=True)
        rg = torch.zeros(len(k), D, device=dev).index_add_(0, inv, grad_out[bag_of_id])
        m = mom[k] + (rg * rg).mean(1)
        mom[k] = m
        st = rounding_noise_starts(0, step_counter[0], 0, k, torch.zeros_like(k))[0]
        step_counter[0] += 1
        update_rows_(tables.weights, *tables.layout()[1:], k, rg, lr / (m.sqrt() + eps), noise_table, st, D, alignment)

    lookups: Dict[str, Callable[[], object]] = {
        "torch embedding_bag fp32": lambda: nnf.embedding_bag(ids, table32, offsets, mode="sum"),
        "torch embedding_bag fp16": lambda: nnf.embedding_bag(ids, table16, offsets, mode="sum"),
    }
    steps: Dict[str, Callable[[], object]] = {
        "torch fp32 rows + rowwise Adagrad": lambda: torch_step(table32, mom32),
        "torch fp16 rows + rowwise Adagrad": lambda: torch_step(table16, mom16),
    }
    for c in configs:
        lookups[f"ours, {config_name(c)}"] = lambda c=c: ours_lookup(c)
        steps[f"ours, {config_name(c)}"] = lambda c=c: our_step(c)
    run = timer(dev)
    times: Dict[str, Dict[str, List[float]]] = {"lookup": {k: [] for k in lookups}, "step": {k: [] for k in steps}}
    for fns, kind in ((lookups, "lookup"), (steps, "step")):
        for fn in fns.values():
            fn()  # compile and warm up
    for _ in range(a.repeats):  # interleaved: every method once per repeat
        for kind, fns in (("lookup", lookups), ("step", steps)):
            for name, fn in fns.items():
                times[kind][name].append(run(fn, a.inner))

    result = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "failures": failures,
        "tiers": dict(zip(TIERS, tables.counts)),
        "bytes": {"ours": int(tables.weights.numel() + 4 * a.rows), "fp32": 4 * a.rows * D, "fp16": 2 * a.rows * D},
        "ms": {},
        "ratios": {},
    }
    print(
        f"\nembedding bytes: ours {result['bytes']['ours'] / result['bytes']['fp32']:.3f} of fp32 "
        f"(rows + 4-byte row map), fp16 0.500"
    )
    for kind in ("lookup", "step"):
        print(
            f"\n{kind} ({a.repeats} repeats of {a.inner} calls; median ms, ratio to torch fp32 and fp16: "
            "median [min, max] of per-repeat ratios)"
        )
        t = times[kind]
        names = list(t)
        result["ms"][kind] = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        for name in names:
            line = f"  {name:45s} {statistics.median(t[name]) * 1e3:8.3f} ms"
            if name.startswith("ours"):
                for ref, label in zip(names[:2], ("fp32", "fp16")):
                    r = [x / y for x, y in zip(t[name], t[ref])]
                    result["ratios"][f"{kind}: {name} / {ref}"] = {
                        "median": statistics.median(r),
                        "min": min(r),
                        "max": max(r),
                    }
                    line += f"   {statistics.median(r):5.2f}x [{min(r):.2f}, {max(r):.2f}] of {label}"
            print(line)
    if a.profile:
        result["profile"] = profile_kernels(dev, configs[0], ours_lookup, our_step, a.inner)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
