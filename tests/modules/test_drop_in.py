"""What a TorchRec user expects of a drop-in collection: defaults that work, TorchRec's
fused_params honoured, steps that end with the backward pass, labels handed over by a train
pipeline (or a warning), optimizer state in `fused_optimizer`, no meta parameters, errors from
spawned ranks as one line; and a model of the user's own on 2 ranks (examples/own_model.py)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import ROOT, TINY, run_shark
from shark_torchrec.modules.mixed_precision import (
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
)
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.labels import tag_labels
from shark_torchrec.precision.priority import FP32, BudgetError, min_budget


def bag_tables(dim=16, rows=(200, 50)):
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate(rows)
    ]


def kjt(ids_per_feature, lengths=None):
    keys = [f"f{i}" for i in range(len(ids_per_feature))]
    values = torch.cat([torch.as_tensor(v) for v in ids_per_feature])
    if lengths is None:
        lengths = torch.ones(len(values), dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


# --- defaults -----------------------------------------------------------------


@pytest.mark.parametrize("dim, budget", [(16, 0.43), (64, 0.35), (8, 0.55)])
def test_default_policy_works_at_every_dim(dim, budget):
    """PrecisionPolicy() with no budget: the reachable floor for the dims plus a margin (0.35
    where int8 leaves room for it), and the bytes stay within it."""
    ebc = MixedPrecisionEmbeddingBagCollection(
        bag_tables(dim, (4000,)), device=torch.device("cpu"), precision_policy=PrecisionPolicy()
    )
    store = ebc.stores[0]
    assert ebc._unsharded_policy.memory_budget == budget > min_budget(dim)
    assert store.table_bytes()[0]["embedding_bytes"] <= budget * 4000 * dim * 4
    assert all(c > 0 for c in store.group_counts()), store.group_counts()


def test_unsharded_precision_memory_reports_each_table():
    """`precision_memory()` unsharded, as the sharded module reports it: every row counted once
    in its group, the bytes within the budget."""
    ebc = MixedPrecisionEmbeddingBagCollection(
        bag_tables(16, (300, 200)), device=torch.device("cpu"), precision_policy=PrecisionPolicy(memory_budget=0.5)
    )
    report = ebc.precision_memory()
    assert sorted(report) == ["t0", "t1"]
    for name, rows in (("t0", 300), ("t1", 200)):
        r = report[name]
        assert sum(v for k, v in r.items() if k.startswith("rows_")) == rows and r["rows_int8"] > 0
        # FBGEMM's default optimizer without fused_params is SGD: no state; Eq. 7 keeps 8 bytes a row.
        assert (
            r["embedding_bytes"] <= 0.5 * rows * 16 * 4
            and r["optimizer_bytes"] == 0
            and r["priority_bytes"] == rows * 8
        )


def test_explicit_budget_below_the_floor_is_refused_when_the_module_is_built():
    with pytest.raises(BudgetError, match="below what tables of dim 16 can reach: .* 0.375"):
        MixedPrecisionEmbeddingBagCollection(bag_tables(16), precision_policy=PrecisionPolicy(memory_budget=0.35))


@pytest.mark.parametrize("precision", ["shark", "freq", "fp16", "int8"])
def test_every_precision_trains_with_no_other_flag(tmp_path, precision):
    """At the default dim (16), where the old default budget 0.35 was out of reach."""
    args = [a for a in TINY if a not in ("--embedding-dim", "8")]
    out = tmp_path / precision
    run_shark(
        "train",
        *args,
        "--synthetic-train-rows",
        "1000",
        "--precision",
        precision,
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["embedding_bytes"] < m["fp32_embedding_bytes"]
    if precision in ("shark", "freq"):
        assert m["embedding_bytes"] <= 0.43 * m["fp32_embedding_bytes"]


def test_errors_from_spawned_ranks_are_the_one_line_of_one_rank(tmp_path):
    """A checkpoint that does not exist, found inside the ranks: the same one line, exit 2."""
    outputs = {}
    for nproc in ("1", "2"):
        proc = run_shark(
            "train",
            *TINY,
            "--nproc",
            nproc,
            "--checkpoint",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / f"run{nproc}"),
            check=False,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("shark train: error:")]
        assert lines and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        outputs[nproc] = lines[0]
    assert outputs["1"] == outputs["2"]
    assert "no checkpoint found" in outputs["1"]


def test_spawned_ranks_share_the_cores(monkeypatch):
    """`--nproc N` ranks run the cores shared out, at least one thread a rank (torch would give
    each rank every core: two ranks of two threads on two cores trained 3x slower), unless
    OMP_NUM_THREADS says otherwise (then torch reads it)."""
    from helpers.light_workers import threads_of_rank
    from shark_torchrec.distributed.env import launch, rank_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert rank_threads(2) == max(1, cores // 2) and rank_threads(2 * cores) == 1
    assert launch(threads_of_rank, 2) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_threads(2) is None


# --- TorchRec semantics ---------------------------------------------------------


def test_no_parameter_is_exposed():
    for module in (
        MixedPrecisionEmbeddingBagCollection(bag_tables()),
        MixedPrecisionEmbeddingBagCollection(bag_tables(), device=torch.device("cpu")),
        MixedPrecisionEmbeddingCollection(
            [EmbeddingConfig(name="s", embedding_dim=8, num_embeddings=30, feature_names=["q"])]
        ),
    ):
        assert list(module.parameters()) == []
        assert not any(t.is_meta for t in module.buffers())


def test_fused_params_set_the_update_and_unsupported_ones_are_refused():
    policy = PrecisionPolicy(mode="fp32")
    sgd = policy.resolved([16], {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.3, "eps": 1e-6})
    assert (sgd.optimizer, sgd.learning_rate, sgd.eps) == ("sgd", 0.3, 1e-6)
    adagrad = policy.resolved([16], {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})
    assert (adagrad.optimizer, adagrad.learning_rate) == ("rowwise_adagrad", 0.01)  # FBGEMM's default lr
    # The enum's value as a string names it too ("exact_row_wise_adagrad", as configs spell it).
    assert policy.resolved([16], {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD.value}).optimizer == "rowwise_adagrad"
    plain = policy.resolved([16])
    assert (plain.optimizer, plain.learning_rate, plain.eps) == ("sgd", 0.01, 1e-8)  # FBGEMM's defaults
    with pytest.raises(ValueError, match="optimizer ADAM is not supported"):
        policy.resolved([16], {"optimizer": EmbOptimType.ADAM})
    with pytest.raises(ValueError, match=r"fused_params \['momentum'\] are not supported"):
        policy.resolved([16], {"momentum": 0.9})
    with pytest.raises(ValueError, match="learning_rate=0.5 contradicts"):
        PrecisionPolicy(learning_rate=0.5).resolved([16], {"learning_rate": 0.1})
    # The optimizer state's dtype, as FBGEMM takes it.
    assert plain.momentum_dtype == "fp32"
    half_state = {
        "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "optimizer_state_dtypes": {"momentum1": SparseType.BF16},
    }
    assert policy.resolved([16], half_state).momentum_dtype == "bf16"
    with pytest.raises(ValueError, match="momentum1=fp16 is not supported"):
        policy.resolved([16], {"optimizer_state_dtypes": {"momentum1": SparseType.FP16}})
    with pytest.raises(ValueError, match="momentum_dtype='fp32' contradicts"):
        PrecisionPolicy(momentum_dtype="fp32").resolved([16], half_state)
    with pytest.raises(ValueError, match="momentum_dtype bf16 is row-wise Adagrad's state; optimizer sgd keeps none"):
        PrecisionPolicy(momentum_dtype="bf16", optimizer="sgd").resolved([16])
    with pytest.raises(ValueError, match="optimizer_state_dtypes of momentum2"):
        policy.resolved([16], {"optimizer_state_dtypes": {"momentum2": SparseType.BF16}})


def test_the_sharded_update_uses_the_sharders_fused_learning_rate():
    """One SGD step through DMP with fused_params lr = 0.25: an fp32 row moves by -0.25 x its
    gradient (the policy sets no learning rate)."""
    from shark_torchrec.distributed.env import launch

    got = launch(_one_step, 1, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.25})
    torch.testing.assert_close(got["after"], got["before"] - 0.25 * got["grad"], rtol=0, atol=1e-6)
    assert got["policy_lr"] == 0.25


def test_the_sharders_fused_optimizer_state_dtype_keeps_a_bf16_state():
    """FBGEMM's way of asking for a 2-byte optimizer state, through DMP: the rows keep bf16
    Adagrad state (TorchRec's table grouping would not take the nested dict)."""
    fused = {
        "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "learning_rate": 0.25,
        "optimizer_state_dtypes": {"momentum1": SparseType.BF16},
    }
    from shark_torchrec.distributed.env import launch

    got = launch(_one_step, 1, fused)
    assert got["momentum_dtype"] == torch.bfloat16 and got["optimizer_bytes"] == 20 * 2
    assert not torch.equal(got["after"], got["before"])  # the row trained


def _one_step(fused_params: dict):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
    from shark_torchrec.distributed.mixed_precision import MixedPrecisionEmbeddingBagCollectionSharder

    init_distributed()
    try:
        ebc = MixedPrecisionEmbeddingBagCollection(bag_tables(8, (20,)), precision_policy=PrecisionPolicy(mode="fp32"))
        sharders = [MixedPrecisionEmbeddingBagCollectionSharder(fused_params=fused_params)]
        plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu")).collective_plan(
            ebc, sharders, dist.GroupMember.WORLD
        )
        dmp = DistributedModelParallel(
            ebc,
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=sharders,
        )
        module = dmp.module
        module.fill_rows(lambda t, r0, r1: torch.arange(r0 * 8, r1 * 8, dtype=torch.float32).view(-1, 8) / 100)
        before = module.state_dict()["embedding_bags.t0.weight"].local_shards()[0].tensor.clone()
        grad = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
        out = dmp(tag_labels(kjt([[3]]), torch.ones(1))).values()
        (out * grad).sum().backward()
        after = module.state_dict()["embedding_bags.t0.weight"].local_shards()[0].tensor
        expect = torch.zeros(20, 8)
        expect[3] = grad[0]
        store = next(iter(module.stores()))[0]
        return {
            "before": before,
            "after": after,
            "grad": expect,
            "policy_lr": module.precision_policy.learning_rate,
            "momentum_dtype": store.momentum.dtype,
            "optimizer_bytes": store.table_bytes()[0]["optimizer_bytes"],
        }
    finally:
        shutdown_distributed()


def test_a_step_ends_with_the_backward_pass_and_reassigns_when_due():
    """No step() call: the counter advances once per backward (not per forward, not in eval),
    and rows are regrouped by score every reassign_every steps."""
    policy = PrecisionPolicy(
        mode="shark", row_fractions=(0.01, 0.0), reassign_every=2, optimizer="sgd", learning_rate=0.1
    )
    ebc = MixedPrecisionEmbeddingBagCollection(
        bag_tables(16, (200,)), device=torch.device("cpu"), precision_policy=policy
    )
    store = ebc.stores[0]
    assert store.row_group[0] == FP32 and store.row_group[150] != FP32  # before any score: lowest ids
    hot = torch.tensor([150, 150, 7])
    batch = tag_labels(kjt([hot]), torch.ones(3))
    ebc(batch).values().sum().backward()
    assert ebc.step_counter.value == 1
    ebc(batch)  # a forward without backward is no step
    with torch.no_grad():
        ebc(batch)
    ebc.eval()
    out = ebc(batch).values().sum()
    out.backward()  # eval mode: no update, no step
    assert ebc.step_counter.value == 1
    ebc.train()
    assert store.row_group[150] != FP32
    ebc(batch).values().sum().backward()
    assert ebc.step_counter.value == 2
    assert store.row_group[150] == FP32 and store.row_group[0] != FP32  # regrouped at step 2


def test_missing_labels_warn_once_and_tagged_ones_do_not():
    ebc = MixedPrecisionEmbeddingBagCollection(
        bag_tables(), device=torch.device("cpu"), precision_policy=PrecisionPolicy(optimizer="sgd")
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ebc(tag_labels(kjt([[1], [2]]), torch.ones(1))).values().sum().backward()
    assert not [w for w in seen if "no labels" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            ebc(kjt([[1], [2]])).values().sum().backward()
    msgs = [str(w.message) for w in seen if "no labels" in str(w.message)]
    assert len(msgs) == 1 and "falls back to counting" in msgs[0] and "LabelTaggingTrainPipeline" in msgs[0]


def test_label_tagging_pipeline_tags_the_named_features():
    from shark_torchrec.data.batch import Batch
    from shark_torchrec.distributed.train_pipeline import tag_batch
    from shark_torchrec.precision.labels import split_tagged

    features = kjt([[1, 2], [3, 4]], torch.ones(4, dtype=torch.int32))
    batch = Batch(torch.zeros(2, 1), features, torch.tensor([1.0, 0.0]), torch.ones(2))
    tagged = tag_batch(batch, lambda b: b.labels)
    _, labels = split_tagged(tagged.sparse_features.weights())
    assert labels.tolist() == [1, 0, 1, 0]
    assert batch.sparse_features.weights_or_none() is None  # the original is left alone


# --- a model of the user's own ----------------------------------------------------


def test_own_model_example_on_two_ranks(tmp_path):
    """examples/own_model.py, as a user runs it: torchrun, 2 ranks, not DLRM, a bag and a
    sequence collection, our pipeline, DCP save and load into a fresh model. Its plan puts each
    collection's tables on one rank: the rank without a collection's rows ended its step (a
    collective reassignment) before the other ranks left that collection's gradient exchange,
    and every run hung until the step's end waited for the backward pass to finish."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "own_model.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # it takes about 30 s; a hang is what this test watches for
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    r = json.loads(lines[0])
    ranks = r["ranks_by_table"]
    assert ranks["user_id"] == ranks["user_tags"] != ranks["item_ids"] and len(ranks["item_ids"]) == 1, ranks
    assert r["world_size"] == 2 and r["steps"] == 40  # steps advanced with no optimizer call
    assert r["loss_last_quarter"] < r["loss_first_quarter"]
    assert all(n > 0 for n in r["rows_fp32_fp16_int8"]), r
    assert r["memory_budget"] == 0.43 and r["learning_rate"] == 0.05  # default budget, fused lr
    assert r["momentum_keys"] == ["item_ids.momentum1", "user_id.momentum1", "user_tags.momentum1"]
    assert r["reloaded_predictions_equal"] and r["reloaded_momentum_equal"]
    assert "no labels" not in proc.stderr


def test_under_torchrun_only_rank_zero_prints_the_result(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "apps" / "train.py"),
            *TINY,
            "--synthetic-train-rows",
            "1000",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"test_auc"') == 1, proc.stdout


def test_a_checkpoint_brings_its_data_model_and_precision(tmp_path):
    """`--checkpoint` alone is enough to score a trained model: the data, model and precision
    it was trained with are the defaults (the README's `shark importance --checkpoint` line)."""
    run = tmp_path / "run"
    run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "1000",
        "--synthetic-scale",
        "0.01",
        "--precision",
        "shark",
        "--memory-budget",
        "0.7",
        "--out",
        str(run),
    )
    out = tmp_path / "imp"
    run_shark(
        "importance",
        "--checkpoint",
        str(run / "checkpoints"),
        "--method",
        "permutation",
        "--no-progress",
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    saved = (out / "config.toml").read_text()
    for line in ('precision = "shark"', "memory_budget = 0.7", "synthetic_scale = 0.01", "embedding_dim = 8"):
        assert line in saved, line
    assert json.loads((out / "m.json").read_text())["method"] == "permutation"


def test_sharded_rows_start_from_torchrecs_law_not_zeros():
    """Right after DistributedModelParallel the rows hold TorchRec's default law (uniform within
    +-sqrt(1 / rows)), drawn by `initial_rows` from the policy's seed, as the unsharded module
    starts from that law too; they were all zeros unless `init_embedding_weights` was called."""
    from shark_torchrec.distributed.env import launch
    from shark_torchrec.modules.initial_rows import initial_rows

    got, again = launch(_rows_after_sharding, 1, 5, {"mode": "fp32"})
    for name, rows in (("t0", 20), ("t1", 300)):
        want = initial_rows(5, name, rows, 8, 0, rows)
        assert torch.equal(got[name], want), name
        assert got[name].abs().max() <= (1.0 / rows) ** 0.5 and got[name].std() > 0.2 * (1.0 / rows) ** 0.5
        assert torch.equal(again[name], want), name


def test_the_job_may_skip_writing_fresh_sharded_rows_again():
    """`init_embedding_weights` of the same seed writes what a freshly built sharded module
    already holds, in every tier (so the trainer skips it, `skip_fresh_mixed`)."""
    from shark_torchrec.distributed.env import launch

    got, again = launch(_rows_after_sharding, 1, 5, {"mode": "shark", "row_fractions": (0.2, 0.3)})
    for name in ("t0", "t1"):
        assert torch.equal(got[name], again[name]), name


def _rows_after_sharding(seed: int, policy: dict) -> tuple:
    """(rows right after DistributedModelParallel, rows after `init_embedding_weights` of `seed`)."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
    from shark_torchrec.distributed.mixed_precision import MixedPrecisionEmbeddingBagCollectionSharder
    from shark_torchrec.distributed.sharding import init_embedding_weights

    init_distributed()
    try:
        ebc = MixedPrecisionEmbeddingBagCollection(
            bag_tables(8, (20, 300)), precision_policy=PrecisionPolicy(**policy, seed=seed)
        )
        sharders = [MixedPrecisionEmbeddingBagCollectionSharder()]
        plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu")).collective_plan(
            ebc, sharders, dist.GroupMember.WORLD
        )
        dmp = DistributedModelParallel(
            ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=torch.device("cpu"), plan=plan,
            sharders=sharders,
        )  # fmt: skip

        def rows() -> dict:
            state = dmp.module.state_dict()
            return {t: state[f"embedding_bags.{t}.weight"].local_shards()[0].tensor.clone() for t in ("t0", "t1")}

        built = rows()
        init_embedding_weights(dmp, {c.name: c for c in ebc.embedding_bag_configs()}, seed)
        return built, rows()
    finally:
        shutdown_distributed()


def test_a_checkpoint_in_tiers_the_policy_does_not_keep_is_refused_by_name():
    """Loaded as they were, a checkpoint's fp32 and fp16 rows sat in an int8-only collection for
    good (a one-tier module never regroups), at 0.57 of fp32 where the policy and the planner
    counted 0.31, with no sign. The tiers it keeps load as before."""
    from shark_torchrec.modules.precision_policy import PolicyError

    def built(policy):
        m = MixedPrecisionEmbeddingBagCollection(bag_tables(), precision_policy=policy)
        m.materialize(torch.device("cpu"))
        return m

    saved = built(PrecisionPolicy(memory_budget=0.9)).state_dict()
    into = built(PrecisionPolicy(mode="int8"))
    before = into.state_dict()
    with pytest.raises(PolicyError, match=r"table t0 has \d+ fp32, \d+ fp16 rows, .* \(it keeps int8\)"):
        into.load_state_dict(saved)
    same = built(PrecisionPolicy(memory_budget=0.5))
    same.load_state_dict(saved)
    assert torch.equal(same.state_dict()["embedding_bags.t0.weight"], saved["embedding_bags.t0.weight"])
    assert before.keys() == into.state_dict().keys()


def test_arguments_of_the_wrong_kind_are_refused_by_name():
    """A config of the other collection's kind, a policy given as a dict or with a number as a
    string, fused_params our update does not implement (refused by the sharder itself, on
    every rank), and serving built from what cannot be served: each names the problem, where
    they failed on a missing attribute, in a comparison, in the planner on rank 0 alone, or
    not at all."""
    from shark_torchrec.distributed.mixed_precision import MixedPrecisionEmbeddingBagCollectionSharder
    from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection as Served
    from shark_torchrec.modules.precision_policy import PolicyError

    sequence = [EmbeddingConfig(name="s", embedding_dim=16, num_embeddings=10, feature_names=["f"])]
    with pytest.raises(TypeError, match="table 's' is a EmbeddingConfig; this collection takes EmbeddingBagConfig"):
        MixedPrecisionEmbeddingBagCollection(sequence)
    with pytest.raises(TypeError, match="table 't0' is a EmbeddingBagConfig; this collection takes EmbeddingConfig"):
        MixedPrecisionEmbeddingCollection(bag_tables())
    with pytest.raises(TypeError, match="precision_policy must be a PrecisionPolicy, not dict"):
        MixedPrecisionEmbeddingBagCollection(bag_tables(), precision_policy={"memory_budget": 0.5})
    with pytest.raises(PolicyError, match="memory_budget must be a number, got '0.5'"):
        PrecisionPolicy(memory_budget="0.5")
    with pytest.raises(PolicyError, match="reassign_every must be an int, got 10.0"):
        PrecisionPolicy(reassign_every=10.0)
    with pytest.raises(PolicyError, match=r"fused_params \['momentum'\] are not supported"):
        MixedPrecisionEmbeddingBagCollectionSharder(fused_params={"momentum": 0.9})
    with pytest.raises(RuntimeError, match="holds no rows: call materialize"):
        Served.from_trained(MixedPrecisionEmbeddingBagCollection(bag_tables()))
    with pytest.raises(TypeError, match="not MixedPrecisionEmbeddingCollection"):
        Served.from_trained(MixedPrecisionEmbeddingCollection(sequence))
