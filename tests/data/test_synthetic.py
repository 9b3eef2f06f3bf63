import json

import numpy as np

from conftest import TINY, run_shark
from shark_torchrec.data.synthetic import SyntheticGenerator


def test_same_seed_same_data_and_streamable_ranges():
    a, b, c = SyntheticGenerator(3, 0.05), SyntheticGenerator(3, 0.05), SyntheticGenerator(4, 0.05)
    for x, y in zip(a.rows("train", 1000, 9000), b.rows("train", 1000, 9000)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.rows("train", 0, 500)[2], c.rows("train", 0, 500)[2])
    # a range produced alone equals the same rows inside a larger range (resume is O(1))
    whole = a.rows("dev", 0, 10_000)
    part = SyntheticGenerator(3, 0.05).rows("dev", 5000, 6000)
    for w, p in zip(whole, part):
        np.testing.assert_array_equal(w[5000:6000], p)


def test_cardinalities_zipf_and_truth():
    gen = SyntheticGenerator(0)
    cards = [f.cardinality for f in gen.fields]
    assert min(cards) <= 50 and max(cards) == 1_000_000
    _, _, ids = gen.rows("train", 0, 20_000)
    j = [f.name for f in gen.fields].index("c9")  # a million-row noise field
    _, counts = np.unique(ids[:, j], return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[0] > 50 * np.median(counts)  # heavy head, long tail
    roles = {f["role"] for f in gen.truth()["fields"]}
    assert roles == {"strong", "medium", "weak", "interaction", "noise"}


def test_planted_strength_order(tmp_path):
    """Without a strong field a model loses more AUC than without a weak field."""
    args = [*TINY, "--synthetic-train-rows", "20000", "--synthetic-scale", "0.01", "--lr", "0.05"]
    auc = {}
    for name, drop in (("full", []), ("no_strong", ["--drop", "c1"]), ("no_weak", ["--drop", "c5"])):
        out = tmp_path / name
        run_shark("train", *args, *drop, "--out-dir", str(out), "--metrics-out", str(out / "m.json"))
        auc[name] = json.loads((out / "m.json").read_text())["test_auc"]
    print(auc)
    loss_strong = auc["full"] - auc["no_strong"]
    loss_weak = auc["full"] - auc["no_weak"]
    assert loss_strong > 0.02, auc
    assert loss_strong > 3 * max(loss_weak, 0.0), auc
