"""Train a ~2 GB (in fp32) table under a 0.35 budget and print peak RSS as JSON (run as a
separate process so that its peak is its own)."""

import json
import resource
import sys
import time

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.labels import tag_labels


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(rows: int, dim: int, steps: int) -> None:
    torch.manual_seed(0)
    before = rss()
    t0 = time.perf_counter()
    table = EmbeddingBagConfig(name="big", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])
    ebc = MixedPrecisionEmbeddingBagCollection(
        [table],
        device=torch.device("cpu"),
        precision_policy=PrecisionPolicy(
            memory_budget=0.35, reassign_every=4, optimizer="rowwise_adagrad", learning_rate=0.1
        ),
    )
    t_init = time.perf_counter() - t0
    after_init = rss()
    B = 4096
    for step in range(steps):
        ids = (torch.rand(B * 4) ** 4 * rows).long()  # skewed: hot rows repeat
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=ids, lengths=torch.full((B,), 4, dtype=torch.int32)
        )
        out = ebc(tag_labels(kjt, (torch.rand(B) < 0.3).float()))
        (out.values() ** 2).sum().backward()

    store = ebc.stores[0]
    print(
        json.dumps(
            {
                "rss_before_bytes": before,
                "rss_after_init_bytes": after_init,
                "peak_rss_bytes": rss(),
                "fp32_bytes": rows * dim * 4,
                "embedding_bytes": store.table_bytes()[0]["embedding_bytes"],
                "group_rows": store.group_counts(),
                "init_seconds": t_init,
                "finite": bool(torch.isfinite(store.read_rows(torch.arange(1000))).all()),
            }
        )
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
