"""Field-importance math (paper section 3.1), as pure functions over tensors.

A *field* is one input of the model's interaction: the pooled embedding of a categorical
feature, or DLRM's dense-feature vector. For F fields of dimension D and a batch of B samples,
`v` is [B, F, D] (each sample's field vectors) and `g` = d loss / d v, [B, F, D], where the
loss is the *sum* of per-sample losses, so that g[n] is the gradient of sample n's own loss.

F-Permutation's importance of field i: the magnitude of paper Eq. 4's first-order term,
averaged over the data as Eq. 2 (variant `abs`, the scorer's method `taylor`):

    score(i) = mean_n  |g[n, i] . (E[v_i] - v[n, i])|

It needs E[v_i] before the pass that takes gradients, so it costs one lookup-only pass more.
Variant `signed` (method `taylor-signed`) is the literal mean of g[n, i] . (E[v_i] - v[n, i]),
a diagnostic, not an importance to prune by: near a trained optimum the per-sample terms
cancel and the fields the model leans on most get the most negative sums. Because it is linear
in g . v, one pass suffices: sum_n g.(m - v) = (sum_n g) . m - sum_n g.v, with m = E[v_i]
known only at the end.

Sequence features (an EmbeddingCollection) have one vector per position rather than one per
sample. There v_i is the set of a sample's position vectors, E[v_i] is the mean vector over all
positions of the scoring data, and a sample's first-order term is the sum over its positions of
g_p . (E[v_i] - v_p): the change of its loss when every one of its ids is replaced by the
average one. `accumulate_jagged` handles that case, one field at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

SIGNED, ABSOLUTE = "signed", "abs"


@dataclass
class TaylorSums:
    """Running sums for F fields of dimension D; add them over batches and ranks."""

    num_fields: int
    dim: int
    samples: torch.Tensor = field(init=False)  # [] weighted sample count
    positions: torch.Tensor = field(init=False)  # [F] vectors seen per field
    sum_v: torch.Tensor = field(init=False)  # [F, D]
    sum_g: torch.Tensor = field(init=False)  # [F, D]
    sum_gv: torch.Tensor = field(init=False)  # [F]   sum of g . v
    sum_abs: torch.Tensor = field(init=False)  # [F]   sum of |g . (mean - v)| (abs variant)

    def __post_init__(self) -> None:
        F, D = self.num_fields, self.dim
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731 -- float64: long sums
        self.samples, self.positions = z(()), z(F)
        self.sum_v, self.sum_g, self.sum_gv, self.sum_abs = z(F, D), z(F, D), z(F), z(F)

    def flat(self) -> torch.Tensor:
        """Every sum in one vector (for a single all-reduce).

        Returns:
            float64 [1 + 3F + 2 F D]: samples, positions, sum_v, sum_g, sum_gv, sum_abs.
        """
        return torch.cat([t.reshape(-1) for t in self._parts()])

    def load_flat(self, flat: torch.Tensor) -> None:
        """Set every sum from one vector laid out as `flat()` makes it (after an all-reduce).

        Args:
            flat: the vector.
        """
        at = 0
        for t in self._parts():
            n = t.numel()
            t.copy_(flat[at : at + n].view_as(t))
            at += n

    def _parts(self) -> List[torch.Tensor]:
        return [self.samples.view(1), self.positions, self.sum_v, self.sum_g, self.sum_gv, self.sum_abs]

    def means(self) -> torch.Tensor:
        """E[v_i], [F, D].

        Returns:
            float64 [F, D]: sum_v over the positions seen (a field with none: zeros).
        """
        return self.sum_v / self.positions.clamp_min(1)[:, None]


def accumulate_values(sums: TaylorSums, v: torch.Tensor, weights: torch.Tensor) -> None:
    """Lookup-only pass: add the field vectors of real samples (weight 1; padding has 0).

    Args:
        sums: the running sums (updated in place).
        v: [B, F, D] the batch's field vectors.
        weights: [B] sample weights.
    """
    # Each batch is reduced in its own dtype; the running sums are float64.
    w = weights.to(v.dtype)
    n = w.sum().double()
    sums.samples += n
    sums.positions += n
    sums.sum_v += torch.einsum("b,bfd->fd", w, v).double()


def accumulate_gradients(
    sums: TaylorSums,
    v: torch.Tensor,
    g: torch.Tensor,
    weights: torch.Tensor,
    means: Optional[torch.Tensor] = None,
) -> None:
    """Add one batch's pooled field vectors and their per-sample gradients.

    Without `means` this is the signed variant's single pass (it also collects E[v]). With
    `means` (from an earlier `accumulate_values` pass) it adds the absolute terms.

    Args:
        sums: the running sums (updated in place).
        v: [B, F, D] the field vectors.
        g: [B, F, D] each sample's gradient of its own loss with respect to them.
        weights: [B] sample weights.
        means: [F, D] E[v], or None.
    """
    w = weights.to(v.dtype)
    if means is None:
        accumulate_values(sums, v, weights)
        sums.sum_g += torch.einsum("b,bfd->fd", w, g).double()
        sums.sum_gv += torch.einsum("b,bf->f", w, (g * v).sum(-1)).double()
    else:
        sums.samples += w.sum().double()
        terms = (g * (means.to(v.dtype)[None] - v)).sum(-1)
        sums.sum_abs += torch.einsum("b,bf->f", w, terms.abs()).double()


def accumulate_jagged(
    sums: TaylorSums,
    index: int,
    v: torch.Tensor,
    g: torch.Tensor,
    lengths: torch.Tensor,
    means: Optional[torch.Tensor] = None,
    count_samples: bool = False,
) -> None:
    """A sequence field: `v`, `g` are [P, D] position vectors, `lengths` [B] positions per sample.

    Without `means`: signed pass (sums of v, g, g.v over positions). With `means` [F, D]: the
    absolute term of each sample, |sum over its positions of g_p . (E[v] - v_p)|.
    `count_samples` adds B to the sample count (do it once per batch, not once per field).

    Args:
        sums: the running sums (updated in place).
        index: the field's index in `sums`.
        v, g: [P, D] the field's position vectors and their gradients.
        lengths: [B] positions per sample.
        means: [F, D] E[v] of every field, or None.
        count_samples: add the batch's B samples to the count.
    """
    v64, g64 = v.to(torch.float64), g.to(torch.float64)
    if count_samples:
        sums.samples += lengths.numel()
    if means is None:
        sums.positions[index] += v64.shape[0]
        sums.sum_v[index] += v64.sum(0)
        sums.sum_g[index] += g64.sum(0)
        sums.sum_gv[index] += (g64 * v64).sum()
    else:
        per_pos = (g64 * (means[index].to(torch.float64)[None] - v64)).sum(-1)
        sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        per_sample = torch.zeros(lengths.numel(), dtype=torch.float64).index_add_(0, sample, per_pos)
        sums.sum_abs[index] += per_sample.abs().sum()


def taylor_scores(sums: TaylorSums, variant: str = SIGNED) -> torch.Tensor:
    """score(i) per field, [F] float64. `abs` (method `taylor`): the importance, larger = more
    important. `signed` (method `taylor-signed`): the diagnostic signed mean, not a ranking.

    Args:
        sums: the sums over all the data (all-reduced over the ranks).
        variant: `signed` or `abs`.

    Returns:
        [F] float64 scores.

    Raises:
        ValueError: an unknown variant.
    """
    n = sums.samples.clamp_min(1)
    if variant == ABSOLUTE:
        return sums.sum_abs / n
    if variant != SIGNED:
        raise ValueError(f"unknown Taylor variant {variant!r} (signed or abs)")
    return ((sums.sum_g * sums.means()).sum(-1) - sums.sum_gv) / n


def permutation_index(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A within-batch shuffle that moves real samples among themselves (padding stays put).

    Args:
        weights: [B] sample weights (> 0: a real sample).
        generator: the shuffle's random generator.

    Returns:
        [B] int64 indices: sample i takes the vector of sample idx[i].
    """
    idx = torch.arange(weights.numel())
    real = torch.nonzero(weights > 0).squeeze(-1)
    idx[real] = real[torch.randperm(real.numel(), generator=generator)]
    return idx


def rank_fields(names: Sequence[str], scores: Sequence[float]) -> List[dict]:
    """Fields from least to most important (ties by name), each with its score.

    Args:
        names: the fields.
        scores: their scores, in the same order.

    Returns:
        [{"field", "score"}], lowest score first.
    """
    order = sorted(range(len(names)), key=lambda i: (float(scores[i]), names[i]))
    return [{"field": names[i], "score": float(scores[i])} for i in order]
