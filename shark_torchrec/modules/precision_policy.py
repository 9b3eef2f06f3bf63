"""The one object that tells a mixed-precision embedding collection how to keep its rows."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from shark_torchrec.precision.priority import (
    DROPPED,
    GROUP_NAMES,
    INT2,
    SERVED_ONLY,
    BudgetError,
    default_budget,
    min_budget,
    tier_names_problem,
)

MODES = ("shark", "freq", "fp32", "fp16", "int8", "int4", "int2")
PAPER_TIERS = ("fp32", "fp16", "int8")
BUDGET_SCOPES = ("table", "model")
SIGNALS = ("eq7", "eq7-grad")
OPTIMIZERS = ("rowwise_adagrad", "sgd")
# What row-wise Adagrad keeps a row in: fp32 (4 bytes, FBGEMM's default) or bf16 (2 bytes,
# rounded stochastically; FBGEMM's `optimizer_state_dtypes={"momentum1": SparseType.BF16}`).
MOMENTUM_DTYPES = ("fp32", "bf16")
BAD_ID_POLICIES = ("error", "row0")
# What FBGEMM's table-batched embeddings train with when nothing is said (its constructor's
# defaults): a collection given no optimizer by its policy or its sharder's fused_params
# trains as a stock fused table would.
FBGEMM_DEFAULTS = {"optimizer": "sgd", "learning_rate": 0.01, "eps": 1.0e-8, "momentum_dtype": "fp32"}
# fused_params keys that change nothing in our update (TorchRec and FBGEMM pass them along).
_NEUTRAL_FUSED_PARAMS = {
    "stochastic_rounding",  # our fp16/int8 rows always round stochastically
    "output_dtype",
    "cache_load_factor",
    "cache_precision",
    "prefetch_pipeline",
    "bounds_check_mode",
    "use_cpu",
    "weights_precision",
    "gradient_clipping",
    "max_gradient",
}

MAX_MEMORY_BUDGET = 1.5  # the largest budget a policy takes (fp32 rows and their row map are 1.0625 at dim 16)


class PolicyError(ValueError):
    """Fields of a precision policy (or a sharder's fused_params) that its rules refuse, named:
    the settings' to change. A ValueError of its own, so that callers which report it as the
    user's error do not also take Python's and torch's ValueErrors, our faults, for theirs."""


@dataclass
class PrecisionPolicy:
    """How rows are split between precision groups (tiers) and how they train.

    mode: `shark` scores rows with paper Eq. 7 (positives weigh `alpha`); `freq` is the same
      with alpha = 1 (plain frequency); `fp32` / `fp16` / `int8` / `int4` / `int2` keep every
      row in that one group.
    tiers: the groups `shark` / `freq` rank rows into, from fp32, fp16, int8, int4, int2 (the
      paper's fp32, fp16, int8 by default). Int4 and int2 rows are packed as FBGEMM reads them
      (int2 needs dims that are multiples of 8). `dropped`: a row with no bytes of its own,
      whose lookups return its table's fallback row (one fp32 row per table, trained by the
      summed gradients of the table's dropped ids). With it, the highest ranked rows (at most
      `fp32_fraction` of them, in at most half the bytes the budget leaves for weights) keep
      the most precise stored tier first; rows are then dropped, lowest priority first, only
      when the budget cannot keep the rest in the cheapest stored tier, and a dropped row
      comes back (starting from the fallback) when its priority earns it.
    memory_budget: budget mode (the default when no other mode is set): each table's embedding
      bytes (weights, int8 scales/biases, row map) stay within this fraction of its fp32 bytes,
      from the first step on. Up to `fp32_fraction` of the rows stay fp32, as many as fit are
      fp16, the rest int8; which rows go where follows the score ranking over all shards of a
      table. None: the default for the collection's dims (`default_budget`: the larger of 0.35
      and the narrowest table's all-int8 floor plus 0.05, so 0.43 at dim 16 and 0.35 from dim
      40 up), resolved when the collection is built.
    budget_scope: `table` (the paper): every table within the budget on its own; `model`: one
      budget for all tables of the collection, rows of all tables competing by priority per
      byte (score over the row's fp32 bytes), so a small hot table keeps precision that a
      large cold one gives up (fp32 then at most `fp32_fraction` of all rows). Rows start
      under the per-table rule until scores exist.
    row_fractions: fractions of each table's rows in each tier but the last, from the most
      precise (with the paper's tiers: fp32, fp16; the rest int8), instead of a byte budget;
      the same ranking decides which rows.
    signal: what a row's priority counts. `eq7` (the paper): each occurrence adds alpha
      (positive) or 1 (negative), decayed by beta per step. `eq7-grad`: each step's Eq. 7
      increment weighted by the norm of the row's gradient in that step (rows the loss is
      sensitive to rank higher than equally frequent ones it is not); ranks only (a budget or
      row fractions, not t8/t16), and needs whole rows (no column-wise sharding).
    t8, t16: threshold mode (the paper, its tiers only): score < t8 -> int8, < t16 -> fp16,
      else fp32. Set both and leave memory_budget None. Rows start in int8 (every score starts
      at 0).
    reassign_every: training steps between reassignments (a step ends with the backward pass).
    optimizer, learning_rate, eps: the row update (`rowwise_adagrad`: FBGEMM's
      EXACT_ROWWISE_ADAGRAD rule, or `sgd`). None: taken from the sharder's TorchRec
      `fused_params` (`optimizer` as an `EmbOptimType`, `learning_rate`, `eps`), else FBGEMM's
      defaults (EXACT_SGD, 0.01, 1e-8), as for a stock fused table.
    momentum_dtype: row-wise Adagrad's state a row: `fp32` (4 bytes) or `bf16` (2 bytes: the
      sum is taken in fp32 and stored with stochastic rounding, so increments far below the
      sum's resolution still count in expectation; the step uses the unrounded sum). None:
      taken from the sharder's `fused_params` (`optimizer_state_dtypes={"momentum1":
      SparseType.BF16}`, as FBGEMM takes it), else fp32.
    seed: the seed of the stochastic rounding noise (hashed with step, table, row and column).
    bad_ids: ids outside their table: `error` (an IdError naming the feature and the id) or
      `row0` (they read and train row 0).
    """

    mode: str = "shark"
    tiers: Tuple[str, ...] = PAPER_TIERS
    memory_budget: Optional[float] = None
    budget_scope: str = "table"
    signal: str = "eq7"
    fp32_fraction: float = 0.02
    row_fractions: Optional[Tuple[float, ...]] = None
    t8: Optional[float] = None
    t16: Optional[float] = None
    alpha: float = 2.0
    beta: float = 0.99
    reassign_every: int = 100
    optimizer: Optional[str] = None
    learning_rate: Optional[float] = None
    eps: Optional[float] = None
    momentum_dtype: Optional[str] = None
    seed: int = 0
    bad_ids: str = "error"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def momentum_torch_dtype(self) -> torch.dtype:
        """The dtype row-wise Adagrad's state is kept in (`momentum_dtype`; None: fp32)."""
        return torch.bfloat16 if self.momentum_dtype == "bf16" else torch.float32

    @property
    def scored(self) -> bool:
        """Whether rows are ranked into tiers by a score (`shark`, `freq`)."""
        return self.mode in ("shark", "freq")

    @property
    def effective_alpha(self) -> float:
        """The weight of a positive example in the score: `alpha`, 1 for `freq`."""
        return 1.0 if self.mode == "freq" else self.alpha

    @property
    def threshold_mode(self) -> bool:
        """Scored rows grouped by the thresholds t8 / t16."""
        return self.scored and self.t8 is not None

    @property
    def budget_mode(self) -> bool:
        """Scored rows grouped by a memory budget (no thresholds, no row fractions)."""
        return self.scored and self.t8 is None and self.row_fractions is None

    @property
    def groups(self) -> Tuple[int, ...]:
        """The group ids rows can be in, most precise first."""
        if not self.scored:
            return (GROUP_NAMES.index(self.mode),)
        return tuple(sorted(GROUP_NAMES.index(t) for t in self.tiers))

    def validate(self) -> None:
        """Check the fields alone and together (the dims are checked in `resolved`); run on
        construction.

        Raises:
            PolicyError: naming the field and what it must be.
        """

        def bad(field: str, why: str) -> PolicyError:
            return PolicyError(f"precision policy: {field} {why}")

        # Numbers given as strings (from a config file, say) failed in a comparison with
        # Python's TypeError, which names no field. None: the fields that may be unset.
        required = {"fp32_fraction": float, "alpha": float, "beta": float, "reassign_every": int, "seed": int}
        optional = {"memory_budget": float, "t8": float, "t16": float, "learning_rate": float, "eps": float}
        for field, kind in {**required, **optional}.items():
            value = getattr(self, field)
            if value is None and field in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
                raise bad(field, f"must be {'an int' if kind is int else 'a number'}, got {value!r}")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.eps is not None and not self.eps > 0:
            raise bad("eps", f"must be > 0, got {self.eps}")
        if self.momentum_dtype is not None and self.momentum_dtype not in MOMENTUM_DTYPES:
            raise bad("momentum_dtype", f"must be one of {MOMENTUM_DTYPES}, got {self.momentum_dtype!r}")
        if self.bad_ids not in BAD_ID_POLICIES:
            raise bad("bad_ids", f"must be one of {BAD_ID_POLICIES}, got {self.bad_ids!r}")
        served_only = [t for t in SERVED_ONLY if t in self.tiers]
        if served_only:
            # The export's form: the symmetric tiers with int1 below them.
            hint = " ".join([t for t in served_only if t != "int1"] + ["int1"])
            raise bad(
                "tiers",
                f"{' and '.join(served_only)} {'is a tier' if len(served_only) == 1 else 'are tiers'} for serving "
                f"only (`shark export CKPT --tiers ... {hint}`): rows train in "
                f"{', '.join(GROUP_NAMES)}; got {tuple(self.tiers)}",
            )
        if isinstance(self.tiers, str):
            raise bad(
                "tiers",
                f"is a sequence of tier names, e.g. ({self.tiers!r},) or split_tiers([...]); got {self.tiers!r}",
            )
        problem = tier_names_problem(self.tiers, GROUP_NAMES)
        if problem:
            raise bad("tiers", problem)
        if not self.scored:
            # Ignored by a one-tier mode, which would train every row in it whatever they say.
            keeps = f"mode {self.mode!r} keeps every row in {self.mode} (mode 'shark' or 'freq' ranks rows into tiers)"
            if self.memory_budget is not None:
                raise bad("memory_budget", f"{self.memory_budget} is not used: {keeps}")
            if tuple(self.tiers) != PAPER_TIERS:
                raise bad("tiers", f"{tuple(self.tiers)} are not used: {keeps}")
        if self.tiers and all(t == "dropped" for t in self.tiers):
            raise bad("tiers", "need a tier that stores rows besides 'dropped'")
        if self.scored and len(self.tiers) < 2:
            raise bad(
                "tiers",
                f"mode {self.mode} ranks rows into 2 or more tiers, got {tuple(self.tiers)} "
                f"(one tier: mode={self.tiers[0] if self.tiers else '?'})",
            )
        if self.t8 is not None and tuple(sorted(self.tiers, key=GROUP_NAMES.index)) != PAPER_TIERS:
            raise bad(
                "t8/t16", f"threshold mode is the paper's and needs its tiers {PAPER_TIERS}, got {tuple(self.tiers)}"
            )
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
            want = len(self.tiers) - 1
            if len(self.row_fractions) != want:
                raise bad(
                    "row_fractions",
                    f"needs {want} numbers (tiers {tuple(self.tiers)} but the last), got {list(self.row_fractions)}",
                )
            if min(self.row_fractions) < 0 or sum(self.row_fractions) > 1:
                raise bad("row_fractions", f"need fractions >= 0 that sum to at most 1, got {self.row_fractions}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise bad("budget_scope", f"must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        if self.budget_scope != "table" and self.scored and not self.budget_mode:
            raise bad(
                "budget_scope", f"{self.budget_scope!r} applies to a memory budget, not to row_fractions or t8/t16"
            )
        if self.signal not in SIGNALS:
            raise bad("signal", f"must be one of {SIGNALS}, got {self.signal!r}")
        if self.signal != "eq7" and self.threshold_mode:
            raise bad(
                "signal",
                f"{self.signal!r} scores are not on Eq. 7's scale: "
                "rank them (a memory budget or row_fractions), not t8/t16",
            )
        if self.memory_budget is not None and not 0 < self.memory_budget <= MAX_MEMORY_BUDGET:
            raise bad("memory_budget", f"must be in (0, {MAX_MEMORY_BUDGET}], got {self.memory_budget}")
        if not 0 <= self.fp32_fraction <= 1:
            raise bad("fp32_fraction", f"must be in [0, 1], got {self.fp32_fraction}")
        if not 0 < self.beta <= 1:
            raise bad("beta", f"must be in (0, 1], got {self.beta}")
        if float(torch.tensor(1.0 - self.beta, dtype=torch.float32)) == 1.0:  # scores are float32
            raise bad("beta", f"{self.beta} is too small: 1 - beta rounds to 1 in float32, so scores would never decay")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):  # nan and inf passed "not < 0"
            raise bad("alpha", f"must be a finite number >= 0, got {self.alpha}")
        if self.reassign_every < 1:
            raise bad("reassign_every", f"must be >= 1, got {self.reassign_every}")

    def resolved(self, dims: Iterable[int], fused_params: Optional[Mapping[str, Any]] = None) -> "PrecisionPolicy":
        """This policy with every unset field decided: the one place defaults are applied.

        Args:
            dims: embedding dims of the tables the policy governs (for the default budget and
                the check that an explicit budget is reachable).
            fused_params: the sharder's TorchRec `fused_params`, if any (optimizer, lr, eps).

        Returns:
            A copy whose budget (in budget mode), optimizer, learning rate and eps are set.

        Raises:
            BudgetError: the budget is below what rows all in the cheapest tier reach at these dims.
            PolicyError: fused_params ask for an optimizer we do not implement, or contradict
                a field this policy sets.
        """
        dims = list(dims)
        changes: Dict[str, Any] = training_from_fused_params(fused_params or {}, self)
        if changes["momentum_dtype"] != "fp32" and changes["optimizer"] != "rowwise_adagrad":
            raise PolicyError(
                f"precision policy: momentum_dtype {changes['momentum_dtype']} is row-wise Adagrad's state; "
                f"optimizer {changes['optimizer']} keeps none"
            )
        if INT2 in self.groups and any(d % 8 for d in dims):
            raise PolicyError(
                f"precision policy: int2 rows need embedding dims that are multiples of 8, got {sorted(set(dims))}"
            )
        if self.budget_mode:
            cheapest = self.groups[-1]
            # The default keeps every row stored (dropping is for budgets chosen to need it).
            stored = [g for g in self.groups if g != DROPPED]
            budget = self.memory_budget if self.memory_budget is not None else default_budget(dims, stored[-1])
            narrowest = min(dims, default=0)
            if dims and budget < min_budget(narrowest, cheapest) - 1e-12:
                raise BudgetError(
                    f"memory budget {budget} is below what tables of dim {narrowest} can reach: all rows "
                    f"{GROUP_NAMES[cheapest]} plus the row map take {min_budget(narrowest, cheapest):.3f} of fp32"
                )
            changes["memory_budget"] = budget
        return dataclasses.replace(self, **changes)

    @property
    def is_resolved(self) -> bool:
        """Whether the fields `resolved` decides are set (optimizer, lr, eps; in budget mode the budget)."""
        return None not in (self.optimizer, self.learning_rate, self.eps) and (
            not self.budget_mode or self.memory_budget is not None
        )


def split_tiers(items: Iterable[str]) -> Tuple[str, ...]:
    """Tier names as given on a command line, each word possibly a comma-separated list
    (`int8 int4` or `int8,int4`).

    Args:
        items: the words given.

    Returns:
        The tier names in order (validated by `PrecisionPolicy`).
    """
    return tuple(t for item in items for t in item.split(",") if t)


def training_from_fused_params(fused_params: Mapping[str, Any], policy: PrecisionPolicy) -> Dict[str, Any]:
    """The optimizer, learning rate and eps a policy trains with, given TorchRec `fused_params`.

    Args:
        fused_params: as given to a TorchRec sharder (`optimizer` an `EmbOptimType`).
        policy: fields it sets win only where fused_params say nothing or the same.

    Returns:
        {"optimizer", "learning_rate", "eps", "momentum_dtype"}: policy's value, else
        fused_params' (`optimizer_state_dtypes["momentum1"]` for the last), else FBGEMM's
        default (fp32 state).

    Raises:
        PolicyError: an optimizer other than EXACT_ROWWISE_ADAGRAD / EXACT_SGD, a fused
            parameter that would change the update and that we do not implement (weight decay,
            momentum, ...), or a contradiction with the policy.
    """
    from_fused: Dict[str, Any] = {}
    unknown = []
    for key, value in fused_params.items():
        if key == "optimizer":
            from_fused["optimizer"] = _optimizer_name(value)
        elif key in ("learning_rate", "eps"):
            from_fused[key] = float(value)
        elif key == "weight_decay" and not value:
            pass
        elif key == "optimizer_state_dtypes":
            states = dict(value or {})
            other = sorted(set(states) - {"momentum1"})
            if other:
                unknown.append(f"optimizer_state_dtypes of {', '.join(other)}")
            if "momentum1" in states:
                from_fused["momentum_dtype"] = _momentum_dtype_name(states["momentum1"])
        elif key not in _NEUTRAL_FUSED_PARAMS:
            unknown.append(key)
    if unknown:
        raise PolicyError(
            f"fused_params {sorted(unknown)} are not supported by the mixed-precision collections "
            "(they implement optimizer, learning_rate and eps)"
        )
    out = {}
    for key in ("optimizer", "learning_rate", "eps", "momentum_dtype"):
        mine, theirs = getattr(policy, key), from_fused.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise PolicyError(
                f"PrecisionPolicy.{key}={mine!r} contradicts the sharder's fused_params {key}={theirs!r}: "
                "set it in one place"
            )
        out[key] = mine if mine is not None else theirs if theirs is not None else FBGEMM_DEFAULTS[key]
    return out


def _momentum_dtype_name(value: Any) -> str:
    """Our name for an optimizer state dtype (SparseType, torch dtype or name)."""
    name = str(getattr(value, "name", value)).lower().replace("torch.", "")
    names = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    if name not in names:
        raise PolicyError(
            f"fused_params optimizer_state_dtypes momentum1={value} is not supported by the mixed-precision "
            "collections (supported: FP32, BF16)"
        )
    return names[name]


def _optimizer_name(value: Any) -> str:
    """Our name for a TorchRec/FBGEMM optimizer (EmbOptimType, its name, or its value such as
    `exact_row_wise_adagrad`)."""
    name = getattr(value, "name", str(value)).upper()
    names = {
        "EXACT_ROWWISE_ADAGRAD": "rowwise_adagrad",
        "EXACT_ROW_WISE_ADAGRAD": "rowwise_adagrad",  # EmbOptimType.EXACT_ROWWISE_ADAGRAD.value
        "ROWWISE_ADAGRAD": "rowwise_adagrad",
        "ROW_WISE_ADAGRAD": "rowwise_adagrad",
        "EXACT_SGD": "sgd",
        "SGD": "sgd",
    }
    if name.lower() in OPTIMIZERS:
        return name.lower()
    if name not in names:
        raise PolicyError(
            f"fused_params optimizer {name} is not supported by the mixed-precision collections "
            "(supported: EXACT_ROWWISE_ADAGRAD, EXACT_SGD)"
        )
    return names[name]
