"""Table-row-wise sharding (row-wise within a host) of the mixed-precision bag collection:
4 ranks laid out as 2 hosts x 2, planned by shark train's planner, against the unsharded
module; and its DCP checkpoint read back by the 4 ranks and by the unsharded module."""

import pytest
import torch

from helpers import mp_workers as W
from helpers import twrw_workers as TW
from shark_torchrec.distributed.env import launch

STEPS = 3
# Reassign every step (budget mode: a collective over all 4 ranks, each table ranked over
# the shards of its host).
OVERRIDES = {"reassign_every": 1}
TOLERANCE = 1e-5  # sums in another order than the unsharded module's


@pytest.fixture(scope="module")
def twrw(tmp_path_factory):
    """One 4-rank run shared by this file's tests (4 processes are the expensive part)."""
    checkpoint = tmp_path_factory.mktemp("twrw") / "ckpt"
    got = launch(TW.twrw_run, 4, STEPS, OVERRIDES, str(checkpoint))
    return got, checkpoint


def test_shards_lie_row_wise_within_each_of_two_hosts(twrw):
    got, _ = twrw
    host = lambda rank: rank // TW.LOCAL_WORLD_SIZE
    assert got["sharding_types"] == ["table_row_wise"]
    assert got["host_group_sizes"] == [2, 2]  # TorchRec's intra-host and cross-host groups
    hosts_used = set()
    for name, rows, _ in W.TABLES:
        shards = got["shards"][name]
        assert len(shards) == TW.LOCAL_WORLD_SIZE and len({host(r) for r, _, _ in shards}) == 1, shards
        assert [s[1] for s in shards] == [0, shards[0][2]] and sum(s[2] for s in shards) == rows, shards
        hosts_used.add(host(shards[0][0]))
        for rank, row0, n in shards:  # the built stores hold exactly the planned rows
            assert (name, row0, n) in [tuple(t) for t in got["local_tables"][rank]], (name, rank)
    assert hosts_used == {0, 1}


def test_table_row_wise_matches_the_unsharded_module(twrw):
    got, _ = twrw
    from helpers.checks import assert_follows_the_reference

    # Against the plain-torch reference of the update rule (shares no code with the store) ...
    assert_follows_the_reference(got, W.reference_math_run(STEPS, OVERRIDES))
    # ... and against the unsharded module (its memory accounting too).
    ref = W.unsharded_run(STEPS, OVERRIDES)
    for a, b in zip(got["outputs"], ref["outputs"]):
        assert (a - b).abs().max() <= TOLERANCE
    store = ref["stores"][0]
    assert all(c > 0 for c in store.group_counts()), store.group_counts()
    for i, t in enumerate(store.tables):
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        assert (got["tables"][f"{t.name}.weight"] - store.read_rows(torch.arange(lo, hi))).abs().max() <= TOLERANCE, (
            t.name
        )
        assert torch.equal(got["tables"][f"{t.name}.row_group"][:, 0], store.row_group[lo:hi]), t.name
        mem = got["memory"][t.name]
        assert [mem["rows_fp32"], mem["rows_fp16"], mem["rows_int8"]] == [
            int((store.row_group[lo:hi] == g).sum()) for g in range(3)
        ], t.name
        want = store.table_bytes()[i]
        assert {k: mem[k] for k in ("embedding_bytes", "optimizer_bytes", "priority_bytes")} == {
            k: want[k] for k in ("embedding_bytes", "optimizer_bytes", "priority_bytes")
        }, t.name


def test_twrw_checkpoint_reloads_sharded_and_unsharded(twrw, tmp_path):
    """The 4 ranks, a step past their checkpoint, get every local shard back bit for bit;
    the unsharded module loads the same checkpoint with identical tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    got, checkpoint = twrw
    assert got["moved_on_then_restored"] == [(True, True)] * 4
    dcp_to_torch_save(str(checkpoint), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt")
    module = W.make_module(False, OVERRIDES)
    module.materialize(torch.device("cpu"))
    module.load_state_dict(state)
    assert module.step_counter.value == STEPS
    again = module.state_dict()
    assert {k.rsplit(".", 1)[1] for k in state if k.startswith("embedding_bags.")} == {
        "weight",
        "qparams",
        "row_group",
        "row_priority",
        "row_seen_step",
        "momentum",
    }
    for key, value in state.items():
        assert torch.equal(again[key], value), key
    for n, _, _ in W.TABLES:
        assert torch.equal(state[f"embedding_bags.{n}.weight"], got["tables"][f"{n}.weight"]), n
