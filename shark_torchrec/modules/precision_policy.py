"""The one object that tells a mixed-precision embedding collection how to keep its rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

MODES = ("shark", "freq", "fp32", "fp16", "int8")
DEFAULT_BUDGET = 0.35
OPTIMIZERS = ("rowwise_adagrad", "sgd")
BAD_ID_POLICIES = ("error", "row0")


@dataclass
class PrecisionPolicy:
    """How rows are split between the fp32, fp16 and int8 groups and how they train.

    mode: `shark` scores rows with paper Eq. 7 (positives weigh `alpha`); `freq` is the same
      with alpha = 1 (plain frequency); `fp32` / `fp16` / `int8` keep every row in one group.
    memory_budget: budget mode (the default: 0.35 when no other mode is set): each table's
      embedding bytes (weights, int8 scales/biases, row map) stay within this fraction of its
      fp32 bytes, from the first step on. Up to `fp32_fraction` of the rows stay fp32, as many as fit are fp16, the
      rest int8; which rows go where follows the score ranking over all shards of a table.
    row_fractions: (fp32, fp16) fractions of each table's rows instead of a byte budget (the
      rest int8); the same ranking decides which rows.
    t8, t16: threshold mode (the paper): score < t8 -> int8, < t16 -> fp16, else fp32. Set
      both and leave memory_budget None. Rows start in int8 (every score starts at 0).
    reassign_every: steps between reassignments.
    """

    mode: str = "shark"
    memory_budget: Optional[float] = None
    fp32_fraction: float = 0.02
    row_fractions: Optional[Tuple[float, float]] = None
    t8: Optional[float] = None
    t16: Optional[float] = None
    alpha: float = 2.0
    beta: float = 0.99
    reassign_every: int = 100
    optimizer: str = "rowwise_adagrad"
    learning_rate: float = 0.1
    eps: float = 1e-8
    seed: int = 0
    bad_ids: str = "error"

    def __post_init__(self) -> None:
        if self.scored and self.memory_budget is None and self.row_fractions is None and self.t8 is None:
            self.memory_budget = DEFAULT_BUDGET
        self.validate()

    @property
    def scored(self) -> bool:
        return self.mode in ("shark", "freq")

    @property
    def effective_alpha(self) -> float:
        return 1.0 if self.mode == "freq" else self.alpha

    @property
    def threshold_mode(self) -> bool:
        return self.scored and self.t8 is not None

    def validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"precision policy: {field} {why}")

        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.bad_ids not in BAD_ID_POLICIES:
            raise bad("bad_ids", f"must be one of {BAD_ID_POLICIES}, got {self.bad_ids!r}")
        if (self.t8 is None) != (self.t16 is None):
            raise bad("t8/t16", "must be given together")
        if self.t8 is not None:
            if self.t8 < 0 or self.t16 < self.t8:
                raise bad("t8/t16", f"need 0 <= t8 <= t16, got t8={self.t8}, t16={self.t16}")
            if self.memory_budget is not None and self.scored:
                raise bad("memory_budget", "and t8/t16 exclude each other: set one of them")
        elif self.row_fractions is not None:
            if self.memory_budget is not None:
                raise bad("row_fractions", "and memory_budget exclude each other: set one of them")
            f32, f16 = self.row_fractions
            if f32 < 0 or f16 < 0 or f32 + f16 > 1:
                raise bad("row_fractions", f"need fp32 >= 0, fp16 >= 0, fp32 + fp16 <= 1, got {self.row_fractions}")
        elif self.scored and self.memory_budget is None:
            raise bad("memory_budget", "(or row_fractions, or t8/t16) is needed for mode " + self.mode)
        if self.memory_budget is not None and not 0 < self.memory_budget <= 1.5:
            raise bad("memory_budget", f"must be in (0, 1.5], got {self.memory_budget}")
        if not 0 <= self.fp32_fraction <= 1:
            raise bad("fp32_fraction", f"must be in [0, 1], got {self.fp32_fraction}")
        if not 0 < self.beta <= 1:
            raise bad("beta", f"must be in (0, 1], got {self.beta}")
        if self.alpha < 0:
            raise bad("alpha", f"must be >= 0, got {self.alpha}")
        if self.reassign_every < 1:
            raise bad("reassign_every", f"must be >= 1, got {self.reassign_every}")
