"""The ranked row map of served stores (`shark_torchrec.kernels.ranked_map`) and the op that
reads it, `torch.ops.shark.mixed_lookup_ranked`: bit for bit with the int32-row-map lookup of the
same rows and with its torch reference, on random layouts whose slots are not in key order;
its bytes a row; the same error for a bad id."""

import math

import pytest
import torch

from helpers.kernel_layouts import bags, random_layout, same_bits
from shark_torchrec.kernels import mixed_lookup, mixed_lookup_ranked
from shark_torchrec.kernels.ranked_map import (
    BLOCK_ROWS,
    build_ranked_layout,
    decode_ranked_map,
    ranked_from_row_map,
    ranked_group_rows,
    ranked_map_bytes_per_row,
)
from shark_torchrec.kernels.reference import mixed_lookup_ranked_reference
from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES

RAW = lambda dim: (4 * dim, 2 * dim, dim + 4, dim // 2 + 4, dim // 4 + 4)  # noqa: E731


def _ranked(w, offsets, row_map, ends, shift, tables, dim, alignment=1):
    rb = [(r + alignment - 1) // alignment * alignment for r in RAW(dim)]
    groups = len(offsets)
    offs = offsets.tolist() + [w.numel()] * (5 - groups)
    cap = [
        (offs[g + 1] - offs[g]) // rb[g] if g + 1 < groups else (w.numel() - offs[g]) // rb[g] for g in range(groups)
    ]
    cap += [0] * (5 - groups)
    table_base = torch.tensor([0] + torch.cumsum(torch.tensor(tables), 0).tolist())
    return ranked_from_row_map(w, offs, cap, rb, row_map, ends, shift, table_base)


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("dim,alignment,groups", [(16, 1, 5), (8, 16, 5), (24, 1, 3), (8, 1, 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ranked_lookup_equals_the_row_map_lookup_and_its_reference(pooling, dim, alignment, groups, weighted):
    gen = torch.Generator().manual_seed(dim * 11 + alignment + groups)
    tables = [37, 5, 300]  # 342 rows: six blocks, the last one partly filled
    w, offsets, row_map, ends, shift = random_layout(gen, tables, dim, groups, alignment=alignment)
    lay = _ranked(w, offsets, row_map, ends, shift, tables, dim, alignment)
    base, rows, feats = torch.tensor([0, 37, 42, 0]), torch.tensor([37, 5, 300, 37]), [37, 5, 300, 37]
    B = 40
    values, lengths = bags(gen, feats, B, max_len=5)
    values[1] = values[0]  # a repeated id
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    names = ["a", "b", "c", "d"]
    rest = (base, rows, values, lengths, psw, dim, B, pooling, alignment, names)
    want = mixed_lookup(w, offsets, row_map, ends, shift, *rest)
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    assert same_bits(mixed_lookup_ranked(*ranked, *rest), want)
    assert same_bits(mixed_lookup_ranked_reference(*ranked, *rest), want)


def test_every_row_decodes_to_its_group_and_its_bytes():
    gen = torch.Generator().manual_seed(1)
    tables, dim = [70, 1, 200], 16
    w, offsets, row_map, ends, shift = random_layout(gen, tables, dim)
    lay = _ranked(w, offsets, row_map, ends, shift, tables, dim)
    keys = torch.arange(sum(tables))
    old_g = torch.bucketize(row_map, ends, right=True)
    g, slots = decode_ranked_map(lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback, keys)
    assert torch.equal(g, old_g)
    rb = RAW(dim)
    old_slots = row_map.long() - shift.long()[old_g]
    for k in keys.tolist():
        read = 0 if int(g[k]) == 5 else int(g[k])
        new = lay.weights[int(lay.group_offsets[read]) + int(slots[k]) * rb[read] :][: rb[read]]
        old = w[int(offsets[read]) + int(old_slots[k]) * rb[read] :][: rb[read]]
        assert torch.equal(new, old), k
    # Stored rows sit in key order within their group table; only tables with dropped rows keep a fallback row.
    for grp in range(5):
        s = slots[g == grp]
        assert torch.equal(s, torch.arange(len(s))), grp
    assert lay.weights.numel() <= w.numel()


def test_its_bytes_a_row():
    assert ranked_map_bytes_per_row(2, True) == 0.375  # int4 / int2 / dropped: 2 planes, 2 bases
    assert ranked_map_bytes_per_row(3, False) == 0.4375  # the paper's fp32 / fp16 / int8
    assert ranked_map_bytes_per_row(5, True) == 0.6875  # every tier
    assert ranked_map_bytes_per_row(1, False) == 0.0625  # one tier: a base a block, no plane
    gen = torch.Generator().manual_seed(2)
    tables = [1000]
    w, offsets, row_map, ends, shift = random_layout(gen, tables, 8)
    lay = _ranked(w, offsets, row_map, ends, shift, tables, 8)
    assert lay.blocks.shape == (math.ceil(1000 / BLOCK_ROWS), 2 * 3 + 5)
    assert lay.blocks.numel() * 4 == math.ceil(1000 / BLOCK_ROWS) * BLOCK_ROWS * ranked_map_bytes_per_row(5, True)


@pytest.mark.parametrize("case", ["one group", "all dropped"])
def test_a_single_code_needs_no_bit_plane(case):
    gen = torch.Generator().manual_seed(3)
    tables, dim = [130, 9], 8
    w, offsets, row_map, ends, shift = random_layout(gen, tables, dim)
    old_g = torch.bucketize(row_map, ends, right=True)
    if case == "one group":  # every row int8: the store's slots permuted
        keep = old_g == 2
        row_map = torch.where(keep, row_map, row_map[keep][0])
    else:
        table = torch.repeat_interleave(torch.arange(2), torch.tensor(tables)).to(torch.int32)
        row_map = ends[-1] + table  # each row its own table's fallback row
    lay = _ranked(w, offsets, row_map, ends, shift, tables, dim)
    assert lay.blocks.shape[1] == (1 if case == "one group" else 0)
    base, rows = torch.tensor([0, 130]), torch.tensor(tables)
    values, lengths = bags(gen, tables, 16, max_len=3)
    rest = (base, rows, values, lengths, None, dim, 16, "sum", 1, ["a", "b"])
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    assert same_bits(mixed_lookup_ranked(*ranked, *rest), mixed_lookup(w, offsets, row_map, ends, shift, *rest))


@pytest.mark.parametrize("bad", [-1, 5])
def test_an_id_outside_its_table_names_the_feature_and_id(bad):
    gen = torch.Generator().manual_seed(4)
    w, offsets, row_map, ends, shift = random_layout(gen, [7, 5], 8)
    lay = _ranked(w, offsets, row_map, ends, shift, [7, 5], 8)
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    rest = (torch.tensor([0, 7]), torch.tensor([7, 5]), torch.tensor([1, 2, 3, bad, 4]), torch.tensor([2, 1, 1, 1]))
    args = (*ranked, *rest, None, 8, 2, "sum", 1, ["user", "item"])
    msg = f"feature item: id {bad} outside its table of 5 rows"
    with pytest.raises(ValueError, match=msg):
        mixed_lookup_ranked(*args)
    with pytest.raises(ValueError, match=msg):
        mixed_lookup_ranked_reference(*args)


def test_a_map_that_does_not_cover_the_rows_is_refused():
    gen = torch.Generator().manual_seed(6)
    w, offsets, row_map, ends, shift = random_layout(gen, [64], 8)
    lay = _ranked(w, offsets, row_map, ends, shift, [64], 8)
    args = (torch.tensor([0]), torch.tensor([65]), torch.tensor([64]), torch.tensor([1]), None, 8, 1, "sum", 1, ["x"])
    with pytest.raises(RuntimeError, match="points outside the group tables"):
        mixed_lookup_ranked_reference(
            lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback, *args
        )
    with pytest.raises(RuntimeError, match="points outside the group tables"):
        mixed_lookup_ranked(
            lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback, *args
        )
    with pytest.raises(RuntimeError, match="words a block"):
        mixed_lookup_ranked(
            lay.weights,
            lay.group_offsets,
            lay.blocks[:, 1:],
            lay.code_groups,
            lay.table_base,
            lay.table_fallback,
            *args,
        )


def test_the_op_scripts_and_has_a_fake_for_tracing():
    @torch.jit.script
    def scripted(w, o, bl, c, ts, tf, b, r, v, l, d: int, B: int):
        return torch.ops.shark.mixed_lookup_ranked(w, o, bl, c, ts, tf, b, r, v, l, None, d, B, 0, 1, "x")

    gen = torch.Generator().manual_seed(5)
    w, offsets, row_map, ends, shift = random_layout(gen, [20], 8)
    lay = _ranked(w, offsets, row_map, ends, shift, [20], 8)
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    base, rows = torch.tensor([0]), torch.tensor([20])
    values, lengths = bags(gen, [20], 6, 3)
    want = mixed_lookup(w, offsets, row_map, ends, shift, base, rows, values, lengths, None, 8, 6, "sum", 1, ["x"])
    assert same_bits(scripted(*ranked, base, rows, values, lengths, 8, 6), want)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (*ranked, base, rows, values, lengths)]
        out = torch.ops.shark.mixed_lookup_ranked(*fake, None, 8, 6, 0, 1, "x")
    assert out.shape == (6, 8)


@pytest.mark.parametrize("tables", [[64], [63, 1], [200, 0, 57], [130]])
def test_rows_per_group_come_from_the_last_block(tables):
    gen = torch.Generator().manual_seed(sum(tables))
    w, offsets, row_map, ends, shift = random_layout(gen, tables, 8)
    lay = _ranked(w, offsets, row_map, ends, shift, tables, 8)
    want = torch.bincount(torch.bucketize(row_map, ends, right=True), minlength=9).tolist()
    assert ranked_group_rows(lay.blocks, lay.code_groups, sum(tables)) == want


def test_a_module_saved_before_the_ranked_map_is_refused_by_name():
    from shark_torchrec.modules.inference import MixedPrecisionPooledLookup

    old = MixedPrecisionPooledLookup.__new__(MixedPrecisionPooledLookup)
    with pytest.raises(RuntimeError, match="saved before the ranked row map"):
        old.__setstate__({"_buffers": {"row_map": torch.zeros(3, dtype=torch.int32)}, "training": False})


def _one_bit_layout(gen, tables, dim, with_dropped):
    """A served layout with 1-bit rows (group 6) and symmetric int4 and int2 rows (groups 7 and
    8) among every other group (with dropped rows: int2 left out, eight codes either way, the
    most three bit planes hold): random bytes in a store-like buffer whose slots are not in key
    order, then `build_ranked_layout`."""
    n = sum(tables)
    stored = [0, 1, 2, 3, 4, 6, 7, 8] if not with_dropped else [0, 1, 2, 3, 6, 7, 8]
    ids = stored + ([5] if with_dropped else [])
    groups = torch.tensor(ids)[torch.randint(0, len(ids), (n,), generator=gen)]
    groups[:3] = 6  # some 1-bit rows in every draw
    groups[3:6] = 7  # and some symmetric int4 rows
    groups[6:9] = 8  # and int2 rows
    raw = (4 * dim, 2 * dim, dim + 4, dim // 2 + 4, dim // 4 + 4, 0, dim // 8 + 1, dim // 2 + 1, dim // 4 + 1)
    T = len(tables)
    cap = [int((groups == g).sum()) for g in range(9)]
    cap[0] += T if with_dropped else 0
    cap[5] = 0
    offsets, at = [], 0
    for g in range(9):
        offsets.append(at)
        at += (cap[g] * raw[g] + 3) // 4 * 4
    w = torch.zeros(at, dtype=torch.uint8)
    for g in stored:
        tab = w[offsets[g] : offsets[g] + cap[g] * raw[g]].view(cap[g], raw[g])
        if g == 0:
            tab.view(torch.float32).copy_(torch.randn(cap[g], dim, generator=gen))
        elif g == 1:
            tab.view(torch.float16).copy_(torch.randn(cap[g], dim, generator=gen).half())
        elif g in (6, 7, 8):  # one magnitude (scale) code byte (any of the 256, 0 too), then the codes
            tab[:, :1] = torch.randint(0, 256, (cap[g], 1), generator=gen, dtype=torch.uint8)
            tab[:3, 0] = torch.tensor([0, 1, 255], dtype=torch.uint8)[: len(tab)]  # the ends of the code range
            tab[:, 1:] = torch.randint(0, 256, (cap[g], raw[g] - 1), generator=gen, dtype=torch.uint8)
        else:
            sb = torch.stack([torch.rand(cap[g], generator=gen), torch.randn(cap[g], generator=gen)], 1)
            tab[:, :4].view(torch.float16).copy_(sb.half())
            tab[:, 4:] = torch.randint(0, 256, (cap[g], raw[g] - 4), generator=gen, dtype=torch.uint8)
    slots = torch.zeros(n, dtype=torch.int64)
    for g in stored:
        m = (groups == g).nonzero().flatten()
        slots[m] = torch.randperm(len(m), generator=gen)
    table_base = torch.tensor([0] + torch.cumsum(torch.tensor(tables), 0).tolist())
    table_of = torch.repeat_interleave(torch.arange(T), torch.tensor(tables))
    dropped = groups == 5
    slots[dropped] = int((groups == 0).sum()) + table_of[dropped]  # the tables' fallback rows
    return build_ranked_layout(w, offsets, cap, list(raw), groups, slots, table_base), w, offsets, groups, slots


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_dropped", [False, True])
def test_one_bit_and_symmetric_rows_read_as_the_reference_reads_them(pooling, weighted, with_dropped):
    gen = torch.Generator().manual_seed(7 + 2 * weighted + with_dropped)
    tables, dim = [37, 5, 300], 16
    lay, w, offsets, groups, slots = _one_bit_layout(gen, tables, dim, with_dropped)
    assert {6, 7, 8} <= set(lay.code_groups.tolist()) and len(lay.code_groups) == 8
    assert (5 in lay.code_groups.tolist()) == with_dropped and lay.group_offsets.numel() == 9
    base, rows, feats = torch.tensor([0, 37, 42, 0]), torch.tensor([37, 5, 300, 37]), [37, 5, 300, 37]
    B = 40
    values, lengths = bags(gen, feats, B, max_len=5)
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    rest = (base, rows, values, lengths, psw, dim, B, pooling, 1, ["a", "b", "c", "d"])
    got = mixed_lookup_ranked(*ranked, *rest)
    assert same_bits(got, mixed_lookup_ranked_reference(*ranked, *rest))
    # A 1-bit row by hand, from the store-like buffer it was built from: +a for a set bit, -a
    # for a clear one (a row past the first three, whose code bytes are the range's ends).
    key = int(((groups == 6) & (slots >= 3)).nonzero()[0])
    row = w[offsets[6] + int(slots[key]) * (dim // 8 + 1) :][: dim // 8 + 1]
    (a,) = ONE_BIT_MAGNITUDES[row[:1].long()].tolist()  # the export's table, not the library's
    bits = [(int(row[1 + j // 8]) >> (j % 8)) & 1 for j in range(dim)]
    assert 0 < a and 0 < sum(bits) < dim
    one = mixed_lookup_ranked(
        *ranked,
        torch.tensor([0]),
        torch.tensor([sum(tables)]),
        torch.tensor([key]),
        torch.tensor([1]),
        None,
        dim,
        1,
        "none",
        1,
        ["k"],
    )
    assert one[0].tolist() == [a if b else -a for b in bits]
    # A symmetric int4 and an int2 row by hand: s x (code - 7.5) or s x (code - 1.5), codes two or
    # four a byte, low bits first.
    for group, bits in ((7, 4), (8, 2)):
        key = int(((groups == group) & (slots >= 3)).nonzero()[0])
        rb = 1 + dim * bits // 8
        row = w[offsets[group] + int(slots[key]) * rb :][:rb]
        (s,) = ONE_BIT_MAGNITUDES[row[:1].long()].tolist()
        per = 8 // bits
        codes = [(int(row[1 + j // per]) >> (bits * (j % per))) & ((1 << bits) - 1) for j in range(dim)]
        assert 0 < s and len(set(codes)) > 1
        one = mixed_lookup_ranked(
            *ranked, torch.tensor([0]), torch.tensor([sum(tables)]), torch.tensor([key]), torch.tensor([1]),
            None, dim, 1, "none", 1, ["k"],
        )  # fmt: skip
        centre = ((1 << bits) - 1) / 2
        assert one[0].tolist() == [float(torch.tensor(c - centre) * torch.tensor(s)) for c in codes]
    assert ranked_group_rows(lay.blocks, lay.code_groups, sum(tables)) == torch.bincount(groups, minlength=9).tolist()


def test_one_bit_rows_need_a_dim_that_is_a_multiple_of_8():
    gen = torch.Generator().manual_seed(8)
    lay, *_ = _one_bit_layout(gen, [20], 16, False)
    ranked = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
    with pytest.raises(RuntimeError, match="1-bit rows need a dim that is a multiple of 8"):
        mixed_lookup_ranked(
            *ranked,
            torch.tensor([0]),
            torch.tensor([20]),
            torch.tensor([1]),
            torch.tensor([1]),
            None,
            12,
            1,
            "sum",
            1,
            ["x"],
        )


def test_a_module_with_one_bit_rows_of_the_earlier_layout_is_refused_by_name():
    """1-bit rows were an fp16 scale and bias a row (layout 1), then a sign bit a value and an fp16
    magnitude (2), now a magnitude byte (3): a module pickled in an earlier layout would be read
    wrongly, so loading it fails by name; today's round-trips."""
    import io

    from shark_torchrec.modules.inference import MixedPrecisionPooledLookup

    gen = torch.Generator().manual_seed(9)
    lay, *_ = _one_bit_layout(gen, [20, 30], 16, False)
    m = MixedPrecisionPooledLookup(
        ["a", "b"], [0, 20], [20, 30], 16, False, lay.weights, lay.group_offsets.tolist(),
        lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback, 50,
    )  # fmt: skip
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    values, lengths = torch.tensor([0, 3, 25]), torch.tensor([2, 1])
    assert torch.equal(again(values, lengths), m(values, lengths))
    state = dict(m.__dict__)
    del state["one_bit_layout"]
    old = MixedPrecisionPooledLookup.__new__(MixedPrecisionPooledLookup)
    with pytest.raises(RuntimeError, match="1-bit rows in the earlier layout"):
        old.__setstate__(state)
    state["one_bit_layout"] = 2  # an fp16 magnitude a row, before the magnitude took a byte
    with pytest.raises(RuntimeError, match="1-bit rows in the earlier layout"):
        MixedPrecisionPooledLookup.__new__(MixedPrecisionPooledLookup).__setstate__(state)


def test_the_library_and_the_export_hold_the_same_one_bit_magnitudes():
    """The 256 magnitudes a 1-bit row's byte stands for, as the kernel library makes them and as
    the export encodes by, are the same bits: 0, then 2^((c - 192) / 8) rising by an eighth of
    an octave."""
    table = torch.ops.shark.one_bit_magnitudes()
    assert table.dtype == torch.float32 and torch.equal(table, ONE_BIT_MAGNITUDES)
    assert float(table[0]) == 0.0 and float(table[192]) == 1.0 and float(table[200]) == 2.0
    ratio = (table[2:] / table[1:-1]).double()
    assert bool(((ratio - 2**0.125).abs() < 1e-6).all())


def test_a_ranked_map_holds_at_most_eight_codes():
    """Nine codes (every stored group and dropped rows) need four bit planes, which the lookup
    does not read: the builder refuses them by name, and the op refuses a map that claims them."""
    gen = torch.Generator().manual_seed(9)
    lay, w, offsets, groups, slots = _one_bit_layout(gen, [40], 16, True)
    groups = groups.clone()
    groups[9:18] = torch.arange(9)  # every group, int2 and dropped too: nine codes
    with pytest.raises(ValueError, match="at most 8 codes"):
        build_ranked_layout(w, offsets, [1] * 9, [4] * 9, groups, slots, torch.tensor([0, 40]))
    codes = torch.tensor([0, 1, 2, 3, 4, 7, 8, 6, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="at most 8 codes"):
        mixed_lookup_ranked(
            lay.weights, lay.group_offsets, torch.zeros(1, 8 + 8, dtype=torch.int32), codes, lay.table_base,
            lay.table_fallback, torch.tensor([0]), torch.tensor([40]), torch.tensor([1]), torch.tensor([1]),
            None, 16, 1, "sum", 1, ["x"],
        )  # fmt: skip
