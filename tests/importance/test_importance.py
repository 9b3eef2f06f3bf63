"""F-Permutation: Taylor scores, the Permutation baseline, pruning and the planner hook."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torchrec.models.dlrm import SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from conftest import TINY, run_shark
from helpers import prune_workers as PW
from shark_torchrec.config import DataConfig, ModelConfig, parse_cli
from shark_torchrec.data import open_dataset
from shark_torchrec.distributed.env import launch
from shark_torchrec.importance import model_scoring
from shark_torchrec.importance.model_scoring import METHODS, FieldView, score_fields
from shark_torchrec.importance.scores import (
    ABSOLUTE,
    SIGNED,
    TaylorSums,
    accumulate_gradients,
    accumulate_jagged,
    accumulate_values,
    permutation_index,
    taylor_scores,
)
from shark_torchrec.jobs import prune as prune_job_module
from shark_torchrec.jobs.checkpoint import load_full_state
from shark_torchrec.models.dlrm import build_dlrm, table_configs

# --- the math, on per-sample losses linear in the field vectors (the first-order term is exact) ---


def brute_force(v, a, weights):
    """Expected loss change per field when v_i is replaced by a draw from its empirical
    distribution (paper Eq. 1-2), for per-sample losses loss_n(v_n) = sum_i a[n, i] . v_n,i:
    signed and absolute means."""
    keep = weights > 0
    real, coef = v[keep], a[keep]
    n, nf, _ = real.shape
    signed, absolute = torch.zeros(nf, dtype=torch.float64), torch.zeros(nf, dtype=torch.float64)
    for x in range(n):
        loss = lambda y: (y * coef[x]).sum((-1, -2))  # noqa: E731 -- sample x's own loss
        for i in range(nf):
            swapped = real[x].expand(n, -1, -1).clone()
            swapped[:, i] = real[:, i]  # every candidate value of field i, equally likely
            change = (loss(swapped) - loss(real[x])).mean()
            signed[i] += change / n
            absolute[i] += change.abs() / n
    return signed, absolute


def test_taylor_equals_brute_force_on_a_linear_loss():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(60, 4, 3, generator=g, dtype=torch.float64)
    # Per-sample gradients that move with the values (as a convex loss's do): then
    # sum_n a_n . (E[v] - v_n) = -0.5 * sum_n |v_n - E[v]|^2 != 0, so the signed score is not
    # the identically zero mean that one shared gradient gives.
    a = torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.5 * v
    weights = (torch.rand(60, generator=g) > 0.2).double()  # padding rows must not count
    grads = a * weights[:, None, None]
    want_signed, want_abs = brute_force(v, a, weights)
    assert (want_signed < -0.5).all() and (want_abs > want_signed.abs()).all()
    signed = TaylorSums(4, 3)
    for s in (slice(0, 25), slice(25, 60)):  # batches add up
        accumulate_gradients(signed, v[s], grads[s], weights[s])
    torch.testing.assert_close(taylor_scores(signed, SIGNED), want_signed)
    means = TaylorSums(4, 3)
    accumulate_values(means, v, weights)
    absolute = TaylorSums(4, 3)
    for s in (slice(0, 31), slice(31, 60)):
        accumulate_gradients(absolute, v[s], grads[s], weights[s], means.means())
    torch.testing.assert_close(taylor_scores(absolute, ABSOLUTE), want_abs)


def test_sequence_field_taylor_equals_brute_force():
    """A sequence field: loss(sample) = sum over its positions of a . v_p, every id of a sample
    replaced by an average id (E over all positions)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([2, 0, 3, 1, 4])
    v = torch.randn(int(lengths.sum()), 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, generator=g, dtype=torch.float64)
    grads = a.expand_as(v)
    sample = torch.repeat_interleave(torch.arange(5), lengths)
    changes = torch.zeros(5, dtype=torch.float64)
    for n in range(5):
        mine = v[sample == n]
        # expected loss over replacing each position by any position vector of the data
        changes[n] = (mine.shape[0] * (v @ a).mean()) - (mine @ a).sum()
    sums = TaylorSums(1, 3)
    accumulate_jagged(sums, 0, v, grads, lengths, count_samples=True)
    torch.testing.assert_close(taylor_scores(sums, SIGNED), changes.mean().view(1))
    absolute = TaylorSums(1, 3)
    accumulate_jagged(absolute, 0, v, grads, lengths, sums.means(), count_samples=True)
    torch.testing.assert_close(taylor_scores(absolute, ABSOLUTE), changes.abs().mean().view(1))


# --- the batched scorer on a real DLRM against a per-sample loop ---


def tiny_dlrm_and_data():
    data = DataConfig(synthetic_train_rows=200, synthetic_eval_rows=300, synthetic_scale=0.01)
    dataset = open_dataset(data, seed=0)
    cfg = ModelConfig(embedding_dim=8, dense_arch=(16,), over_arch=(16,))
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=table_configs(dataset.schema, 8))
    for p in ebc.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return build_dlrm(dataset.schema, cfg, ebc=ebc), dataset


def test_batched_scores_equal_a_per_sample_loop():
    model, dataset = tiny_dlrm_and_data()
    view = FieldView(model, has_dense=True)
    vs, gs = [], []
    for batch in dataset.batches("dev", 128):
        for n in torch.nonzero(batch.sample_weights > 0).squeeze(-1).tolist():
            with torch.no_grad():
                v = view.lookup(batch)[n : n + 1]
            v.requires_grad_(True)
            loss = F.binary_cross_entropy_with_logits(view.head(v), batch.labels[n : n + 1])
            (g,) = torch.autograd.grad(loss, v)
            vs.append(v.detach()[0])
            gs.append(g[0])
    v, g = torch.stack(vs).double(), torch.stack(gs).double()
    mean = v.mean(0)
    want_signed = (g * (mean - v)).sum(-1).mean(0)
    want_abs = (g * (mean - v)).sum(-1).abs().mean(0)
    for method, want, cache in (
        ("taylor-signed", want_signed, 0),
        ("taylor", want_abs, 1 << 30),
        ("taylor", want_abs, 0),
        ("taylor", want_abs, 60_000),
        ("taylor", want_abs, 20_000),
    ):
        got = score_fields(model, dataset, method, "dev", 128, cache_bytes=cache)
        assert got.samples == 300 and got.fields[0] == "dense_features" and len(got.fields) == 12
        torch.testing.assert_close(torch.tensor(got.scores, dtype=torch.float64), want, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="not 'test'"):
        score_fields(model, dataset, "taylor", "test")


def test_scoring_head_equals_torchrec_interaction_bit_for_bit(monkeypatch):
    """The scoring head's own dot interaction (pairs by `index_select`, a chunk of samples at
    a time) gives TorchRec's `InteractionArch` logits and gradients with respect to the field
    vectors bit for bit, over several chunks and a short last one; a model whose interaction
    is another module goes through that module. `--score-cache-gb` reaches the scoring call."""
    model, dataset = tiny_dlrm_and_data()
    view = FieldView(model, has_dense=True)
    batch = next(iter(dataset.batches("dev", 128)))
    with torch.no_grad():
        dlrm = view.dlrm
        dense = dlrm.dense_arch(batch.dense_features).unsqueeze(1)
        stock = torch.cat([dense, dlrm.sparse_arch(batch.sparse_features)], 1)
        with monkeypatch.context() as m:  # the lookup lays out the pooled output itself
            m.setattr(SparseArch, "forward", lambda *a, **k: pytest.fail("SparseArch.forward was called"))
            v = view.lookup(batch)
    assert torch.equal(v, stock)  # ... as TorchRec's SparseArch and a concatenation do

    def logits_and_grad(head):
        x = v.clone().requires_grad_(True)
        out = head(x)
        (g,) = torch.autograd.grad((out * torch.linspace(-1, 1, len(out))).sum(), x)
        return out.detach(), g

    def torchrec_head(x):
        inter = dlrm.inter_arch(dense_features=x[:, 0], sparse_features=x[:, 1:])
        return dlrm.over_arch(inter).squeeze(-1)

    chunks = []
    own = model_scoring._chunk_samples
    monkeypatch.setattr(model_scoring, "_chunk_samples", lambda x: chunks.append(own(x)) or chunks[-1])
    n = v.shape[1]
    monkeypatch.setattr(model_scoring, "INTERACTION_CHUNK_BYTES", 4 * n * n * 50)  # 128 = 50 + 50 + 28
    ours, theirs = logits_and_grad(view.head), logits_and_grad(torchrec_head)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert chunks == [50, 50]  # the head took its own interaction, forward and backward

    # `--score-cache-gb` reaches the scoring call.
    seen = {}
    monkeypatch.setattr(prune_job_module, "score_fields", lambda *a, **k: seen.update(k))
    prune_job_module.score(parse_cli(["--score-cache-gb", "0.25"]), model, dataset, None)
    assert seen["cache_bytes"] == 1 << 28

    class OtherInteraction(torch.nn.Module):
        def __init__(self, arch):
            super().__init__()
            self.arch, self.calls = arch, 0

        def forward(self, dense_features, sparse_features):
            self.calls += 1
            return self.arch(dense_features=dense_features, sparse_features=sparse_features)

    other = OtherInteraction(dlrm.inter_arch)
    dlrm.inter_arch = other
    assert torch.equal(logits_and_grad(view.head)[0], theirs[0]) and other.calls == 1


def test_taylor_reads_the_data_once_when_the_split_fits_its_cache():
    """Pass 2 of `taylor` runs on the batches (and vectors) pass 1 kept: with the split's
    batches in the cache every batch is read once, also when their vectors do not fit beside
    them; with no cache, twice; with a cache that ends partway, once plus the batches past it.
    (Scores at each of these caches: `test_batched_scores_equal_a_per_sample_loop`.)"""
    model, dataset = tiny_dlrm_and_data()
    total = dataset.num_batches("dev", 128)
    read = []
    original = dataset.batches

    def counting(*args, **kwargs):
        for b in original(*args, **kwargs):
            read.append(1)
            yield b

    dataset.batches = counting
    from shark_torchrec.importance.model_scoring import _batch_bytes

    sizes = [_batch_bytes(b) for b in original("dev", 128)]
    vectors = 128 * 12 * 8 * 4  # one batch's field vectors (12 fields, dim 8, fp32)
    assert sum(sizes) < 60_000 < sum(sizes) + 3 * vectors and sizes[0] < 20_000 < sizes[0] + sizes[1]
    for cache, want in ((1 << 30, total), (60_000, total), (0, 2 * total), (20_000, 2 * total - 1)):
        read.clear()
        score_fields(model, dataset, "taylor", "dev", 128, cache_bytes=cache)
        assert len(read) == want, (cache, len(read), total)


def test_taylor_is_the_magnitude_and_taylor_abs_its_alias():
    """`taylor` (also the default) is the paper's importance, mean |g . (E[v] - v)|, not the
    signed mean; `taylor-abs`, its old name, gives the same scores bit for bit, named `taylor`."""
    model, dataset = tiny_dlrm_and_data()
    taylor = score_fields(model, dataset, "taylor", "dev", 128)
    signed = score_fields(model, dataset, "taylor-signed", "dev", 128)
    alias = score_fields(model, dataset, "taylor-abs", "dev", 128, cache_bytes=0)
    default = score_fields(model, dataset, split="dev", global_batch=128)
    assert METHODS == ("taylor", "taylor-signed", "permutation", "random")
    assert (taylor.method, signed.method, alias.method, default.method) == (
        "taylor",
        "taylor-signed",
        "taylor",
        "taylor",
    )
    assert alias.scores == taylor.scores and default.scores == taylor.scores
    assert alias.to_json() == {**taylor.to_json(), "scoring_seconds": alias.scoring_seconds}
    mag, sig = torch.tensor(taylor.scores), torch.tensor(signed.scores)
    assert (mag >= 0).all() and (mag > 1.5 * sig.abs()).all()  # here |mean| is well below mean |.|
    with pytest.raises(ValueError, match="unknown importance method 'abs'"):
        score_fields(model, dataset, "abs", "dev", 128)


def blind_to(model, field: str) -> None:
    """Make the head ignore one field: zero every over-arch input column it touches."""
    from shark_torchrec.models.pruned import interaction_columns

    dlrm = model.model
    names = list(dlrm.sparse_arch.sparse_feature_names)
    keep = set(interaction_columns(8, names, [f for f in names if f != field]))
    with torch.no_grad():
        w = dlrm.over_arch.model[0]._mlp[0]._linear.weight
        w[:, [c for c in range(w.shape[1]) if c not in keep]] = 0


def rotate_real(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """A fixed shuffle in place of the scorer's random ones: every real sample takes the next
    real sample's value (the last takes the first's); padding stays put."""
    idx = torch.arange(weights.numel())
    real = torch.nonzero(weights > 0).squeeze(-1)
    idx[real] = real.roll(-1)
    return idx


def with_field_from(batch, field: str, idx: torch.Tensor):
    """The batch with sample n's input of one field (the dense features, or one categorical
    feature's bag of ids) taken from sample idx[n]: the model's own input, not its vectors."""
    from dataclasses import replace

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if field == "dense_features":
        return replace(batch, dense_features=batch.dense_features[idx])
    kjt = batch.sparse_features
    lengths, values = [], []
    for key, jt in kjt.to_dict().items():
        off = jt.offsets()
        order = idx if key == field else torch.arange(len(jt.lengths()))
        lengths.append(jt.lengths()[order])
        values += [jt.values()[off[n] : off[n + 1]] for n in order.tolist()]
    return replace(
        batch, sparse_features=KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))
    )


def test_permutation_scores_are_the_mean_loss_increase_of_the_shuffles(monkeypatch):
    """Permutation scoring = the loss increase per real sample when a field is shuffled within
    each batch, averaged over T rounds. With the shuffle fixed (every round the same), each
    score equals that increase computed through the whole model on batches whose inputs of
    the field were rotated, for T = 1 and T = 3; a field the head ignores scores exactly 0, and
    random shuffles differ from round to round."""
    import shark_torchrec.importance.model_scoring as scoring

    model, dataset = tiny_dlrm_and_data()
    blind_to(model, "c5")
    dlrm = model.model
    # The reference: the model's forward on the batch as it is and with one field rotated.
    increase, samples = None, 0
    with torch.no_grad():
        for batch in dataset.batches("dev", 128):
            real = batch.sample_weights > 0
            loss = lambda b: F.binary_cross_entropy_with_logits(  # noqa: E731
                dlrm(b.dense_features, b.sparse_features).squeeze(-1), b.labels, reduction="none"
            )[real].double()
            base = loss(batch)
            fields = ["dense_features", *dlrm.sparse_arch.sparse_feature_names]
            idx = rotate_real(batch.sample_weights)
            per_field = torch.stack([(loss(with_field_from(batch, f, idx)) - base).sum() for f in fields])
            increase = per_field if increase is None else increase + per_field
            samples += int(real.sum())
    want = increase / samples
    assert samples == 300 and (want != 0).sum() == len(fields) - 1  # only c5 is ignored

    monkeypatch.setattr(scoring, "permutation_index", rotate_real)
    for rounds in (1, 3):
        got = score_fields(model, dataset, "permutation", "dev", 128, rounds=rounds, seed=3)
        assert got.fields == fields and got.samples == 300
        # The same float32 per-sample losses (the head is the model's own): only the order of
        # the float64 sums differs, and the scores are ~1e-3.
        torch.testing.assert_close(torch.tensor(got.scores, dtype=torch.float64), want, rtol=1e-6, atol=1e-7)
        assert got.scores[fields.index("c5")] == 0.0
    monkeypatch.undo()

    one = score_fields(model, dataset, "permutation", "dev", 128, seed=3)
    three = score_fields(model, dataset, "permutation", "dev", 128, rounds=3, seed=3)
    assert one.scores[one.fields.index("c5")] == 0.0 and three.scores[three.fields.index("c5")] == 0.0
    assert one.scores != three.scores  # the rounds shuffle differently
    r1, r2 = (score_fields(model, dataset, "random", seed=s) for s in (1, 1))
    assert r1.ranking() == r2.ranking() and r1.scoring_seconds < 1


def test_permutation_index_shuffles_real_samples_among_themselves():
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    draws = [permutation_index(weights, g) for _ in range(20)]
    real = torch.nonzero(weights > 0).squeeze(-1)
    for idx in draws:
        assert torch.equal(idx[weights == 0], torch.tensor([1, 4]))
        assert torch.equal(idx[real].sort().values, real)
    assert len({tuple(d.tolist()) for d in draws}) > 10


# --- distributed, CLI, planted fields ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    run_shark("train", *TINY, "--synthetic-train-rows", "20000", "--epochs", "2", "--out-dir", str(out))
    return out


def test_scores_agree_on_one_and_two_ranks(trained, tmp_path):
    scores = {}
    for method in ("taylor", "taylor-signed"):
        got = {}
        for n in (1, 2):
            out = tmp_path / f"{method}{n}"
            run_shark(
                "importance",
                *TINY,
                "--synthetic-train-rows",
                "20000",
                "--checkpoint",
                str(trained / "checkpoints"),
                "--method",
                method,
                "--nproc",
                str(n),
                "--out-dir",
                str(out),
                "--metrics-out",
                str(out / "m.json"),
            )
            m = json.loads((out / "m.json").read_text())
            assert m["method"] == method
            got[n] = {r["field"]: r["score"] for r in m["ranking"]}
        assert got[1].keys() == got[2].keys() and len(got[1]) == 12
        for f in got[1]:
            assert got[1][f] == pytest.approx(got[2][f], rel=1e-4, abs=1e-8), (method, f)
        scores[method] = got[1]
    # Planted fields: `taylor` ranks every strong and medium field above every noise field and
    # is non-negative, while the signed sum of some of those useful fields is negative (near a
    # trained optimum the per-sample terms cancel): the signed mean is not the importance.
    truth = json.loads((trained / "synthetic_fields.json").read_text())
    role = {f["name"]: f["role"] for f in truth["fields"]} if "fields" in truth else truth
    useful = [f for f in scores["taylor"] if role.get(f) in ("strong", "medium")]
    noise = [f for f in scores["taylor"] if role.get(f) == "noise"]
    assert useful and noise and all(s >= 0 for s in scores["taylor"].values())
    assert min(scores["taylor"][f] for f in useful) > max(scores["taylor"][f] for f in noise)
    assert any(scores["taylor-signed"][f] < 0 for f in useful), scores
    # the old name still runs, gives the same numbers and is recorded as `taylor`
    out = tmp_path / "alias"
    run_shark(
        "importance",
        *TINY,
        "--synthetic-train-rows",
        "20000",
        "--checkpoint",
        str(trained / "checkpoints"),
        "--method",
        "taylor-abs",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["method"] == "taylor" and {r["field"]: r["score"] for r in m["ranking"]} == scores["taylor"]
    # the model the ranking comes from, evaluated: the checkpoint's own test AUC
    trained_auc = json.loads((trained / "metrics.json").read_text())["test_auc"]
    assert m["model_test_auc"] == pytest.approx(trained_auc, abs=1e-6) and 0.5 < m["model_dev_auc"] <= 1


def test_noise_fields_rank_below_strong_and_medium(trained, tmp_path):
    out = tmp_path / "imp"
    proc = run_shark(
        "importance",
        *TINY,
        "--synthetic-train-rows",
        "20000",
        "--checkpoint",
        str(trained / "checkpoints"),
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["method"] == "taylor" and m["scoring_seconds"] > 0 and "ranking" in proc.stdout
    order = [r["field"] for r in m["ranking"]]
    truth = json.loads((trained / "synthetic_fields.json").read_text())
    role = {f["name"]: f["role"] for f in truth["fields"]} if "fields" in truth else truth
    noise = [f for f in order if role.get(f) == "noise"]
    useful = [f for f in order if role.get(f) in ("strong", "medium")]
    assert noise and useful
    assert max(order.index(f) for f in noise) < min(order.index(f) for f in useful), order
    for name in ("importance.csv", "importance.json", "importance.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    "precision,removal,nproc,feed_full",
    [("fp32", "slice", 2, True), ("fp32", "constant", 1, False), ("shark", "slice", 2, False)],
)
def test_pruned_model_is_planned_without_its_tables_and_trains(tmp_path, precision, removal, nproc, feed_full):
    """The pruned model (before fine-tuning) computes exactly what the old head computes with
    the removed fields set to 0 (slice) or E[v] (constant); kept tables keep their values and
    optimizer state through the re-plan; the pruned model then trains under DMP, fed batches
    that still carry the removed features (feed_full) or the pruned dataset view."""
    removed = ["c9", "c3"]
    got = launch(PW.prune_and_compare, nproc, str(tmp_path), precision, removal, removed, feed_full)
    assert not set(got["planned"]) & {"t_c9", "t_c3"} and len(got["planned"]) == 9
    assert got["max_diff"] < 1e-5
    assert got["steps"] > 0 and got["auc_after"] > 0.6
    old = load_full_state(tmp_path / "checkpoints")
    new = load_full_state(tmp_path / "pruned")
    assert not [k for k in new["model"] if "t_c9" in k or "t_c3" in k]
    kept = [k for k in new["model"] if ".t_c1." in k]
    assert kept
    for k in kept:
        assert torch.equal(old["model"][k], new["model"][k]), k
    if precision == "shark":  # row groups, scores and momentum live in the module's state
        assert {"row_group", "row_priority", "momentum"} <= {k.rsplit(".", 1)[-1] for k in kept}
    moments = [k for k in new["optim"]["state"] if ".t_c1." in k]
    assert moments or precision == "shark"
    for k in moments:
        for name, t in new["optim"]["state"][k].items():
            assert torch.equal(old["optim"]["state"][k][name], t), (k, name)


def prune_cli(tmp_path, name, *extra):
    out = tmp_path / name
    proc = run_shark(
        "prune",
        *TINY,
        "--synthetic-train-rows",
        "20000",
        "--epochs",
        "2",
        "--support-rows",
        "3000",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
        *extra,
    )
    (out / "stderr.txt").write_text(proc.stderr)
    return out, json.loads((out / "m.json").read_text())


def test_prune_stops_at_the_target_memory(tmp_path):
    out, m = prune_cli(tmp_path, "mem", "--target-memory", "0.9", "--max-auc-drop", "0.4")
    assert m["stop_reason"] == "target_memory"
    # The pruned model's plan is written beside its checkpoint, without the removed tables.
    plan = (out / "pruned" / "sharding_plan.txt").read_text()
    removed = [f for r in m["iterations"][1:] if r["accepted"] for f in r["removed"]]
    assert removed and all(not re.search(rf"\bt_{f}\b", plan) for f in removed), removed
    assert all(re.search(rf"\bt_{f}\b", plan) for f in m["kept_fields"])
    # The loop logs under --no-progress too (TINY passes it; it hides progress bars only).
    log = (out / "stderr.txt").read_text()
    assert "base model: " in log and "iteration 1: removed " in log and "confirmation split (" in log
    rows = m["iterations"]
    assert rows[-1]["memory_ratio"] <= 0.9 < rows[-2]["memory_ratio"]
    assert m["memory_ratio"] == pytest.approx(rows[-1]["memory_ratio"])
    for key in ("test_auc", "embedding_bytes", "base_test_auc", "kept_fields", "pruned_fields"):
        assert key in m
    assert set(m["pruned_fields"]) == {f for r in rows for f in r["removed"]}
    for name in ("prune_log.csv", "prune_log.json", "auc_vs_memory.png", "pruned"):
        assert (out / name).exists()
    # The pruned checkpoint is a model any command starts from: score it again.
    imp = tmp_path / "again"
    run_shark(
        "importance",
        *TINY,
        "--checkpoint",
        str(out / "pruned"),
        "--out-dir",
        str(imp),
        "--metrics-out",
        str(imp / "m.json"),
    )
    fields = {r["field"] for r in json.loads((imp / "m.json").read_text())["ranking"]}
    assert fields == set(m["kept_fields"]) | {"dense_features"}


def test_prune_stops_at_the_auc_bound_and_keeps_the_previous_model(tmp_path):
    """A bound no removal meets, with --max-rejections 2: two different candidates are tried
    from the same model (scored once), both rejected, each test at its own share of the error
    rate (z grows); then the loop stops and keeps the base model."""
    out, m = prune_cli(
        tmp_path,
        "auc",
        "--target-memory",
        "0.01",
        "--max-auc-drop",
        "0",
        "--finetune-epochs",
        "0",
        "--max-rejections",
        "2",
        "--min-saving",
        "0",
    )
    assert m["stop_reason"] == "max_auc_drop"
    rows = m["iterations"]
    assert len(rows) == 3 and rows[0]["accepted"] and not rows[1]["accepted"] and not rows[2]["accepted"]
    assert rows[1]["removed"] != rows[2]["removed"]
    assert rows[1]["scoring_seconds"] == rows[2]["scoring_seconds"]  # the same scores, not a second scoring
    assert rows[2]["z"] > rows[1]["z"]
    assert m["kept_fields"] == rows[0]["kept"] and m["pruned_fields"] == []
    assert m["dev_auc"] == pytest.approx(rows[0]["dev_auc"], abs=1e-6)
    assert m["base_test_auc"] == pytest.approx(rows[0]["test_auc"])
    # The stop is the drop test's: the rejected step's upper bound (drop + z x DeLong's SE) is
    # over the bound, and a dev split that cannot resolve the bound is reported before pruning.
    last = rows[-1]
    assert last["dev_auc_drop"] == pytest.approx(rows[0]["dev_auc"] - last["dev_auc"], abs=1e-6)
    assert last["dev_auc_drop_upper_bound"] == pytest.approx(
        last["dev_auc_drop"] + last["z"] * last["dev_auc_drop_standard_error"]
    )
    assert last["dev_auc_drop_upper_bound"] > 0 and last["dev_auc_drop_standard_error"] > 0
    res = m["selection_resolution"]
    assert res["selection_auc_standard_error"] > 0 and "cannot be told from noise" in res["warning"]
    assert res["confidence"] == 0.95 and res["selection_rows"] == 1000  # dev's even lines (TINY: 2000 dev rows)
    # The final figure comes from dev's lines i % 4 == 3, which no decision read: the kept model
    # against the base model, paired.
    c = m["confirmation"]
    assert c["split"] == "confirm" and c["rows"] == 500 and c["drop"] == pytest.approx(c["base_auc"] - c["auc"])
    assert c["upper_bound_95"] == pytest.approx(c["drop"] + 1.6449 * c["standard_error"], abs=1e-4)


def test_fields_are_removed_by_importance_per_byte_and_negligible_ones_are_skipped():
    """Ranked per byte, the tables that free the most memory per unit of expected AUC cost go
    first: a huge weak table before a tiny weaker one, and even a strong table ten times the
    tiny one's size whose score is not ten times larger (the stop test then guards AUC); the
    paper's order takes the weakest first; a table below --min-saving of the model is never
    tried; dense features never are."""
    from shark_torchrec.importance.model_scoring import FieldImportance

    imp = FieldImportance(
        "taylor",
        ["dense_features", "tiny", "huge", "strong"],
        [0.01, 0.01, 0.02, 0.5],
        0.0,
        100,
        prunable=["tiny", "huge", "strong"],
    )
    sizes = {"tiny": 4_000, "huge": 4_000_000, "strong": 400_000}
    assert imp.removal_order(sizes, "importance", 0.0) == ["tiny", "huge", "strong"]
    assert imp.removal_order(sizes, "per-byte", 0.0) == ["huge", "strong", "tiny"]
    assert imp.removal_order(sizes, "per-byte", 0.01) == ["huge", "strong"]  # tiny is 0.1% of the bytes
    with pytest.raises(ValueError, match="removal order"):
        imp.removal_order(sizes, "alphabetical")


def test_fields_with_no_expected_cost_go_first_largest_first():
    """Zero or negative scores (Permutation on noise fields) cost nothing expected: the largest
    such table goes first, then the others by score per byte."""
    from shark_torchrec.importance.model_scoring import FieldImportance

    imp = FieldImportance(
        "permutation",
        ["small", "big", "zero", "pos"],
        [-0.0001, -0.001, 0.0, 0.01],
        0.0,
        100,
        prunable=["small", "big", "zero", "pos"],
    )
    sizes = {"small": 1_000, "big": 100_000_000, "zero": 50_000, "pos": 10_000_000}
    assert imp.removal_order(sizes, "per-byte", 0.0) == ["big", "zero", "small", "pos"]
