"""What a data source provides to a model: its dense columns and categorical fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


@dataclass
class Schema:
    """The fields a data source gives a model: its dense columns (`dense_names`), its categorical
    fields (`sparse_names`, one embedding table each) and each field's table size."""

    dense_names: List[str]
    sparse_names: List[str]
    num_embeddings: List[int]
    """Rows of each categorical field's table, in `sparse_names` order."""

    @property
    def num_dense(self) -> int:
        """Dense columns."""
        return len(self.dense_names)

    @property
    def num_sparse(self) -> int:
        """Categorical fields."""
        return len(self.sparse_names)

    @staticmethod
    def table_name(feature: str) -> str:
        """The embedding table of a categorical field.

        Args:
            feature: the field's name.

        Returns:
            `t_<feature>`.
        """
        return f"t_{feature}"


def kept_schema(schema: Schema, kept_fields: Sequence[str]) -> Schema:
    """The schema restricted to `kept_fields` (in the schema's own order).

    Args:
        schema: the full schema.
        kept_fields: the categorical fields to keep (any order); dense columns all stay.

    Returns:
        A new schema.

    Raises:
        ConfigError: a kept field (`--kept-fields`, or a pruned checkpoint's) the schema does
            not have.
    """
    unknown = set(kept_fields) - set(schema.sparse_names)
    if unknown:
        from shark_torchrec.config import ConfigError

        raise ConfigError(
            f"unknown field(s) {', '.join(sorted(unknown))}; the model has {', '.join(schema.sparse_names)}"
        )
    idx = [i for i, f in enumerate(schema.sparse_names) if f in set(kept_fields)]
    return Schema(
        list(schema.dense_names), [schema.sparse_names[i] for i in idx], [schema.num_embeddings[i] for i in idx]
    )
