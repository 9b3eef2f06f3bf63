"""Score a trained (sharded) DLRM's feature fields over a data split.

The model is split at the interaction: *lookup* = the dense arch plus the embedding
collection (TorchRec's sharded lookup under DMP, our mixed-precision one, or a plain
collection) and *head* = interaction plus over-arch. Every method does one lookup per batch
and only differentiates or re-runs the head, which is small, so a sharded model is scored
with the same all-to-alls as its evaluation.

Fields: the categorical features in the model's order, and, when the data has continuous
features, `dense_features`: the dense arch's output vector, scored as one more field (as the
paper counts Criteo's 13 counts as one field). It is reported, never pruned: it holds no
embedding memory.

Each rank scores its own share of every global batch; the sums are all-reduced, so one rank
and N ranks over the same data agree (Taylor methods, up to float summation order).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torchrec.models.dlrm import DLRM, InteractionArch, SparseArch
from tqdm import tqdm

from shark_torchrec.config import ConfigError
from shark_torchrec.data import Dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.importance.scores import (
    ABSOLUTE,
    SIGNED,
    TaylorSums,
    accumulate_gradients,
    accumulate_values,
    permutation_index,
    rank_fields,
    taylor_scores,
)

METHODS = ("taylor", "taylor-signed", "permutation", "random")
"""`taylor`: the paper's importance, mean |g . (E[v] - v)| (the default). `taylor-signed`: the
signed mean of the same first-order term, a diagnostic only: near a trained optimum it ranks the
fields the model leans on most lowest, so never prune by it."""
METHOD_ALIASES = {"taylor-abs": "taylor"}
"""Older names still accepted: `taylor-abs` is `taylor` (same scores, recorded as `taylor`)."""
REMOVAL_ORDERS = ("per-byte", "importance")
log = logging.getLogger("shark")
DENSE_FIELD = "dense_features"
SCORE_SPLITS = ("dev", "train")


@dataclass
class FieldImportance:
    """The scores of one scoring run: the method, every field with its score (same order), the
    seconds scoring took, the samples scored, and the fields below."""

    method: str
    fields: List[str]
    scores: List[float]
    scoring_seconds: float
    samples: int
    means: Optional[torch.Tensor] = field(default=None, repr=False)
    """E[v] per field ([F, D]), when the method looked the data up."""
    prunable: List[str] = field(default_factory=list)
    """Fields that may be removed (the categorical ones)."""

    def ranking(self) -> List[dict]:
        """Fields from least to most important.

        Returns:
            [{"field", "score"}], lowest score first (ties by name).
        """
        return rank_fields(self.fields, self.scores)

    def removal_order(self, field_bytes: Dict[str, int], order: str = "per-byte", min_saving: float = 0.0) -> List[str]:
        """Prunable fields in the order to remove them, most removable first.

        Args:
            field_bytes: field -> embedding bytes its removal frees (its table's).
            order: `per-byte`: by score over bytes freed (expected AUC cost per byte saved,
                so a large weak table goes before a tiny weak one); `importance`: by score
                alone (the paper's Algorithm 1).
            min_saving: fields whose removal frees less than this fraction of all of
                `field_bytes` are left out (no stop test is spent on them).

        Returns:
            Field names.

        Raises:
            ConfigError: an unknown order (`--order`, which a TOML file sets unchecked).
        """
        if order not in REMOVAL_ORDERS:
            raise ConfigError(f"unknown removal order {order!r} (one of {', '.join(REMOVAL_ORDERS)})")
        total = sum(field_bytes.values())
        rows = [
            r
            for r in self.ranking()
            if r["field"] in self.prunable
            and field_bytes.get(r["field"], 0) >= min_saving * total
            and field_bytes.get(r["field"], 0) > 0
        ]
        if order == "per-byte":
            # A field whose score is 0 or negative costs nothing expected to remove: the
            # largest of those go first; then the rest by score per byte (stable sort: ties
            # keep the ranking's order).
            rows.sort(
                key=lambda r: (
                    (0, -field_bytes[r["field"]]) if r["score"] <= 0 else (1, r["score"] / field_bytes[r["field"]])
                )
            )
        return [r["field"] for r in rows]

    def mean_of(self, name: str) -> torch.Tensor:
        """E[v] of one field, from the scoring pass.

        Args:
            name: the field.

        Returns:
            [D] its mean vector.

        Raises:
            ValueError: the method made no lookups (`random`), so there are no means.
        """
        if self.means is None:
            raise ValueError(f"{self.method} scores carry no field means: use field_means()")
        return self.means[self.fields.index(name)]

    def to_json(self) -> Dict:
        """The method, samples, seconds and ranking, as JSON-able data (importance.json).

        Returns:
            {"method", "samples", "scoring_seconds", "ranking"}, the ranking as `ranking()` gives it.
        """
        return {
            "method": self.method,
            "samples": self.samples,
            "scoring_seconds": self.scoring_seconds,
            "ranking": self.ranking(),
        }


def find_dlrm(model: torch.nn.Module) -> DLRM:
    """The first TorchRec DLRM (or subclass) among a model's modules.

    Args:
        model: the model (DMP-wrapped or not).

    Returns:
        The DLRM.

    Raises:
        TypeError: the model holds none.
    """
    for m in model.modules():
        if isinstance(m, DLRM):
            return m
    raise TypeError("field scoring needs a TorchRec DLRM (or DLRM_DCN) inside the model")


class FieldView:
    """A DLRM seen as lookup -> [B, 1 + F, D] field vectors -> head -> logits."""

    def __init__(self, model: torch.nn.Module, has_dense: bool) -> None:
        self.dlrm = find_dlrm(model)
        self.has_dense = has_dense
        self.sparse_names = list(self.dlrm.sparse_arch.sparse_feature_names)

    @property
    def names(self) -> List[str]:
        """The fields scored: `dense_features` first when the data has dense features, then the
        categorical fields in the model's order."""
        return ([DENSE_FIELD] if self.has_dense else []) + self.sparse_names

    def lookup(self, batch) -> torch.Tensor:
        """The batch's field vectors: the dense arch's output, then every pooled embedding.

        Args:
            batch: a `Batch` on the model's device.

        Returns:
            [B, 1 + F, D].
        """
        dense = self.dlrm.dense_arch(batch.dense_features)
        arch = self.dlrm.sparse_arch
        if type(arch) is SparseArch:
            # TorchRec's SparseArch splits the pooled output by feature and concatenates it
            # again: 2 of the 7 ms of a lookup of 4,096 samples of 52 fields. When the output's
            # features come in the model's order, its values are that [B, F * D] already.
            pooled = arch.embedding_bag_collection(batch.sparse_features)
            if pooled.keys() == arch.sparse_feature_names and all(n == arch.D for n in pooled.length_per_key()):
                values = pooled.values()
                dtype = torch.promote_types(dense.dtype, values.dtype)  # as torch.cat would
                out = values.new_empty(dense.shape[0], 1 + arch.F, arch.D, dtype=dtype)
                out[:, 0] = dense
                out[:, 1:] = values.reshape(-1, arch.F, arch.D)
                return out
            sparse = torch.cat([pooled[name] for name in arch.sparse_feature_names], 1).reshape(-1, arch.F, arch.D)
        else:
            sparse = arch(batch.sparse_features)
        return torch.cat([dense.unsqueeze(1), sparse], 1)

    def head(self, vectors: torch.Tensor) -> torch.Tensor:
        """The rest of the model on field vectors: interaction (a `constant` pruned model's
        removed fields filled in first) and over-arch.

        Args:
            vectors: [B, 1 + F, D] as `lookup` returns them (or changed).

        Returns:
            [B] logits.
        """
        dense, sparse = vectors[:, 0], vectors[:, 1:]
        fill = getattr(self.dlrm, "fill_removed", None)
        if fill is not None:
            sparse = fill(sparse)
            vectors = torch.cat((dense.unsqueeze(1), sparse), dim=1)
        inter_arch = self.dlrm.inter_arch
        if type(inter_arch) is InteractionArch and inter_arch.F > 0:
            inter = _DotInteraction.apply(vectors, inter_arch.triu_indices)
        else:
            inter = inter_arch(dense_features=dense, sparse_features=sparse)
        return self.dlrm.over_arch(inter).squeeze(-1)

    def reported(self, per_field: torch.Tensor) -> torch.Tensor:
        """Drop the dense slot when the data has no dense features (its vector is constant).

        Args:
            per_field: [1 + F, ...] one entry per field of `lookup`'s vectors, the dense slot first.

        Returns:
            `per_field` itself when the data has dense features, else without its first entry:
            one entry per name of `names` either way.
        """
        return per_field if self.has_dense else per_field[1:]


INTERACTION_CHUNK_BYTES = 4 << 20
"""Bytes of [samples, F + 1, F + 1] products the scoring head's interaction holds at a time."""


class _DotInteraction(torch.autograd.Function):
    """TorchRec's `InteractionArch` forward and backward, value for value, a few hundred
    samples at a time. TorchRec builds the [B, (F + 1)^2] products of the whole batch (46 MB
    at 4,096 samples of 53 fields) and, backward, a zeroed buffer of the same size and two
    batched products over it: every pass goes to memory. Here the products and the gradient
    buffer of one chunk (`INTERACTION_CHUNK_BYTES`) stay in cache and the output is written in
    place (no concatenation). Each sample's products are the same batched matrix products
    TorchRec computes, summed the same way, so logits and gradients equal TorchRec's bit for
    bit (tested); on 4,096 samples of 53 fields at dim 16 a head forward and backward took 32
    ms against 66 (ad-hoc timings; 13 against 14 at 29 fields).

    forward(vectors [B, F + 1, D] (dense first), triu_indices [2, P]) -> [B, D + P]: the dense
    vector, then the dot product of every pair (i, j) of `triu_indices`, in that order.
    """

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, triu_indices: torch.Tensor) -> torch.Tensor:
        B, n, D = vectors.shape
        pairs = triu_indices[0] * n + triu_indices[1]
        out = vectors.new_empty(B, D + pairs.numel())
        out[:, :D] = vectors[:, 0]
        chunk = _chunk_samples(vectors)
        products = vectors.new_empty(min(chunk, B), n, n)
        for s in range(0, B, chunk):
            e = min(s + chunk, B)
            part = vectors[s:e]
            torch.bmm(part, part.transpose(1, 2), out=products[: e - s])
            torch.index_select(products[: e - s].view(e - s, n * n), 1, pairs, out=out[s:e, D:])
        ctx.save_for_backward(vectors, pairs)
        return out

    @staticmethod
    @once_differentiable  # its backward is not itself differentiated (no double backward)
    def backward(ctx, grad: torch.Tensor):
        vectors, pairs = ctx.saved_tensors
        B, n, D = vectors.shape
        chunk = _chunk_samples(vectors)
        grad_vectors = torch.empty_like(vectors)
        # The pairs' gradients land in a [chunk, n, n] buffer zeroed once: every chunk writes
        # the same positions. Then TorchRec's two products: bmm's gradient for its left
        # operand, and for its right one (the transposed vectors), added in that order.
        grad_products = vectors.new_zeros(min(chunk, B), n * n)
        right = vectors.new_empty(min(chunk, B), D, n)
        pair_grads = grad[:, D:]
        for s in range(0, B, chunk):
            e = min(s + chunk, B)
            part, g = vectors[s:e], grad_products[: e - s]
            g.index_copy_(1, pairs, pair_grads[s:e])
            g = g.view(e - s, n, n)
            torch.bmm(g, part, out=grad_vectors[s:e])
            torch.bmm(part.transpose(1, 2), g, out=right[: e - s])
            grad_vectors[s:e] += right[: e - s].transpose(1, 2)
        grad_vectors[:, 0] += grad[:, :D]
        return grad_vectors, None


def _chunk_samples(vectors: torch.Tensor) -> int:
    n = vectors.shape[1]
    return max(1, INTERACTION_CHUNK_BYTES // (n * n * vectors.element_size()))


def _batch_bytes(batch) -> int:
    """Bytes a batch's slots take, counting one id per field and slot (dense features, ids and
    lengths, labels, weights). From the local batch's fixed size, not the ids it happens to
    hold, so that every rank makes the same caching decisions (its lookups are collectives)."""
    slots, fields = batch.labels.numel(), len(batch.sparse_features.keys())
    return slots * (4 * batch.dense_features.shape[1] + fields * (8 + 4) + 4 + 4)


def _sample_losses(logits: torch.Tensor, batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none") * batch.sample_weights


def _all_reduce(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        dist.all_reduce(t)
    return t


class _Clock:
    """Seconds spent in model computation and collectives (not in reading data)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


def score_fields(
    model: torch.nn.Module,
    dataset: Dataset,
    method: str = "taylor",
    split: str = "dev",
    global_batch: int = 4096,
    env: Optional[DistEnv] = None,
    rounds: int = 1,
    seed: int = 0,
    progress: bool = False,
    cache_bytes: int = 1 << 30,
) -> FieldImportance:
    """Importance of every field of `model` on `split` (dev, or train; never test).

    `method`: one of METHODS, or an alias of METHOD_ALIASES (the result names the method itself).
    `cache_bytes`: taylor keeps up to this many bytes of batches (and their field vectors)
    between its passes; when the split's batches fit, its data is read once, and when their
    vectors fit too, nothing is looked up twice.

    Collective when `env` has several ranks: every rank calls it on its share of the data.

    Args:
        model: a trained DLRM (sharded or not); left in its training mode.
        dataset: the data.
        method: the scoring method (see above).
        split: `dev` or `train`.
        global_batch: samples per global batch.
        env: the ranks (default: one process on CPU).
        rounds: permutation: shuffles per field.
        seed: random and permutation: the seed.
        progress: show progress bars (rank 0).
        cache_bytes: see above.

    Returns:
        The scores, with E[v] per field unless the method is `random`.

    Raises:
        ConfigError: an unknown method, or a split other than dev and train (`--method`,
            `--score-split`, which a TOML file sets unchecked).
    """
    method = canonical_method(method)
    if split not in SCORE_SPLITS:
        raise ConfigError(f"fields are scored on dev or train data, not {split!r} (test is for reporting)")
    env = env or DistEnv(0, 1, torch.device("cpu"), "none")
    view = FieldView(model, has_dense=dataset.schema.num_dense > 0)
    prunable = list(view.sparse_names)
    clock = _Clock()
    if method == "random":
        with clock:
            g = torch.Generator().manual_seed(seed)
            scores = torch.rand(len(view.names), generator=g, dtype=torch.float64)
        return FieldImportance(method, view.names, scores.tolist(), clock.seconds, 0, None, prunable)

    was_training = model.training
    model.eval()
    show = progress and env.is_main
    total = dataset.num_batches(split, global_batch)

    def batches(desc: str):
        it = dataset.batches(split, global_batch, env.rank, env.world_size)
        return tqdm(it, total=total, desc=desc, disable=not show, leave=False)

    dim = view.dlrm.sparse_arch.D
    sums = TaylorSums(1 + len(view.sparse_names), dim)
    try:
        if method == "taylor-signed":
            for batch in batches("taylor-signed scores"):
                batch = batch.to(env.device)
                with clock:
                    v, g = _vectors_and_gradients(view, batch)
                    accumulate_gradients(sums, v, g, batch.sample_weights)
            with clock:
                sums.load_flat(_all_reduce(sums.flat(), env))
                scores = taylor_scores(sums, SIGNED)
        elif method == "taylor":
            # Pass 1, lookups only: E[v]. Pass 2: forward/backward of the head. Pass 1 keeps
            # the batches while they fit in `cache_bytes`, and their field vectors too while
            # those fit beside them (a dev split usually does): pass 2 then reads no data
            # (and, with the vectors, looks nothing up). Batches past the cache are read again.
            cache: List[Tuple[Optional[torch.Tensor], object]] = []
            cached = 0
            for k, batch in enumerate(batches("field means")):
                batch = batch.to(env.device)
                with clock, torch.no_grad():
                    v = view.lookup(batch)
                    accumulate_values(sums, v, batch.sample_weights)
                    size = _batch_bytes(batch)
                    cached += size
                    if cached <= cache_bytes:
                        # Vectors only where the batches still to come (about this one's size
                        # each) keep their room: not reading the data again comes first.
                        vector_bytes = v.numel() * v.element_size()
                        keep_v = cached + vector_bytes + size * (total - k - 1) <= cache_bytes
                        cached += vector_bytes if keep_v else 0
                        cache.append((v if keep_v else None, batch))
            with clock:
                sums.load_flat(_all_reduce(sums.flat(), env))
                means = sums.means()
                abs_sums = TaylorSums(sums.num_fields, dim)
            for v, batch in tqdm(cache, desc="taylor scores", disable=not show, leave=False):
                with clock:
                    v, g = _vectors_and_gradients(view, batch, v)
                    accumulate_gradients(abs_sums, v, g, batch.sample_weights, means)
            if len(cache) < total or any(v is None for v, _ in cache):
                log.info(
                    "taylor: %d of %d batches and %d of their field vectors fit the scoring cache of %.2f GiB; "
                    "the others are read or looked up again (--score-cache-gb sets it)",
                    len(cache),
                    total,
                    sum(v is not None for v, _ in cache),
                    cache_bytes / 2**30,
                )
            if len(cache) < total:
                rest = dataset.batches(split, global_batch, env.rank, env.world_size, skip_batches=len(cache))
                for batch in tqdm(
                    rest, total=total - len(cache), desc="taylor scores (past the cache)", disable=not show, leave=False
                ):
                    batch = batch.to(env.device)
                    with clock:
                        v, g = _vectors_and_gradients(view, batch)
                        accumulate_gradients(abs_sums, v, g, batch.sample_weights, means)
            with clock:
                abs_sums.load_flat(_all_reduce(abs_sums.flat(), env))
                scores = taylor_scores(abs_sums, ABSOLUTE)
        else:
            increase = torch.zeros(sums.num_fields, dtype=torch.float64)
            gen = torch.Generator().manual_seed(seed * 65_537 + env.rank)
            for batch in batches("permutation scores"):
                batch = batch.to(env.device)
                with clock, torch.no_grad():
                    increase += _permutation_increase(view, batch, rounds, gen, sums)
            with clock:
                sums.load_flat(_all_reduce(sums.flat(), env))
                increase = _all_reduce(increase, env)
                scores = increase / sums.samples.clamp_min(1) / rounds
    finally:
        model.train(was_training)
    seconds = torch.tensor([clock.seconds])
    if env.world_size > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return FieldImportance(
        method,
        view.names,
        view.reported(scores).tolist(),
        float(seconds.item()),
        int(sums.samples.item()),
        view.reported(sums.means()).float(),
        prunable,
    )


def canonical_method(method: str) -> str:
    """The method's own name (`taylor-abs` -> `taylor`); ConfigError for an unknown one.

    Args:
        method: a name of METHODS or an alias of METHOD_ALIASES.

    Returns:
        The name in METHODS.
    """
    name = METHOD_ALIASES.get(method, method)
    if name not in METHODS:
        known = ", ".join([*METHODS, *(f"{a} (= {m})" for a, m in METHOD_ALIASES.items())])
        raise ConfigError(f"unknown importance method {method!r} (one of {known})")
    return name


def field_means(
    model: torch.nn.Module,
    dataset: Dataset,
    split: str = "dev",
    global_batch: int = 4096,
    env: Optional[DistEnv] = None,
) -> Dict[str, torch.Tensor]:
    """E[v] of every field over a split (one lookup pass, all-reduced): what `constant`
    removal feeds in place of a removed field.

    Args:
        model: a DLRM (sharded or not); left in its training mode.
        dataset: the data.
        split: the split to average over.
        global_batch: samples per global batch.
        env: the ranks (default: one process on CPU).

    Returns:
        field -> [D] its mean vector (`dense_features` too when the data has dense features).
    """
    env = env or DistEnv(0, 1, torch.device("cpu"), "none")
    view = FieldView(model, has_dense=dataset.schema.num_dense > 0)
    sums = TaylorSums(1 + len(view.sparse_names), view.dlrm.sparse_arch.D)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataset.batches(split, global_batch, env.rank, env.world_size):
                batch = batch.to(env.device)
                accumulate_values(sums, view.lookup(batch), batch.sample_weights)
    finally:
        model.train(was_training)
    sums.load_flat(_all_reduce(sums.flat(), env))
    return dict(zip(view.names, view.reported(sums.means()).float()))


def _vectors_and_gradients(view: FieldView, batch, vectors: Optional[torch.Tensor] = None):
    """One lookup (unless `vectors` are given), one forward and backward of the head: the
    field vectors and d(sum of per-sample losses)/d(vectors), each sample's own gradient."""
    v = vectors
    if v is None:
        with torch.no_grad():
            v = view.lookup(batch)
    v = v.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _sample_losses(view.head(v), batch).sum()
        (g,) = torch.autograd.grad(loss, v)
    return v.detach(), g


def _permutation_increase(view: FieldView, batch, rounds: int, gen: torch.Generator, sums: TaylorSums) -> torch.Tensor:
    """Sum over samples of the loss increase when one field's vectors are shuffled within the
    batch, for every field, summed over `rounds` shuffles: one lookup, 1 + F * rounds heads."""
    v = view.lookup(batch)
    accumulate_values(sums, v, batch.sample_weights)
    base = _sample_losses(view.head(v), batch)
    out = torch.zeros(v.shape[1], dtype=torch.float64)
    for f in range(0 if view.has_dense else 1, v.shape[1]):
        for _ in range(rounds):
            idx = permutation_index(batch.sample_weights, gen)
            shuffled = v.clone()
            shuffled[:, f] = v[idx, f]
            out[f] += (_sample_losses(view.head(shuffled), batch) - base).sum().double()
    return out
