"""One memory budget over every mixed-precision collection of a model.

With `budget_scope="model"` the rows of all tables compete for one budget by priority per
byte. A collection sees only its own tables; `share_model_budget(model)` puts every
mixed-precision collection of the model (sharded by DMP or not) under one `ModelBudget`,
which starts the tables at their shares of the model's budget, counts training steps for all
of them with one step counter (a step ends once per backward pass through the model), and at
each reassignment regroups the rows of all of them together: one ranking, one set of cuts,
one collective search over ranks.

Call it once the model is built (after DMP, before training and before a checkpoint is
loaded).
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.reassign import reassign_stores
from shark_torchrec.modules.row_groups import RowGroupStore, StepCounter
from shark_torchrec.precision.budget import model_start_budgets

# Policy fields that must agree between collections under one budget.
# (mode, alpha, beta and signal put the scores on one scale, so that they can be ranked together.)
_SHARED_FIELDS = ("memory_budget", "fp32_fraction", "tiers", "reassign_every", "mode", "alpha", "beta", "signal")


class BudgetMember(Protocol):
    """What a collection shows the model's budget (ours, sharded and unsharded, do)."""

    model_budget: Optional["ModelBudget"]
    groups_fresh: bool  # groups as the collection started them (no reassignment, no load yet)
    warned_alone: bool  # `reassign_collection` warned that a model-wide budget covers it alone
    step_counter: StepCounter

    def budget_policy(self) -> PrecisionPolicy:
        """The collection's resolved policy (budget, tiers, scoring rule).

        Returns:
            The policy.
        """
        ...

    def budget_stores(self) -> List[RowGroupStore]:
        """The stores that hold this rank's rows of the collection.

        Returns:
            The stores.
        """
        ...

    def budget_tables(self) -> Dict[str, Tuple[int, int]]:
        """table -> (global rows, the width its per-table budget is computed at).

        Returns:
            The dict, one entry per table of the collection.
        """
        ...

    def budget_widths(self) -> Dict[str, Tuple[int, ...]]:
        """table -> the widths of its column slices (one slice of its dim unless column-wise).

        Returns:
            The dict, one entry per table of the collection.
        """
        ...

    def budget_group(self) -> Optional[dist.ProcessGroup]:
        """The process group the collection is sharded over (None: unsharded).

        Returns:
            The process group, or None.
        """
        ...

    def restart_groups(self, shares: Dict[str, float]) -> None:
        """Start the rows again at these per-table shares of the model's budget.

        Args:
            shares: table -> its budget (fraction of its own fp32 bytes).
        """
        ...

    def note_reassigned(self, moved: Dict[str, int], seconds: float) -> None:
        """Record that the rows were regrouped.

        Args:
            moved: rows moved into each group (over every collection of the budget).
            seconds: this collection's share of the time the regrouping took.
        """
        ...

    def finish_step(self) -> None:
        """The end of a training step's work that is not the rows' (the fallback rows' update)."""
        ...

    def use_step_counter(self, counter: StepCounter) -> None:
        """Count steps with `counter` from now on (the shared budget's).

        Args:
            counter: the step counter.
        """
        ...


class ModelBudget:
    """The budget shared by several collections (see module doc); built by `share_model_budget`."""

    def __init__(self, members: Sequence[Tuple[str, BudgetMember]]) -> None:
        if not members:
            raise ValueError("ModelBudget needs at least one collection")
        self.members = list(members)
        first_path, first = self.members[0]
        policy = first.budget_policy()
        for path, m in self.members[1:]:
            other = m.budget_policy()
            for f in _SHARED_FIELDS:
                if getattr(other, f) != getattr(policy, f):
                    raise ValueError(
                        f"one model budget: collections {first_path!r} and {path!r} differ in {f} "
                        f"({getattr(policy, f)!r} vs {getattr(other, f)!r}); give them the same policy"
                    )
        groups = [m.budget_group() for _, m in self.members]
        sizes = {p: dist.get_world_size(g) if g is not None else 1 for (p, _), g in zip(self.members, groups)}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"one model budget: the collections are sharded over process groups of different sizes {sizes}"
            )
        steps = {p: m.step_counter.value for p, m in self.members}
        if len(set(steps.values())) > 1:
            raise ValueError(f"one model budget: the collections have trained different numbers of steps {steps}")
        self.policy = policy
        self.pg = next((g for g in groups if g is not None), None)
        # One step counter for all: a step ends once per backward pass through the model (a
        # collection that sits out a step still sees it counted), so every score decays to
        # the same step and the regrouping runs once.
        self.step_counter = StepCounter()
        self.step_counter.value = next(iter(steps.values()))
        self.step_counter.on_step_end = self._end_of_step
        for _, m in self.members:
            m.model_budget = self
            m.use_step_counter(self.step_counter)

    def _prefix(self, path: str) -> str:
        return f"{path}/"

    def tables(self) -> Dict[str, Tuple[int, int]]:
        """Every table under the budget, named `<collection path>/<table>`: (global rows, width its budget uses).

        Returns:
            The dict, over every collection's `budget_tables()`.
        """
        return {self._prefix(p) + n: v for p, m in self.members for n, v in m.budget_tables().items()}

    def widths(self) -> Dict[str, Tuple[int, ...]]:
        """Every table under the budget, named as in `tables`: the widths of its column slices.

        Returns:
            The dict, over every collection's `budget_widths()`.
        """
        return {self._prefix(p) + n: v for p, m in self.members for n, v in m.budget_widths().items()}

    def restart(self) -> None:
        """Put every table at its share of the model's budget (`model_start_budgets` over all
        tables), as a collection alone starts its own: for a model that has not trained yet."""
        shares = model_start_budgets(self.policy, self.tables())
        for p, m in self.members:
            pre = self._prefix(p)
            m.restart_groups({n: shares[pre + n] for n in m.budget_tables()})

    def _end_of_step(self, step: int) -> None:
        """The shared counter ended a step (one backward pass through every collection that
        took part): each collection finishes its step, then all rows are regrouped when due."""
        for _, m in self.members:
            m.finish_step()
        if self.policy.scored and step % self.policy.reassign_every == 0:
            self.reassign()

    def reassign(self) -> Dict[str, int]:
        """Regroup the rows of every collection by score now (collective over the ranks); each
        collection records the moves and its share of the time (`note_reassigned`).

        Returns:
            Rows moved into each group, over all collections.
        """
        t0 = time.perf_counter()
        stores, prefixes = [], []
        for p, m in self.members:
            for s in m.budget_stores():
                stores.append(s)
                prefixes.append(self._prefix(p))
        moved = reassign_stores(stores, self.policy, self.tables(), self.pg, self.widths(), prefixes)
        seconds = time.perf_counter() - t0
        for _, m in self.members:
            m.note_reassigned(moved, seconds / len(self.members))
        return moved


def share_model_budget(model: nn.Module) -> Optional[ModelBudget]:
    """Hold every mixed-precision collection of `model` whose policy has
    `budget_scope="model"` to one budget (see module doc). Collections with per-table budgets
    are left as they are.

    Args:
        model: the model (a DMP-wrapped one or a plain module holding our collections).

    Returns:
        The shared budget, or None when no collection has `budget_scope="model"`.

    Raises:
        ValueError: the collections' policies differ in budget, tiers, fp32 fraction,
            reassignment period, mode, alpha, beta or signal, or they are sharded over process
            groups of different sizes, or have trained different numbers of steps.
        BudgetError: the tables' floors together exceed the budget.
    """
    members = []
    for path, mod in model.named_modules():
        if not callable(getattr(mod, "budget_policy", None)):
            continue
        policy = mod.budget_policy()
        if policy.budget_mode and policy.budget_scope == "model":
            members.append((path, mod))
    if not members:
        return None
    budget = ModelBudget(members)
    if all(m.groups_fresh for _, m in members):
        budget.restart()
    return budget


def reassign_collection(member: BudgetMember) -> Dict[str, int]:
    """Regroup a collection's rows by score now (collective over its ranks): with a shared
    model budget, every collection's under it; alone, its own tables, with a warning (once)
    when its policy asks for a model-wide budget. The collection records the moves and time
    (`note_reassigned`).

    Args:
        member: the collection (sharded or not).

    Returns:
        Rows moved into each group.
    """
    if member.model_budget is not None:
        return member.model_budget.reassign()
    t0 = time.perf_counter()
    policy = member.budget_policy()
    if policy.budget_scope == "model" and not member.warned_alone:
        member.warned_alone = True
        warnings.warn(
            f"{type(member).__name__}: budget_scope='model' holds this collection's tables to the budget on their own; "
            "to hold every mixed-precision collection of the model to one budget, call "
            "shark_torchrec.modules.model_budget.share_model_budget(model) once the model is built",
            stacklevel=3,
        )
    moved = reassign_stores(
        member.budget_stores(), policy, member.budget_tables(), member.budget_group(), member.budget_widths()
    )
    member.note_reassigned(moved, time.perf_counter() - t0)
    return moved
