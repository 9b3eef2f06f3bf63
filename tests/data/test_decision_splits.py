"""The splits `shark prune` / `compress` decide on and confirm on (`Dataset.decision_splits`):
carved by line position, so that no line is in two of them."""

import numpy as np
import pytest

from conftest import TINY, run_shark
from shark_torchrec.config import DataConfig
from shark_torchrec.data import CHOICE, CONFIRM, SELECTION, open_dataset


def line_keys(split):
    """Where each line of a file split comes from (path and line number), in order."""
    return [str(k) for k, _ in split._numbered_lines()]


def write_csv(root, sizes):
    for s, n in sizes.items():
        (root / f"{s}.csv").write_text("label,c\n" + "\n".join(f"{i % 2},{s}{i}" for i in range(n)) + "\n")


@pytest.mark.parametrize("folds", [0, 4])
def test_file_splits_are_carved_disjoint_and_whole(tmp_path, folds):
    write_csv(tmp_path, {"train": 230, "dev": 41, "test": 17})
    plain = open_dataset(DataConfig(data=f"csv:{tmp_path}", folds=folds))
    view = plain.decision_splits()
    # Without --selection-fraction: dev's even lines select, lines i % 4 == 1 choose (the model
    # to serve) and i % 4 == 3 confirm.
    dev, sel, choice, conf = (
        line_keys(s) for s in (plain.splits["dev"], view.splits["dev"], view.splits[CHOICE], view.splits[CONFIRM])
    )
    assert sel == dev[0::2] and choice == dev[1::4] and conf == dev[3::4]
    assert len(set(sel) | set(choice) | set(conf)) == len(dev)
    assert line_keys(view.splits["train"]) == line_keys(plain.splits["train"])
    # --selection-fraction 0.2: lines i % 100 < 20 of train select; dev's even lines choose and
    # its odd lines confirm; the models train on the rest.
    carved = open_dataset(DataConfig(data=f"csv:{tmp_path}", folds=folds, selection_fraction=0.2))
    train = line_keys(plain.splits["train"])
    kept, chosen = line_keys(carved.splits["train"]), line_keys(carved.splits[SELECTION])
    assert chosen == [k for i, k in enumerate(train) if i % 100 < 20] and kept == [
        k for i, k in enumerate(train) if i % 100 >= 20
    ]
    view = carved.decision_splits()
    assert line_keys(view.splits["dev"]) == chosen
    assert line_keys(view.splits[CHOICE]) == dev[0::2] and line_keys(view.splits[CONFIRM]) == dev[1::2]
    for name, split in {**view.splits}.items():  # counts agree with what the batches carry
        assert split.num_lines() == sum(int(b.sample_weights.sum()) for b in view.batches(name, 64)), name
    # Vocabulary from the lines models train on: a selection line's value is out of vocabulary.
    ids = np.concatenate([b.sparse_features.values().numpy() for b in view.batches("dev", 64)])
    assert (ids == 0).all()


def test_synthetic_splits_are_carved_from_the_same_rows():
    cfg = dict(synthetic_train_rows=1000, synthetic_eval_rows=301, synthetic_scale=0.02)

    def rows(ds, split):
        out = [np.concatenate([b.labels.numpy()[:, None], b.dense_features.numpy()], 1) for b in ds.batches(split, 128)]
        weights = np.concatenate([b.sample_weights.numpy() for b in ds.batches(split, 128)]) > 0
        return np.concatenate(out)[weights]

    plain = open_dataset(DataConfig(**cfg))
    carved = open_dataset(DataConfig(**cfg, selection_fraction=0.07))
    train = rows(plain, "train")
    i = np.arange(len(train))
    assert np.array_equal(rows(carved, SELECTION), train[i % 100 < 7]) and np.array_equal(
        rows(carved, "train"), train[i % 100 >= 7]
    )
    view = plain.decision_splits()
    dev = rows(plain, "dev")
    assert np.array_equal(rows(view, "dev"), dev[0::2]) and np.array_equal(rows(view, CHOICE), dev[1::4])
    assert np.array_equal(rows(view, CONFIRM), dev[3::4])


def test_a_checkpoint_trained_on_the_selection_lines_is_refused(tmp_path):
    base = tmp_path / "base"
    run_shark("train", *TINY, "--epochs", "1", "--out-dir", str(base))
    for command in ("prune", "importance"):
        bad = run_shark(
            command,
            *TINY,
            "--checkpoint",
            str(base / "checkpoints"),
            "--selection-fraction",
            "0.1",
            "--out-dir",
            str(tmp_path / command),
            check=False,
        )
        assert bad.returncode != 0 and "--selection-fraction 0.0, this run asks 0.1" in bad.stderr, bad.stderr[-2000:]
    for value in ("0.005", "1.0"):
        bad = run_shark("train", *TINY, "--selection-fraction", value, "--out-dir", str(tmp_path / "x"), check=False)
        assert bad.returncode != 0 and "--selection-fraction" in bad.stderr


def test_splits_too_small_to_decide_on_are_refused_naming_the_fix():
    tiny = open_dataset(DataConfig(synthetic_train_rows=1000, synthetic_eval_rows=1, synthetic_scale=0.02))
    with pytest.raises(Exception, match="the choice split is empty: dev has 1 rows.*--selection-fraction F"):
        tiny.decision_splits()
    view = open_dataset(
        DataConfig(synthetic_train_rows=1000, synthetic_eval_rows=10, synthetic_scale=0.02)
    ).decision_splits()
    assert view.decision_splits() is view  # idempotent: dev is not cut twice


def test_a_selection_split_of_one_class_is_refused_naming_it(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    rows = {
        "train": [f"{i % 2},a{i % 5},b{i % 3}" for i in range(400)],
        "dev": [f"0,a{i % 5},b{i % 3}" for i in range(40)],
        "test": [f"{i % 2},a{i % 5},b{i % 3}" for i in range(40)],
    }
    for s, lines in rows.items():
        (data / f"{s}.csv").write_text("label,c,d\n" + "\n".join(lines) + "\n")
    bad = run_shark(
        "prune",
        "--data",
        f"csv:{data}",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--eval-batch-size",
        "64",
        "--embedding-dim",
        "8",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "p"),
        check=False,
    )
    assert bad.returncode != 0 and "the selection split's 20 rows are all negative" in bad.stderr, bad.stderr[-2000:]
