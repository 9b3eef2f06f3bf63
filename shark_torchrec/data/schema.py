"""What a data source provides to a model: its dense columns and categorical fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


@dataclass
class Schema:
    dense_names: List[str]
    sparse_names: List[str]
    num_embeddings: List[int]
    """Rows of each categorical field's table, in `sparse_names` order."""

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_names)

    @staticmethod
    def table_name(feature: str) -> str:
        return f"t_{feature}"

