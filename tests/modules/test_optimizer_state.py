"""Row-wise Adagrad's state in bf16 (`momentum_dtype="bf16"`, `--emb-optimizer-state bf16`):
2 bytes a row, summed in fp32 and stored with stochastic rounding. Many increments far below
bf16's resolution must still add up in expectation (rounding to nearest would drop every one),
the noise must be a function of (seed, step, table, row), and the state is what the memory
report and the checkpoint carry."""

import torch

from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import INT4
from shark_torchrec.precision.quantize import round_bf16_stochastic, state_noise_bits

DIM = 16


def int4_store(momentum_dtype: str, rows: int = 4000) -> RowGroupStore:
    policy = PrecisionPolicy(mode="int4", optimizer="rowwise_adagrad", learning_rate=0.1, momentum_dtype=momentum_dtype)
    store = RowGroupStore(
        [LocalTable("t", rows, DIM, global_rows=rows, table_id=2)], ["f"], [0], policy.resolved([DIM]), StepCounter()
    )
    store.set_groups(torch.full((rows,), INT4, dtype=torch.int8))
    return store


def test_tiny_increments_add_up_in_expectation():
    """Every row's sum starts at 1 (bf16's step there is 2^-7); each of 20 steps adds 1e-4 a
    row, 1/78 of a step. The stored sums must track the fp32 sums (1.002) in the mean over
    rows; rounding to nearest would leave every row at 1.0."""
    store = int4_store("bf16")
    n = store.num_rows
    keys = torch.arange(n)
    assert store.momentum.dtype == torch.bfloat16
    store.momentum.fill_(1.0)
    grad = torch.full((n, DIM), 1e-2)  # mean(g^2) = 1e-4
    for step in range(1, 21):
        store.step.value = step
        scale = store._step_scale(store.momentum, keys, grad)
        assert torch.allclose(scale, 0.1 / (store.momentum.float().sqrt() + 1e-8), rtol=1e-2)
    mean = store.momentum.float().mean().item()
    assert abs(mean - 1.002) < 3e-4, mean
    assert len(store.momentum.unique()) > 1  # rows rounded apart, each by its own noise


def test_the_state_is_two_bytes_a_row_and_the_fp32_state_is_unchanged():
    bf16, fp32 = int4_store("bf16", 100), int4_store("fp32", 100)
    assert bf16.table_bytes()[0]["optimizer_bytes"] == 200 and fp32.table_bytes()[0]["optimizer_bytes"] == 400
    keys, grad = torch.arange(100), torch.randn(100, DIM)
    fp32.step.value = 1
    fp32._step_scale(fp32.momentum, keys, grad)
    assert torch.equal(fp32.momentum, (grad * grad).mean(dim=1))  # fp32: the exact sum, as before


def test_the_rounding_noise_is_a_function_of_seed_step_table_and_row():
    rows = torch.arange(1000)
    a = state_noise_bits(0, 5, 2, rows)
    assert torch.equal(a, state_noise_bits(0, 5, 2, rows))
    for other in (state_noise_bits(1, 5, 2, rows), state_noise_bits(0, 6, 2, rows), state_noise_bits(0, 5, 3, rows)):
        assert (a != other).float().mean() > 0.99
    assert int(a.min()) >= 0 and int(a.max()) < 1 << 16
    # Halfway between two bf16 values: rounded up for about half of the rows.
    up = round_bf16_stochastic(torch.full((1000,), 1.0 + 2**-8), a).float() > 1.0
    assert 0.4 < up.float().mean() < 0.6
    exact = torch.tensor([0.0, 1.5, -3.0, 2.0**-130, float("inf")])
    assert torch.equal(round_bf16_stochastic(exact, torch.full((5,), 0xFFFF, dtype=torch.int32)).float(), exact)
    nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # its payload in the low bits only
    assert torch.isnan(round_bf16_stochastic(nan, torch.zeros(1, dtype=torch.int32))).all()
