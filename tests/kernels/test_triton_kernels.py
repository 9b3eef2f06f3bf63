"""Our Triton kernels (`shark_torchrec.triton_kernels`), run on CPU through Triton's interpreter,
against their references bit for bit: the lookup against FBGEMM's INT-N op (the C++ op's
reference) and against the plain torch reference, the update against the C++ op and the plain
torch reference. Also: bad ids and keys named, dropped rows left alone, the package importing
neither fbgemm_gpu nor torchrec, and `bench/gpu_kernels.py` at a tiny size (its checks pass, and
fail when a kernel is broken)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from helpers.kernel_layouts import bags, random_layout, same_bits
from shark_torchrec.kernels import update_rows_ as update_rows_cpp
from shark_torchrec.kernels.reference import mixed_lookup_reference
from shark_torchrec.precision.quantize import rounding_noise_starts
from shark_torchrec.triton_kernels import mixed_lookup, update_rows_
from shark_torchrec.triton_kernels.reference import mixed_lookup_torch, update_rows_torch

# tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported: the kernels run on CPU.


def lookup_args(seed, dim, alignment, groups, pooling, weighted, max_len=4):
    gen = torch.Generator().manual_seed(seed)
    w, offsets, row_map, ends, shift = random_layout(gen, [37, 5, 120], dim, groups, alignment=alignment)
    base, rows = torch.tensor([0, 37, 42, 0]), torch.tensor([37, 5, 120, 37])  # a fourth feature shares table 0
    B = 9
    lengths = torch.randint(0, max_len + 1, (4 * B,), generator=gen)
    lengths[0], lengths[1] = max_len, 0  # bag 0 repeats an id (below), bag 1 is empty
    values, lengths = bags(gen, [37, 5, 120, 37], B, max_len=max_len, lengths=lengths)
    values[1] = values[0]
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    return (
        w,
        offsets,
        row_map,
        ends,
        shift,
        base,
        rows,
        values,
        lengths,
        psw,
        dim,
        B,
        pooling,
        alignment,
        list("abcd"),
    )


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("dim,alignment,groups", [(16, 1, 5), (8, 16, 5), (24, 1, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_lookup_equals_both_references_bit_for_bit(pooling, dim, alignment, groups, weighted):
    args = lookup_args(dim + alignment + groups, dim, alignment, groups, pooling, weighted)
    want = mixed_lookup_reference(*args)
    assert same_bits(mixed_lookup(*args), want)
    assert same_bits(mixed_lookup_torch(*args), want)
    # Every group and dropped rows were read.
    w, offsets, row_map, ends, shift, base, rows, values, lengths = args[:9]
    keys = torch.repeat_interleave(base, lengths.view(4, -1).sum(1)) + values
    assert set(torch.bucketize(row_map[keys], ends, right=True).tolist()) >= set(range(groups)) | {5}


@pytest.mark.parametrize("ids_per_block", [1, 2, 8])
def test_bags_longer_than_a_block_sum_in_id_order(ids_per_block):
    args = lookup_args(5, 16, 1, 5, "sum", True, max_len=13)
    want = mixed_lookup_reference(*args)
    assert same_bits(mixed_lookup(*args, ids_per_block=ids_per_block), want)


@pytest.mark.parametrize("bad", [-1, 5])
def test_an_id_outside_its_table_names_the_feature_and_id(bad):
    gen = torch.Generator().manual_seed(4)
    w, offsets, row_map, ends, shift = random_layout(gen, [7, 5], 8)
    args = (
        w,
        offsets,
        row_map,
        ends,
        shift,
        torch.tensor([0, 7]),
        torch.tensor([7, 5]),
        torch.tensor([1, 2, 3, bad, 4]),
        torch.tensor([2, 1, 1, 1]),
        None,
        8,
        2,
        "sum",
        1,
        ["user", "item"],
    )
    for fn in (mixed_lookup, mixed_lookup_torch):
        with pytest.raises(ValueError, match=f"feature item: id {bad} outside its table of 5 rows"):
            fn(*args)


def update_case(seed, dim, alignment, n=70):
    gen = torch.Generator().manual_seed(seed)
    w, offsets, row_map, ends, shift = random_layout(gen, [60, 40], dim, alignment=alignment)
    keys = torch.randperm(100, generator=gen)[:n]
    grad = torch.randn(n, dim, generator=gen)
    grad[0] = 0  # an unchanged row: new scale = old scale exactly
    grad[1:10] *= 1e-7  # below the rows' resolution
    grad[10:15] *= 1e5  # past the fp16 range
    scale = torch.rand(n, generator=gen)
    start, table = rounding_noise_starts(7, 3, 0, keys, torch.zeros(n, dtype=torch.long))
    return w, (offsets, row_map, ends, shift, keys, grad, scale, table, start, dim, alignment)


@pytest.mark.parametrize("dim,alignment", [(16, 1), (8, 16), (24, 1), (64, 1)])
def test_triton_update_equals_the_cpp_op_and_the_torch_reference_bit_for_bit(dim, alignment):
    w, rest = update_case(dim + alignment, dim, alignment)
    got, cpp, ref = w.clone(), w.clone(), w.clone()
    update_rows_(got, *rest)
    update_rows_cpp(cpp, *rest)
    update_rows_torch(ref, *rest)
    assert torch.equal(got, cpp) and torch.equal(got, ref)
    assert int((got != w).sum()) > 100  # rows did move


def test_fp16_edge_values_round_as_the_reference():
    """Subnormals, signed zeros, the fp16 range's edges, values past it: every fp16 row."""
    gen = torch.Generator().manual_seed(11)
    w, offsets, row_map, ends, shift = random_layout(gen, [400], 8)
    keys = (torch.bucketize(row_map.long(), ends.long(), right=True) == 1).nonzero().flatten()
    n = len(keys)
    view = w[int(offsets[1]) : int(offsets[1]) + (int(ends[1]) - int(ends[0])) * 16].view(-1, 16)
    view[row_map[keys].long() - int(shift[1])] = 0  # the rows become exactly -grad
    special = torch.tensor(
        [
            2**-14,
            2**-14 - 2**-24,
            2**-14 + 2**-24,
            2**-24,
            1.5 * 2**-24,
            -0.5 * 2**-24,
            3e-8,
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            7e4,
            -1e9,
        ]
    )
    grad = -special[torch.randint(0, len(special), (n, 8), generator=gen)]
    start, table = rounding_noise_starts(1, 2, 0, keys, torch.zeros(n, dtype=torch.long))
    rest = (offsets, row_map, ends, shift, keys, grad, torch.ones(n), table, start, 8, 1)
    got, cpp = w.clone(), w.clone()
    update_rows_(got, *rest)
    update_rows_cpp(cpp, *rest)
    assert torch.equal(got, cpp)


def test_dropped_rows_are_left_alone_and_a_key_outside_the_map_is_named():
    w, (offsets, row_map, ends, shift, keys, grad, scale, table, start, dim, al) = update_case(3, 16, 1)
    dropped = (torch.bucketize(row_map.long(), ends.long(), right=True) == 5).nonzero().flatten()
    got = w.clone()
    n = len(dropped)
    update_rows_(got, offsets, row_map, ends, shift, dropped, torch.ones(n, 16), torch.ones(n), table, start[:n], 16, 1)
    assert torch.equal(got, w)
    with pytest.raises(ValueError, match=r"row 1 \(key 100\) is outside the row map"):
        update_rows_(
            got,
            offsets,
            row_map,
            ends,
            shift,
            torch.tensor([0, 100]),
            torch.ones(2, 16),
            torch.ones(2),
            table,
            start[:2],
            16,
            1,
        )


def test_the_package_imports_neither_fbgemm_nor_torchrec_nor_the_cpp_library():
    code = (
        "import sys, shark_torchrec.triton_kernels, shark_torchrec.triton_kernels.reference\n"
        "bad = [m for m in ('fbgemm_gpu', 'torchrec', 'shark_torchrec.kernels') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cpu_tensors_outside_the_interpreter_are_refused():
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch\nfrom shark_torchrec.triton_kernels import mixed_lookup\n"
        "try:\n    mixed_lookup(torch.zeros(64, dtype=torch.uint8), torch.zeros(5, dtype=torch.long), "
        "torch.zeros(1, dtype=torch.int32), torch.ones(5, dtype=torch.int32), torch.zeros(6, dtype=torch.int32), "
        "torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1), None, 4, 1, 'sum', 1, ['x'])\n"
        "except ValueError as e:\n    assert 'CUDA tensors only' in str(e), e\nelse:\n    raise SystemExit('accepted')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_the_gpu_benchmark_runs_through_the_interpreter_and_catches_a_broken_kernel(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_kernels

    tiny = [
        "--device",
        "cpu",
        "--rows",
        "2000",
        "--dim",
        "16",
        "--bags",
        "16",
        "--ids-per-bag",
        "3",
        "--repeats",
        "1",
        "--inner",
        "1",
        "--block-ids",
        "4",
        "--small-dims",
        "16",
    ]
    assert gpu_kernels.main(tiny + ["--profile"]) == 0
    out = capsys.readouterr().out
    assert "all equal, bit for bit" in out and "of fp32" in out
    assert "kernels of one lookup" in out and "kernels of one step" in out

    def off_by_a_step(weights, *rest):
        update_rows_(weights, *rest)
        weights[-1] ^= 1  # one bit of the last group table

    monkeypatch.setattr(gpu_kernels, "update_rows_", off_by_a_step)
    assert gpu_kernels.main(tiny + ["--checks-only"]) == 1
    assert "DIFFERS: update" in capsys.readouterr().out
    monkeypatch.undo()

    def one_bit_off(*args, **kwargs):
        bits = mixed_lookup(*args, **kwargs).view(torch.int32).clone()
        bits.view(-1)[5] ^= 1  # the last bit of one value
        return bits.view(torch.float32)

    monkeypatch.setattr(gpu_kernels, "mixed_lookup", one_bit_off)
    assert gpu_kernels.main(tiny + ["--checks-only"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS: lookup" in out and "DIFFERS: update" not in out


def test_lookup_arguments_the_cpp_op_refuses_are_refused():
    args = list(lookup_args(2, 16, 1, 5, "none", True))
    w, offsets, row_map, ends, shift, base, rows, values, lengths, psw = args[:10]

    def call(**change):
        a = dict(
            zip(
                [
                    "weights",
                    "group_offsets",
                    "row_map",
                    "range_ends",
                    "range_shift",
                    "feature_base",
                    "feature_rows",
                    "values",
                    "lengths",
                    "per_sample_weights",
                ],
                args[:10],
            )
        )
        a.update(change)
        return mixed_lookup(*a.values(), *args[10:])

    short = lengths.clone()
    short[2] += 1
    with pytest.raises(ValueError, match="lengths add up to"):
        call(lengths=short)
    negative = lengths.clone()
    negative[0], negative[2] = -1, negative[2] + lengths[0] + 1
    with pytest.raises(ValueError, match="lengths: 1 negative"):
        call(lengths=negative)
    wrapping = torch.zeros(lengths.shape, dtype=torch.int64)  # adds up to the ids' count in int64
    wrapping[:4] = torch.tensor([1 << 62] * 4)
    wrapping[4] = len(values)
    with pytest.raises(ValueError, match="running sum overflows"):
        call(lengths=wrapping)
    with pytest.raises(ValueError, match="per_sample_weights: one per id"):
        call(per_sample_weights=psw[:-1])
    with pytest.raises(ValueError, match="feature_rows: one per feature"):
        call(feature_rows=rows[:-1])
    # Rows past the end of the buffer (a row map or buffer that do not belong together): the
    # C++ op refuses them, so does this one, without reading past the buffer.
    with pytest.raises(ValueError, match="points outside the group tables"):
        call(weights=w[: len(w) - 64].clone())
    unaligned = torch.empty(len(w) + 1, dtype=torch.uint8)[1:]
    unaligned.copy_(w)
    with pytest.raises(ValueError, match="fp32 rows must start at multiples of 4 bytes"):
        call(weights=unaligned)
    # A negative base read before the row map (a row of another feature, garbage, or a crash);
    # a base so large that base + id wrapped negative passed as within the map. As the C++ op:
    with pytest.raises(ValueError, match="feature_base must be >= 0"):
        call(feature_base=base - base.max() - 2)
    with pytest.raises(ValueError, match="points outside the group tables"):
        call(feature_base=torch.full_like(base, (1 << 63) - 2))
    with pytest.raises(ValueError, match="group_offsets must be >= 0"):
        call(group_offsets=offsets - offsets.max() - 4)


def test_update_refuses_rows_outside_the_buffer_and_skips_dropped_keys_before_their_noise():
    w, (offsets, row_map, ends, shift, keys, grad, scale, table, start, dim, al) = update_case(9, 16, 1)
    with pytest.raises(ValueError, match=r"outside the row map or the group tables"):
        update_rows_(w[: len(w) - 64].clone(), offsets, row_map, ends, shift, keys, grad, scale, table, start, dim, al)
    dropped = (torch.bucketize(row_map.long(), ends.long(), right=True) == 5).nonzero().flatten()[:3]
    got = w.clone()
    far = torch.full((3,), table.numel(), dtype=torch.long)  # a window past the table: never read
    update_rows_(got, offsets, row_map, ends, shift, dropped, torch.ones(3, dim), torch.ones(3), table, far, dim, al)
    assert torch.equal(got, w)


@pytest.mark.parametrize("sequence", [False, True], ids=["bags", "sequence"])
@pytest.mark.parametrize(
    "tiers",
    [
        {},
        {
            "tiers": ("fp32", "fp16", "int8", "int4", "int2", "dropped"),
            "memory_budget": None,
            "row_fractions": (0.1, 0.15, 0.2, 0.2, 0.2),
        },
    ],
    ids=["paper tiers", "every tier"],
)
def test_the_store_trains_on_the_triton_kernels_as_on_the_cpp_ops(sequence, tiers):
    """The collection's store with its lookup and row update on the Triton kernels (as on
    CUDA; here through the interpreter) against the C++ ops: outputs and every table's state
    after 3 steps with reassignment, bit for bit."""
    from helpers import mp_workers as W

    overrides = {"reassign_every": 1, **tiers}
    got = W.unsharded_run(3, overrides, sequence, kernels="triton")
    want = W.unsharded_run(3, overrides, sequence)
    assert all(store.kernels == "triton" for store in got["stores"])
    for a, b in zip(got["outputs"], want["outputs"]):
        assert same_bits(a, b)
    assert got["tables"].keys() == want["tables"].keys()
    for name, value in want["tables"].items():
        assert torch.equal(got["tables"][name], value), name
    groups = torch.cat([s.row_group for s in want["stores"]])
    assert len(set(groups.tolist())) >= (6 if tiers else 3)  # every tier was in use


def test_the_kernels_follow_the_device_unless_forced():
    from types import SimpleNamespace

    from shark_torchrec.modules.row_lookup import kernels_for

    def store(device="cpu", kernels=None):
        return SimpleNamespace(weights=torch.empty(0, device=device), kernels=kernels)

    assert kernels_for(store()) == "cpp" and kernels_for(store("meta")) == "torch"
    assert kernels_for(store(kernels="triton")) == "triton"
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels_for(store(kernels="cuda"))
