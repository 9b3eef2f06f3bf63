"""The inference module: exported from a trained mixed-precision model, same logits, same bytes."""

import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import TINY, run_shark
from helpers.checks import compare_export
from shark_torchrec.jobs.checkpoint import CheckpointError, load_full_state
from shark_torchrec.jobs.export import export_inference_model, load_trained_model
from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection


@pytest.fixture(scope="module")
def shark_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shark")
    run_shark(
        "train",
        *TINY,
        "--embedding-dim",
        "16",
        "--precision",
        "shark",
        "--memory-budget",
        "0.6",
        "--fp32-fraction",
        "0.1",
        "--reassign-every",
        "10",
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    return out, json.loads((out / "m.json").read_text())


def test_export_matches_the_trained_model(shark_run):
    out, metrics = shark_run
    assert metrics["rows_int8"] and metrics["rows_fp16"] and metrics["rows_fp32"]
    diff, _ = compare_export(out / "checkpoints", metrics)
    assert diff < 1e-5  # the same rows through the same FBGEMM kernel


def test_export_scripts_and_exports(shark_run):
    """TorchRec's quantized EmbeddingBagCollection goes through torch.export here (its
    torch.jit.script fails on this stack); ours goes through both."""
    out, _ = shark_run
    exported, _ = export_inference_model(out / "checkpoints")
    ebc = exported.model.sparse_arch.embedding_bag_collection
    names = ebc.feature_names
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.arange(len(names) * 3) % 7, lengths=torch.ones(len(names) * 3, dtype=torch.int64)
    )
    want = ebc(kjt).values()
    torch.testing.assert_close(torch.jit.script(ebc)(kjt).values(), want, rtol=0, atol=0)
    program = torch.export.export(ebc, (kjt,))
    torch.testing.assert_close(program.module()(kjt).values(), want, rtol=0, atol=0)
    # Bags of several ids and empty bags take the general path; the trained collection agrees.
    trained, _ = load_trained_model(out / "checkpoints")
    n = len(names) * 3
    lengths = torch.tensor([2, 0, 1] * len(names))
    multi = KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.arange(int(lengths.sum())) % 7, lengths=lengths
    )
    with torch.no_grad():
        want = trained.model.sparse_arch.embedding_bag_collection(multi).values()
    torch.testing.assert_close(ebc(multi).values(), want, rtol=0, atol=1e-6)
    assert n == lengths.numel()
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=torch.tensor([10**6] * len(names)), lengths=torch.ones(len(names), dtype=torch.int64)
    )
    with pytest.raises(ValueError, match=f"feature {names[0]}: id 1000000 outside its table"):
        ebc(bad)


def test_fp32_checkpoint_is_not_exported_as_mixed_precision(tmp_path):
    """Refused by name, through the library and the command, and the command's --out is not
    left behind as an empty folder."""
    run_shark("train", *TINY, "--synthetic-train-rows", "1000", "--out", str(tmp_path))
    with pytest.raises(CheckpointError, match="fp32 TorchRec tables"):
        export_inference_model(tmp_path / "checkpoints")
    out = tmp_path / "served" / "here"
    proc = run_shark("export", str(tmp_path / "checkpoints"), "--out", str(out), check=False)
    assert proc.returncode == 2 and "fp32 TorchRec tables" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "served").exists()


def test_an_export_that_fails_part_way_leaves_the_earlier_one_whole(shark_run, tmp_path, monkeypatch):
    """The export writes beside --out and moves its files in once all are written: one that
    fails after its model files (its serving files here) leaves the earlier export's files as
    they were, a vocabulary included, and no staging folder; into a new --out it leaves no
    folder; one that succeeds replaces them and removes the earlier vocabulary it does not
    write (synthetic data has none)."""
    from shark_torchrec.jobs import export as export_job

    ckpt = shark_run[0] / "checkpoints"
    out = tmp_path / "served"
    export_job.export_checkpoint(ckpt, out, progress=False)
    written = sorted(p.name for p in out.iterdir())
    assert "model.pt" in written and "serving.json" in written and export_job.VOCAB_FILE not in written
    for name in [*written, export_job.VOCAB_FILE]:  # an earlier export's files, told apart by their bytes
        (out / name).write_bytes(b"earlier " + name.encode())
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(export_job, "write_serving_files", full_disk)
        with pytest.raises(OSError, match="No space left"):
            export_job.export_checkpoint(ckpt, out, progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no staging folder left
        with pytest.raises(OSError, match="No space left"):
            export_job.export_checkpoint(ckpt, tmp_path / "new" / "here", progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]
    export_job.export_checkpoint(ckpt, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == written
    assert all(not (out / name).read_bytes().startswith(b"earlier ") for name in written)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    run_shark("train", *TINY, "--embedding-dim", "16", "--synthetic-train-rows", "2000", "--out", str(out))
    return out


def test_fp32_model_serves_in_tiers_ranked_by_its_training_split(fp32_run, tmp_path):
    """A model of stock fp32 tables (what a TorchRec user trains) is served in our tiers: its
    rows ranked by Eq. 7's increments summed over the training split (alpha per positive
    example's lookup, 1 per negative), counted here again sample by sample in plain Python."""
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving, training_priorities
    from shark_torchrec.precision.priority import DROPPED, INT2, INT4
    from shark_torchrec.precision.quantize import dequantize_rows, quantize_rows

    ckpt = fp32_run / "checkpoints"
    model, cfg = load_trained_model(ckpt)
    data = open_dataset(cfg.dataset, cfg.train.seed)
    fp32 = model.model.sparse_arch.embedding_bag_collection
    configs = fp32.embedding_bag_configs()
    table_of = {f: c.name for c in configs for f in c.feature_names}
    want = {c.name: [0.0] * c.num_embeddings for c in configs}
    for b in data.batches("train", 97):  # another batch size: the sums do not depend on it
        for f in b.sparse_features.keys():
            jt = b.sparse_features[f]
            ids, lengths = jt.values().tolist(), jt.lengths().tolist()
            at = 0
            for label, n in zip(b.labels.tolist(), lengths):
                for i in ids[at : at + n]:
                    want[table_of[f]][i] += 2.0 if label > 0.5 else 1.0
                at += n
    counts = training_priorities(configs, data, 2.0)
    for c in configs:
        assert counts[c.name].tolist() == want[c.name], c.name
    assert sum(sum(v) for v in want.values()) > 2000

    weights = {c.name: fp32.embedding_bags[c.name].weight.detach().clone() for c in configs}
    with pytest.raises(CheckpointError, match="training split"):
        regroup_for_serving(model, ServingTiers(("int4", "int2", "dropped"), 0.15, "model"))
    record = regroup_for_serving(model, ServingTiers(("int4", "int2", "dropped"), 0.11, "model", "nearest"), data)
    assert record["serving_priorities"] == "training split occurrences"
    ebc = model.model.sparse_arch.embedding_bag_collection
    store = ebc.stores[0]
    total = torch.cat([counts[t.name] for t in store.tables])  # the store's rows, table by table
    groups = store.row_group
    assert {int(g) for g in groups.unique()} == {INT4, INT2, DROPPED}
    # Ranked by the counts (one dim: per byte alike): a more precise tier never holds a lower count.
    assert float(total[groups == INT4].min()) >= float(total[groups == INT2].max())
    assert float(total[groups == INT2].min()) >= float(total[groups == DROPPED].max())
    before = torch.cat([weights[t.name] for t in store.tables])
    after = store.read_rows(torch.arange(store.num_rows))
    for g, bits in ((INT4, 4), (INT2, 2)):
        m = groups == g
        step = (before[m].max(1).values - before[m].min(1).values) / ((1 << bits) - 1)
        assert ((after[m] - before[m]).abs().max(1).values <= 0.5 * step * 1.01 + 1e-3).all(), g
        # Exactly the row's own nearest quantization, though the store was filled in its starting
        # groups and moved rows at the reassignment: the moved rows are written again from fp32.
        codes, sb = quantize_rows(before[m], bits)
        assert torch.equal(after[m], dequantize_rows(codes, sb)), g
    for i in range(len(store.tables)):  # a table's dropped rows read the mean of the fp32 rows they replace
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        mine = (groups[lo:hi] == DROPPED).nonzero().flatten() + lo
        if len(mine):
            torch.testing.assert_close(after[mine], before[mine].mean(0).expand(len(mine), -1), rtol=0, atol=1e-6)
    served = MixedPrecisionInferenceEmbeddingBagCollection.from_trained(ebc)
    assert served.memory_bytes() <= 0.11 * sum(c.num_embeddings * c.embedding_dim * 4 for c in configs)
    # Counts given (several exports of one model share one pass): the same tiers, no data read.
    again, _ = load_trained_model(ckpt)
    regroup_for_serving(again, ServingTiers(("int4", "int2", "dropped"), 0.11, "model", "nearest"), counts=counts)
    assert torch.equal(again.model.sparse_arch.embedding_bag_collection.stores[0].row_group, groups)

    exported = tmp_path / "served"
    run_shark("export", str(ckpt), "--out", str(exported), "--tiers", "int4", "int2", "--memory-budget", "0.17")
    rec = json.loads((exported / "export.json").read_text())
    assert rec["serving_priorities"] == "training split occurrences" and rec["serving_tiers"] == ["int4", "int2"]
    assert rec["max_abs_logit_diff_dev"] == 0.0 and rec["inference_bytes"] <= 0.17 * rec["fp32_bytes"]
    assert rec["rows_int4"] and rec["rows_int2"] and not rec["rows_fp32"]
    # That 0 checks the export against the regrouped model; what the tiers cost is measured
    # against the model as trained, whose dev AUC is the training run's own.
    trained = json.loads((fp32_run / "metrics.json").read_text())
    assert rec["dev_auc_trained"] == pytest.approx(trained["dev_auc"], abs=1e-6)
    assert rec["max_abs_logit_diff_dev_to_trained"] > 1e-3 and rec["dev_auc"] != rec["dev_auc_trained"]
    from shark_torchrec.report import _served_auc_text

    assert f"{rec['dev_auc_trained']:.4f}" in _served_auc_text(rec)
    serving = json.loads((exported / "serving.json").read_text())
    assert serving["max_abs_logit_diff_dev"] < 1e-5  # the scripted serving model
    bare = run_shark("export", str(ckpt), "--out", str(tmp_path / "bare"), check=False)
    assert bare.returncode != 0 and "give serving tiers and a budget" in bare.stderr


def _served_rows(ebc):
    """Every row of a served collection by key (tables back to back): its group and its value."""
    from shark_torchrec.kernels.ranked_map import decode_ranked_map

    n = ebc.num_rows
    keys = torch.arange(n)
    groups, _ = decode_ranked_map(ebc.blocks, ebc.code_groups, ebc.table_base, ebc.table_fallback, keys)
    values = torch.ops.shark.mixed_lookup_ranked(
        ebc.weights, ebc._offsets, ebc.blocks, ebc.code_groups, ebc.table_base, ebc.table_fallback,
        torch.tensor([0]), torch.tensor([n]), keys, torch.ones(n, dtype=torch.int64), None, ebc.dim, n, 2, 1, "all",
    )  # fmt: skip
    return groups, values


def _fp32_rows_and_counts(fp32_run):
    """The fp32 run loaded: (checkpoint, model, data, configs, every row by key (tables back to
    back), the training split's counts as the export counts them (its alpha), the same by key)."""
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import counted_priorities

    ckpt = fp32_run / "checkpoints"
    model, cfg = load_trained_model(ckpt)
    data = open_dataset(cfg.dataset, cfg.train.seed)
    fp32 = model.model.sparse_arch.embedding_bag_collection
    configs = fp32.embedding_bag_configs()
    before = torch.cat([fp32.embedding_bags[c.name].weight.detach().clone() for c in configs])
    counts = counted_priorities(model, data)
    return ckpt, model, data, configs, before, counts, torch.cat([counts[c.name] for c in configs])


def test_fp32_model_serves_with_one_bit_rows(fp32_run, tmp_path):
    """`--tiers int4 int2 int1`: below the int2 floor the rows int2 cannot hold are served in 1
    bit (each value +a or -a by its sign, a the row's mean magnitude) instead of being dropped: ranked by the
    training split's counts, within the budget, closer to the trained rows than their table's
    mean row, and exported and scripted like any other tier."""
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving, served_min_budget
    from shark_torchrec.precision.priority import INT1, INT2, INT4, BudgetError
    from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, sign_magnitude_rows

    ckpt, model, data, configs, before, counts, total = _fp32_rows_and_counts(fp32_run)
    fp32_bytes = before.numel() * 4
    record = regroup_for_serving(model, ServingTiers(("int4", "int2", "int1"), 0.11, "model"), data)
    assert record["serving_tiers"] == ["int4", "int2", "int1"]
    ebc = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, MixedPrecisionInferenceEmbeddingBagCollection)
    assert 0.105 * fp32_bytes <= ebc.memory_bytes() <= 0.11 * fp32_bytes
    rows = ebc.group_rows()
    assert rows["rows_int1"] and rows["rows_int2"] and 0 < rows["rows_int4"] <= 0.02 * len(before)
    groups, after = _served_rows(ebc)
    assert {int(g) for g in groups.unique()} == {INT4, INT2, INT1}
    # Ranked by the counts (one dim: per byte alike): a more precise tier never holds a lower count.
    assert float(total[groups == INT4].min()) >= float(total[groups == INT2].max())
    assert float(total[groups == INT2].min()) >= float(total[groups == INT1].max())
    one = groups == INT1
    signs, magnitude = sign_magnitude_rows(before[one])
    a = ONE_BIT_MAGNITUDES[magnitude.long()]
    assert torch.equal(after[one], torch.where(signs.bool(), a, -a))  # +a or -a by the value's sign
    # a: the byte's magnitude nearest the row's mean magnitude (the lower on a tie): neighbours
    # are an eighth of an octave apart (9.05%), so a is within 4.53% of it
    mean_abs = before[one].abs().mean(1)
    nearest = (ONE_BIT_MAGNITUDES[None, :] - mean_abs[:, None]).abs().argmin(1)
    assert torch.equal(a[:, 0], ONE_BIT_MAGNITUDES[nearest])
    assert bool(((a[:, 0] - mean_abs).abs() <= 0.0453 * mean_abs).all())
    assert bool(((after[one] >= 0) == (before[one] >= 0)).all())
    err = ((after[one] - before[one]) ** 2).sum(1)
    mean_err = ((before[one] - before[one].mean(1, keepdim=True)) ** 2).sum(1)
    # Never worse than one level a row (mean|v| >= |mean v|), but for the magnitude's rounding.
    rounding = before.shape[1] * (a[:, 0] - mean_abs) ** 2
    assert bool((err <= mean_err * 1.001 + rounding * 1.001 + 1e-9).all())
    # Every row fits above int1: int1 is not used, and the rows are those of `int4 int2`.
    both = []
    for tiers in (("int4", "int2", "int1"), ("int4", "int2")):
        m, _ = load_trained_model(ckpt)
        regroup_for_serving(m, ServingTiers(tiers, 0.17, "model"), counts=counts)
        both.append(
            MixedPrecisionInferenceEmbeddingBagCollection.from_trained(m.model.sparse_arch.embedding_bag_collection)
        )
    assert torch.equal(both[0].weights, both[1].weights) and "rows_int1" not in both[0].group_rows()
    # The exact floor (every row int1, the ranked map whole, each group table's alignment) is
    # met at it, every row int1, and refused just below it, naming it.
    tiers = ("int4", "int2", "int1")
    floor = served_min_budget(16, tiers, len(before), len(configs))
    assert 0.0469 < floor < 0.055  # a 1-bit row is 3 bytes at dim 16 (4.69% of fp32), then the map
    m, _ = load_trained_model(ckpt)
    regroup_for_serving(m, ServingTiers(tiers, floor), counts=counts)
    at_floor = m.model.sparse_arch.embedding_bag_collection
    assert at_floor.group_rows()["rows_int1"] == len(before) and at_floor.memory_bytes() <= floor * fp32_bytes
    low, _ = load_trained_model(ckpt)
    with pytest.raises(BudgetError, match=rf"in int4, int2, int1 can reach at dim 16: {floor:.4f}".replace(".", r"\.")):
        regroup_for_serving(low, ServingTiers(tiers, floor - 1e-4), counts=counts)
    # Two tiers that all fit above int1: every row int2, in the export's own layout.
    m, _ = load_trained_model(ckpt)
    regroup_for_serving(m, ServingTiers(("int2", "int1"), 0.5), counts=counts)
    assert m.model.sparse_arch.embedding_bag_collection.group_rows()["rows_int2"] == len(before)
    # Nearest rounding changes the int4 and int2 rows' ranges, not the 1-bit rows (a sign has
    # no nearer code).
    m, _ = load_trained_model(ckpt)
    regroup_for_serving(m, ServingTiers(tiers, 0.11, "model", "nearest"), counts=counts)
    g_near, near = _served_rows(m.model.sparse_arch.embedding_bag_collection)
    assert torch.equal(g_near, groups) and torch.equal(near[one], after[one])
    assert not torch.equal(near[groups == INT2], after[groups == INT2])
    with pytest.raises(ValueError, match="int1 and dropped exclude each other"):
        ServingTiers(("int2", "int1", "dropped"), 0.1)
    with pytest.raises(ValueError, match="int1 holds the rows the tiers above it cannot"):
        ServingTiers(("int1",), 0.1)
    with pytest.raises(ValueError, match="int1 is planned over the whole model"):
        ServingTiers(("int2", "int1"), 0.1, "table")

    exported = tmp_path / "served"
    run_shark("export", str(ckpt), "--out", str(exported), "--tiers", "int4", "int2", "int1", "--memory-budget", "0.11")
    rec = json.loads((exported / "export.json").read_text())
    assert rec["rows_int1"] == rows["rows_int1"] and rec["inference_bytes"] == ebc.memory_bytes()
    serving = json.loads((exported / "serving.json").read_text())
    assert serving["max_abs_logit_diff_dev"] < 1e-5  # the scripted serving model reads 1-bit rows too
    # The served module against stock tables of its rows as the torch reference decodes them.
    assert rec["max_abs_logit_diff_dev"] < 1e-5
    trained_in_int1 = run_shark(
        "train", *TINY, "--precision", "shark", "--tiers", "int2", "int1", "--out", str(tmp_path / "t"), check=False
    )
    assert trained_in_int1.returncode != 0 and "int1 is a tier for serving only" in trained_in_int1.stderr


def test_fp32_model_serves_with_symmetric_rows(fp32_run, tmp_path):
    """`--tiers int4s int1`, `int2s int1`, `int4s int2s int1`: symmetric int4 and int2 rows (one
    scale byte, dim / 2 + 1 and dim / 4 + 1 bytes) above the 1-bit rows: ranked by the training
    split's counts, each the export's fitted row (`symmetric_rows`) as the served lookup reads
    it, more of them than int4 rows under the same budget, and where every row fits above int1
    the same rule one tier up; exported and scripted like any other tier; a set without int1, or
    training in them, is refused by name."""
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.precision.priority import INT1, INT2S, INT4S, row_bytes
    from shark_torchrec.precision.quantize import symmetric_rows, symmetric_values

    ckpt, model, data, configs, before, counts, total = _fp32_rows_and_counts(fp32_run)
    fp32_bytes = before.numel() * 4
    assert (row_bytes(16, INT4S), row_bytes(16, INT2S), row_bytes(64, INT2S)) == (9, 5, 17)

    def served(tiers, budget, rounding="fitted"):
        m, _ = load_trained_model(ckpt)
        regroup_for_serving(m, ServingTiers(tiers, budget, "model", rounding), counts=counts)
        ebc = m.model.sparse_arch.embedding_bag_collection
        assert 0.95 * budget * fp32_bytes <= ebc.memory_bytes() <= budget * fp32_bytes
        return ebc, ebc.group_rows(), *_served_rows(ebc)

    ebc, rows, groups, after = served(("int4s", "int1"), 0.11)
    assert rows["rows_int4s"] and rows["rows_int1"] and rows["rows_int4s"] + rows["rows_int1"] == len(before)
    assert {int(g) for g in groups.unique()} == {INT4S, INT1}
    assert float(total[groups == INT4S].min()) >= float(total[groups == INT1].max())
    sym = groups == INT4S
    assert torch.equal(after[sym], symmetric_values(*symmetric_rows(before[sym], 4), 4))
    assert torch.equal(served(("int4s", "int1"), 0.11, "nearest")[3], after)  # its scale byte is always fitted
    # The same budget in int4 (fp16 scale and bias, 12 bytes at dim 16) holds fewer 4-bit rows.
    assert served(("int4", "int1"), 0.11)[1]["rows_int4"] < rows["rows_int4s"]
    # int2s above int1 at a budget int2s alone cannot meet (5 bytes a row; 0.06 leaves 3.8).
    _, rows2, groups2, after2 = served(("int2s", "int1"), 0.06)
    assert rows2["rows_int2s"] and rows2["rows_int1"]
    assert float(total[groups2 == INT2S].min()) >= float(total[groups2 == INT1].max())
    sym2 = groups2 == INT2S
    assert torch.equal(after2[sym2], symmetric_values(*symmetric_rows(before[sym2], 2), 2))
    # Every row fits above int1 at 0.11: as many int4s rows as fit over int2s, no int1, the
    # budget spent to within one int4s row's extra bytes and the group tables' padding.
    ebc3, rows3, groups3, _ = served(("int4s", "int2s", "int1"), 0.11)
    assert rows3["rows_int4s"] and rows3["rows_int2s"] and "rows_int1" not in rows3
    assert 0.11 * fp32_bytes - ebc3.memory_bytes() < (9 - 5) + 2 * 3 + 1
    assert float(total[groups3 == INT4S].min()) >= float(total[groups3 == INT2S].max())
    with pytest.raises(ValueError, match="int4s .* is planned with int1 below"):
        ServingTiers(("int4s", "int2"), 0.2)
    with pytest.raises(ValueError, match="int2s .* is planned with int1 below"):
        ServingTiers(("int4", "int2s"), 0.2)
    with pytest.raises(ValueError, match="int4s and int2s are tiers for serving only"):
        PrecisionPolicy(mode="shark", tiers=("int4s", "int2s"))

    exported = tmp_path / "served"
    argv = ["--tiers", "int4s", "int2s", "int1", "--memory-budget", "0.07"]
    run_shark("export", str(ckpt), "--out", str(exported), *argv)
    rec = json.loads((exported / "export.json").read_text())
    assert rec["rows_int4s"] and rec["rows_int2s"] and rec["rows_int1"]
    serving = json.loads((exported / "serving.json").read_text())
    assert (serving["rows_int4s"], serving["rows_int2s"]) == (rec["rows_int4s"], rec["rows_int2s"])
    assert serving["max_abs_logit_diff_dev"] < 1e-5  # the scripted serving model reads them too
    assert rec["max_abs_logit_diff_dev"] < 1e-5  # against stock tables of the reference's rows


def test_one_tier_run_serves_in_tiers_ranked_by_its_training_split(tmp_path):
    """A one-tier run (every row int8, no priorities) is served like stock fp32 tables: its rows,
    as trained, ranked by their training split occurrences."""
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving, training_priorities
    from shark_torchrec.precision.priority import INT2, INT4

    run_shark(
        "train", *TINY, "--embedding-dim", "16", "--synthetic-train-rows", "1000", "--precision", "int8",
        "--out", str(tmp_path),
    )  # fmt: skip
    model, cfg = load_trained_model(tmp_path / "checkpoints")
    data = open_dataset(cfg.dataset, cfg.train.seed)
    trained = model.model.sparse_arch.embedding_bag_collection
    before = trained.stores[0].read_rows(torch.arange(trained.stores[0].num_rows))
    counts = training_priorities(trained.embedding_bag_configs(), data, 2.0)
    record = regroup_for_serving(model, ServingTiers(("int4", "int2"), 0.17, "model", "nearest"), data)
    assert record["serving_priorities"] == "training split occurrences"
    store = model.model.sparse_arch.embedding_bag_collection.stores[0]
    total = torch.cat([counts[t.name] for t in store.tables])
    groups = store.row_group
    assert float(total[groups == INT4].min()) >= float(total[groups == INT2].max())
    m = groups == INT4
    step = (before[m].max(1).values - before[m].min(1).values) / 15
    after = store.read_rows(torch.arange(store.num_rows))
    assert ((after[m] - before[m]).abs().max(1).values <= 0.5 * step * 1.01 + 1e-3).all()  # from the int8 values


def test_training_priorities_name_an_id_outside_its_table():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from shark_torchrec.data.batch import Batch
    from shark_torchrec.jobs.export import training_priorities

    class OneBatch:
        def batches(self, split, batch_size):
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=["f"], values=torch.tensor([1, 5]), lengths=torch.tensor([1, 1])
            )
            yield Batch(torch.zeros(2, 1), kjt, torch.tensor([1.0, 0.0]), torch.ones(2))

    configs = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4, feature_names=["f"])]
    with pytest.raises(ValueError, match=r"training split: feature f: id 5 is outside table t \(4 rows\)"):
        training_priorities(configs, OneBatch(), 2.0)
    other = [EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=9, feature_names=["g"])]
    with pytest.raises(ValueError, match=r"the training split has no feature g \(tables u\)"):
        training_priorities(configs + other, OneBatch(), 2.0)


def test_torchrec_int8_baseline_bytes_are_what_quantize_embeddings_allocates():
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.distributed.memory import torchrec_int8_bytes

    tables = [
        EmbeddingBagConfig(name=f"t{d}", embedding_dim=d, num_embeddings=50 + d, feature_names=[f"f{d}"])
        for d in (16, 64)
    ]
    for cfgs in ([tables[0]], [tables[1]]):
        q = quantize_embeddings(
            torch.nn.Sequential(EmbeddingBagCollection(tables=cfgs)), dtype=torch.qint8, inplace=False
        )
        allocated = sum(t.numel() * t.element_size() for t in q.state_dict().values())
        assert allocated == torchrec_int8_bytes((c.num_embeddings, c.embedding_dim) for c in cfgs)


def test_conversion_carries_optimizer_state_on_two_ranks(tmp_path):
    """--init-from into our module on 2 ranks: each table's row-wise momentum and the dense
    Adagrad state come from the fp32 checkpoint (a fresh state would undo its training)."""
    fp32, mp = tmp_path / "fp32", tmp_path / "mp"
    args = [*TINY, "--embedding-dim", "16", "--synthetic-train-rows", "3000"]
    run_shark("train", *args, "--out", str(fp32))
    run_shark(
        "train",
        *args,
        "--nproc",
        "2",
        "--precision",
        "shark",
        "--memory-budget",
        "0.6",
        "--init-from",
        str(fp32 / "checkpoints"),
        "--epochs",
        "0",
        "--out",
        str(mp),
    )
    a, b = load_full_state(fp32 / "checkpoints"), load_full_state(mp / "checkpoints")
    tables = [k for k in b["model"] if k.endswith(".momentum")]
    assert tables
    for key in tables:
        table = key.rsplit(".", 2)[-2]
        old = next(
            v
            for k, s in a["optim"]["state"].items()
            if k.endswith(f".{table}.weight")
            for n, v in s.items()
            if n.endswith("momentum1")
        )
        torch.testing.assert_close(b["model"][key], old[:, None].expand_as(b["model"][key]), rtol=0, atol=0)
    dense = [k for k in a["optim"]["state"] if ".over_arch." in k]
    assert dense
    for k in dense:
        torch.testing.assert_close(b["optim"]["state"][k]["sum"], a["optim"]["state"][k]["sum"], rtol=0, atol=0)


def test_export_serves_in_lower_tiers_chosen_by_the_trained_priorities(shark_run, tmp_path):
    """`shark export --tiers int8 int4 int2 dropped --memory-budget 0.14`: the rows of a model
    trained in fp32/fp16/int8 are put into the serving tiers by their trained priorities (a
    row never gets a less precise tier than a lower-ranked one), each quantized from its
    trained value (`nearest`: within half a step; `fitted`, the default: the same tiers, a
    smaller error per tier), dropped rows read their table's mean row, the bytes fit the
    budget, and the export serves exactly the regrouped model."""
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving
    from shark_torchrec.precision.priority import DROPPED, INT_BITS, per_byte_scores

    out, _ = shark_run
    ckpt = out / "checkpoints"
    model, _ = load_trained_model(ckpt)
    trained = model.model.sparse_arch.embedding_bag_collection
    store0 = trained.stores[0]
    before = store0.read_rows(torch.arange(store0.num_rows))
    scores = store0.scores_now()
    record = regroup_for_serving(model, ServingTiers(("int8", "int4", "int2", "dropped"), 0.14, "model", "nearest"))
    assert record["serving_budget"] == 0.14
    store = model.model.sparse_arch.embedding_bag_collection.stores[0]
    groups = store.row_group
    assert bool((groups == DROPPED).any()) and bool(
        (groups == 4).any()
    )  # 0.14 is below the int2 floor (0.19 at dim 16)
    fp32 = sum(c.num_embeddings * c.embedding_dim * 4 for c in trained.embedding_bag_configs())
    # The budget holds for what is served (with the ranked row map, under 0.7 bytes a row), and
    # the bytes its map frees against the store's 4-byte one go to the rows: the store itself
    # (int32 map) is over 0.14, the served model just under it.
    served = MixedPrecisionInferenceEmbeddingBagCollection.from_trained(
        model.model.sparse_arch.embedding_bag_collection
    )
    assert 0.135 * fp32 <= served.memory_bytes() <= 0.14 * fp32
    assert sum(b["embedding_bytes"] for b in store.table_bytes()) > 0.14 * fp32
    # Ranked by the trained priorities (per byte, as ranked: one dim here): every kept row outranks every dropped one.
    per_byte = per_byte_scores(scores, store.dim)
    assert float(per_byte[groups != DROPPED].min()) >= float(per_byte[groups == DROPPED].max())
    after = store.read_rows(torch.arange(store.num_rows))
    for g, bits in INT_BITS.items():
        m = groups == g
        if bool(m.any()):
            step = (before[m].max(1).values - before[m].min(1).values) / ((1 << bits) - 1)
            assert ((after[m] - before[m]).abs().max(1).values <= 0.5 * step * 1.01 + 1e-3).all(), (
                g
            )  # to nearest (fp16 scale/bias)
    for i in range(len(store.tables)):
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        mine = (groups[lo:hi] == DROPPED).nonzero().flatten() + lo
        if len(mine):
            assert torch.allclose(after[mine], before[mine].mean(0).expand(len(mine), -1), atol=1e-6)
    # Fitted rounding (the default): the same rows in the same tiers, each integer tier closer to the trained values.
    fitted_model, _ = load_trained_model(ckpt)
    regroup_for_serving(fitted_model, ServingTiers(("int8", "int4", "int2", "dropped"), 0.14, "model", "fitted"))
    fitted_store = fitted_model.model.sparse_arch.embedding_bag_collection.stores[0]
    assert torch.equal(fitted_store.row_group, groups)
    fitted = fitted_store.read_rows(torch.arange(store.num_rows))
    for g in INT_BITS:
        m = groups == g
        assert float(((fitted[m] - before[m]) ** 2).sum()) <= float(((after[m] - before[m]) ** 2).sum()), g
    m = groups == 4
    assert float(((fitted[m] - before[m]) ** 2).sum()) < 0.9 * float(((after[m] - before[m]) ** 2).sum())  # int2
    exported = tmp_path / "served"
    run_shark(
        "export",
        str(ckpt),
        "--out",
        str(exported),
        "--tiers",
        "int8",
        "int4",
        "int2",
        "dropped",
        "--memory-budget",
        "0.14",
    )
    rec = json.loads((exported / "export.json").read_text())
    assert rec["max_abs_logit_diff_dev"] == 0.0 and rec["inference_bytes"] <= 0.14 * rec["fp32_bytes"]
    assert rec["rows_dropped"] == int((groups == DROPPED).sum()) and rec["serving_tiers"] == [
        "int8",
        "int4",
        "int2",
        "dropped",
    ]
    assert rec["serving_rounding"] == "fitted"
    from shark_torchrec.precision.priority import BudgetError

    low_model, _ = load_trained_model(ckpt)
    with pytest.raises(BudgetError, match=r"below what a served model in int4, int2 can reach at dim 16: 0\.129\d"):
        regroup_for_serving(low_model, ServingTiers(("int4", "int2"), 0.1, "model"))
    bad = run_shark("export", str(ckpt), "--out", str(tmp_path / "x"), "--tiers", "int4", check=False)
    assert bad.returncode == 2 and "--tiers and --memory-budget go together" in bad.stderr


@pytest.mark.parametrize("flags", [["--rounding", "nearest"], ["--budget-scope", "table"]])
def test_serving_flags_without_tiers_are_refused_not_ignored(flags, tmp_path, capsys):
    """Without --tiers the rows are served as trained: --rounding and --budget-scope were
    dropped without a word (a newcomer's walkthrough), where --memory-budget was refused."""
    from shark_torchrec.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"), *flags])
    assert e.value.code == 2
    assert "--budget-scope and --rounding go with --tiers" in capsys.readouterr().err


def test_the_serving_budget_gives_the_rows_what_the_ranked_map_frees():
    """`serving_store_budget`: model-wide, the store's rule gets the bytes the ranked map saves
    against the int32 map, less its fixed bytes; per table, a tiny table does not cancel the
    raise for the others; a budget near the policy's bound is clamped to it."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from shark_torchrec.jobs.export import ServingTiers, serving_store_budget
    from shark_torchrec.kernels.ranked_map import ranked_map_bytes_per_row

    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=16, feature_names=[f"f{i}"])
        for i, n in enumerate((3, 6400))
    ]
    fp32 = 6403 * 16 * 4
    per_row = ranked_map_bytes_per_row(2, True)
    fixed = (6464 - 6403) * per_row + 2 * 16 + 8
    model = serving_store_budget(ServingTiers(("int4", "int2", "dropped"), 0.1, "model"), tables)
    assert model == pytest.approx(0.1 + (6403 * (4 - per_row) - fixed) / fp32)
    table = serving_store_budget(ServingTiers(("int4", "int2", "dropped"), 0.1, "table"), tables)
    assert table == pytest.approx(0.1 + (4 - per_row) / 64 - fixed / fp32) and table > 0.15
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):  # a fraction: 1.49 never reaches the store
        ServingTiers(("int8", "int4"), 1.49, "model")


def test_a_model_with_trained_priorities_serves_with_one_bit_rows(shark_run):
    """The trained route of `--tiers ... int1`: rows ranked by their end-of-training priorities
    (per byte, as the store ranks them), each 1-bit row from the value it served in training."""
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving
    from shark_torchrec.precision.priority import INT1, INT2, per_byte_scores
    from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, sign_magnitude_rows

    out, _ = shark_run
    model, _ = load_trained_model(out / "checkpoints")
    store = model.model.sparse_arch.embedding_bag_collection.stores[0]
    before = store.read_rows(torch.arange(store.num_rows))
    score = per_byte_scores(store.scores_now().float(), store.dim)
    record = regroup_for_serving(model, ServingTiers(("int2", "int1"), 0.11, "model"))
    assert record["serving_priorities"] == "trained"
    ebc = model.model.sparse_arch.embedding_bag_collection
    groups, after = _served_rows(ebc)
    # The store's keys are its tables back to back, as the configs list them (one store here).
    assert ebc.memory_bytes() <= 0.11 * before.numel() * 4
    assert float(score[groups == INT2].min()) >= float(score[groups == INT1].max())
    one = groups == INT1
    signs, magnitude = sign_magnitude_rows(before[one])
    a = ONE_BIT_MAGNITUDES[magnitude.long()]
    assert torch.equal(after[one], torch.where(signs.bool(), a, -a))


@pytest.mark.parametrize("tiers", [("int4", "int2"), ("int4", "int2", "int1")])
@pytest.mark.parametrize("change", ["pooling", "dim"])
def test_tables_one_served_module_cannot_hold_are_refused_before_ranking(fp32_run, tiers, change):
    """A collection of tables of several poolings or dims is refused, naming every table, before
    the pass over the training split that ranks the rows (here no data is given: that pass
    would have been refused otherwise, for want of data)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving

    model, _ = load_trained_model(fp32_run / "checkpoints")
    configs = model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    odd = configs[-1]
    configs[-1] = EmbeddingBagConfig(
        num_embeddings=odd.num_embeddings,
        embedding_dim=odd.embedding_dim * (2 if change == "dim" else 1),
        name=odd.name,
        feature_names=odd.feature_names,
        pooling=PoolingType.MEAN if change == "pooling" else odd.pooling,
    )
    model.model.sparse_arch.embedding_bag_collection = EmbeddingBagCollection(tables=configs)
    want = "mean" if change == "pooling" else f"dim {odd.embedding_dim * 2}"
    with pytest.raises(
        NotImplementedError,
        match=rf"one dim and one pooling .*{odd.name} \({'dim .*, mean' if change == 'pooling' else want}",
    ):
        regroup_for_serving(model, ServingTiers(tiers, 0.2, "model"))


def test_a_collection_that_is_not_an_embedding_bag_collection_is_refused_by_name(fp32_run):
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving

    model, _ = load_trained_model(fp32_run / "checkpoints")
    model.model.sparse_arch.embedding_bag_collection = torch.nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match="cannot serve a Linear in tiers: not an EmbeddingBagCollection"):
        regroup_for_serving(model, ServingTiers(("int4", "int2"), 0.2, "model"))


def test_serving_tiers_and_budget_are_checked_by_name(fp32_run, tmp_path):
    """A misspelled tier is named as unknown, a tier given twice as such; a budget outside
    (0, 1] is refused (6 reads as 6%, with the fraction to give); a refused `shark export`
    leaves no empty --out folder behind."""
    from shark_torchrec.jobs.export import ServingTiers
    from shark_torchrec.modules.precision_policy import PrecisionPolicy

    with pytest.raises(
        ValueError, match=r"unknown tier 'imt1'; the tiers are fp32, fp16, int8, int4, int2, dropped, int1"
    ):
        ServingTiers(("int4", "imt1"), 0.06)
    with pytest.raises(ValueError, match=r"int4 given more than once"):
        ServingTiers(("int4", "int4", "int1"), 0.06)
    with pytest.raises(ValueError, match=r"unknown tier 'int3'"):
        PrecisionPolicy(tiers=("int8", "int3"))
    with pytest.raises(ValueError, match=r"serving budget 6: a fraction .* in \(0, 1\] \(for 6% give 0\.06\)"):
        ServingTiers(("int4", "int1"), 6)
    with pytest.raises(ValueError, match=r"serving budget 0: a fraction"):
        ServingTiers(("int4", "int1"), 0.0)
    out = tmp_path / "never"
    ckpt = str(fp32_run / "checkpoints")
    bad = run_shark("export", ckpt, "--out", str(out), "--tiers", "int4", "int1", "--memory-budget", ".01", check=False)
    assert bad.returncode == 2 and "can reach at dim 16" in bad.stderr and not out.exists()
    kept = tmp_path / "own"
    kept.mkdir()
    tiers = ["--tiers", "int4", "imt1", "--memory-budget", ".06"]
    bad = run_shark("export", ckpt, "--out", str(kept), *tiers, check=False)
    assert bad.returncode == 2 and "unknown tier 'imt1'" in bad.stderr and kept.is_dir()  # the user's own folder stays


def test_export_refuses_bad_input_before_any_work(fp32_run, tmp_path):
    """An --out that is (or runs through) a file, a budget given as a percentage or below the tiers' floor, and a
    run directory given for its checkpoints: each refused by name before the training split is
    read (no priority pass: its progress bar never shows), nothing written."""
    ckpt = fp32_run / "checkpoints"
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    tiers = ["--tiers", "int4", "int1"]
    cases = [
        ([str(ckpt), "--out", str(afile), *tiers, "--memory-budget", "0.1"], f"--out {afile} is a file"),
        (
            [str(ckpt), "--out", str(afile / "sub"), *tiers, "--memory-budget", "0.1"],
            f"--out {afile / 'sub'} runs through {afile}, a file",
        ),
        ([str(ckpt), "--out", str(tmp_path / "a"), *tiers, "--memory-budget", "6%"], "for 6% give 0.06"),
        (
            [str(ckpt), "--out", str(tmp_path / "b"), *tiers, "--memory-budget", "0.03"],
            "serving budget 0.03 is below what a served model in int4, int1 can reach at dim 16: 0.05",
        ),
        (  # one floor named, the served one (not the store's own terms beside it)
            [str(ckpt), "--out", str(tmp_path / "f"), "--tiers", "int4", "int2", "--memory-budget", "0.1"],
            "serving budget 0.1 is below what a served model in int4, int2 can reach at dim 16: 0.1290 of fp32 "
            "with the ranked row map\n",
        ),
        (
            [str(fp32_run), "--out", str(tmp_path / "c"), *tiers, "--memory-budget", "0.1"],
            f"its checkpoints are in {ckpt}",
        ),
        (
            [str(ckpt), "--out", str(tmp_path / "d"), "--tiers", "int4", "int1", "dropped", "--memory-budget", "0.1"],
            "int1 and dropped exclude each other (int1 holds the rows the other tiers cannot, a sign bit a value",
        ),
        (
            [str(ckpt), "--out", str(tmp_path / "e"), "--tiers", "int8", "--memory-budget", "0.3"],
            "--tiers ranks rows into 2 or more tiers, got int8",
        ),
    ]
    for argv, named in cases:
        proc = run_shark("export", *argv, check=False)
        assert proc.returncode == 2 and named in proc.stderr, (argv, proc.stderr)
        assert "row priorities" not in proc.stderr and "Traceback" not in proc.stderr, argv
    assert afile.read_text() == "keep me"
    assert not any((tmp_path / d).exists() for d in "abcdef")


def test_the_priority_pass_shows_progress_unless_told_not_to(fp32_run, capsys):
    """`shark export --no-progress` (and `shark compress --no-progress`) reach the pass that
    counts a stock model's rows: its progress bar shows only with progress on."""
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import counted_priorities

    model, cfg = load_trained_model(fp32_run / "checkpoints")
    data = open_dataset(cfg.dataset, cfg.train.seed)
    quiet = counted_priorities(model, data, progress=False)
    assert "row priorities" not in capsys.readouterr().err
    loud = counted_priorities(model, data)
    assert "row priorities" in capsys.readouterr().err
    assert all(torch.equal(quiet[k], loud[k]) for k in loud)


def test_trained_rows_load_without_a_state_dict(shark_run):
    """The export loads a trained model's rows from `_trained_rows_state` (rows decoded a block
    at a time, per-row values broadcast) where it took `state_dict()`: the same store, byte for
    byte, scores and optimizer state alike."""
    from shark_torchrec.jobs.export import _trained_rows_state
    from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection

    out, _ = shark_run
    model, _ = load_trained_model(out / "checkpoints")
    trained = model.model.sparse_arch.embedding_bag_collection
    assert len({int(g) for g in trained.stores[0].row_group.unique()}) == 3

    def fresh():
        return MixedPrecisionEmbeddingBagCollection(
            trained.embedding_bag_configs(), trained.precision_policy, device=torch.device("cpu")
        )

    want, got = fresh(), fresh()
    want.load_state_dict(trained.state_dict())
    got.load_state_dict(_trained_rows_state(trained))
    for a, b in zip(want.stores, got.stores):
        for name in ("weights", "row_map", "row_priority", "row_seen_step", "momentum"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert got.step_counter.value == trained.step_counter.value > 0


def test_a_model_whose_data_folder_moved_exports_with_data(tmp_path):
    """A checkpoint's data folder moved: `shark export` named the old folder, and `--data`,
    which the error named, was not a flag of export (a newcomer's walkthrough). `--data` gives
    the new place; other data, whose vocabulary does not size the model's tables, is refused."""
    import random
    import shutil

    def write(root, values):
        root.mkdir()
        rng = random.Random(0)
        for split, n in (("train", 200), ("dev", 60), ("test", 60)):
            lines = [f"{rng.randint(0, 1)},{rng.choice(values)},{rng.choice(values)}" for _ in range(n)]
            (root / f"{split}.csv").write_text("click,a,b\n" + "\n".join(lines) + "\n")

    old = tmp_path / "data"
    write(old, ["x", "y", "z"])
    data_flags = ["--label", "click", "--embedding-dim", "8", "--epochs", "1", "--batch-size", "32"]
    run = tmp_path / "run"
    run_shark("train", "--data", f"csv:{old}", *data_flags, "--precision", "int8", "--out", str(run))
    new = tmp_path / "moved"
    shutil.move(old, new)
    lost = run_shark("export", str(run / "checkpoints"), "--out", str(tmp_path / "e0"), check=False)
    assert lost.returncode == 2 and f"{old}" in lost.stderr
    run_shark("export", str(run / "checkpoints"), "--out", str(tmp_path / "e1"), "--data", f"csv:{new}")
    assert (tmp_path / "e1" / "export.json").is_file()
    write(tmp_path / "other", ["x", "y", "z", "w", "v"])
    other = run_shark(
        "export",
        str(run / "checkpoints"),
        "--out",
        str(tmp_path / "e2"),
        "--data",
        f"csv:{tmp_path / 'other'}",
        check=False,
    )
    assert other.returncode == 2 and "not the data this model was trained on (field a: 6 rows, the model's table 4" in (
        other.stderr
    ), other.stderr[-1500:]


def test_serving_tiers_are_kept_most_precise_first():
    """`--tiers int1 int4` was accepted and recorded in that order (a newcomer's walkthrough),
    though the rows are planned by precision: the record now says what is served, in order."""
    from shark_torchrec.jobs.export import ServingTiers

    assert ServingTiers(("int1", "int4"), 0.1).tiers == ("int4", "int1")
    assert ServingTiers(("int2", "int8", "dropped", "int4"), 0.2, "table").tiers == ("int8", "int4", "int2", "dropped")
    assert ServingTiers(("int2s", "int1", "int4s"), 0.05).tiers == ("int4s", "int2s", "int1")


def test_an_unrelated_base_checkpoint_is_refused(shark_run, tmp_path):
    """`--base-checkpoint` is the uncompressed model, for the bytes beside the export; an
    unrelated model's (a synthetic 81 MB one beside a frappe export, in a newcomer's
    walkthrough) were reported as its base. Tables that are not this model's are refused."""
    out, _ = shark_run
    other = tmp_path / "other"
    run_shark("train", *TINY, "--embedding-dim", "8", "--out", str(other))
    bad = run_shark(
        "export",
        str(out / "checkpoints"),
        "--out",
        str(tmp_path / "e"),
        "--base-checkpoint",
        str(other / "checkpoints"),
        check=False,
    )
    assert bad.returncode == 2 and "is not this model's uncompressed base (t_" in bad.stderr, bad.stderr[-2000:]
    run_shark(
        "export", str(out / "checkpoints"), "--out", str(tmp_path / "e2"), "--base-checkpoint", str(out / "checkpoints")
    )
