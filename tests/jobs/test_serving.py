"""The serving export: raw lines in, the exported model's logits out, with torch (and the export's
kernel library) alone, in a process that never imports shark_torchrec."""

import csv
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_shark, shared_data
from shark_torchrec.cli import main as shark_main
from shark_torchrec.config import JobConfig
from shark_torchrec.data import open_dataset
from shark_torchrec.data.batch import make_batch
from shark_torchrec.jobs.export import export_inference_model, to_inference, write_serving_files
from shark_torchrec.models.serving import serving_model

# Runs in a fresh interpreter, outside the repository, without the repository on its path.
FRESH_SCRIPT = """
import json, sys
import torch
export_dir, lines_file, crafted_file, out_file = sys.argv[1:5]
sys.path.insert(0, export_dir)
import serve
model = serve.load(export_dir)
logits = model.score_file(lines_file)
crafted = model.score_lines(json.loads(open(crafted_file).read()))
torch.save({"logits": logits, "crafted": crafted}, out_file)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("shark_torchrec", "torchrec", "fbgemm_gpu"))
assert "shark_torchrec" not in sys.modules, loaded
print(json.dumps({"loaded": loaded, "serve_file": serve.__file__}))
"""


def reader_logits(model, data, lines):
    """The in-process model on lines read by training's own reader (layout and encoder)."""
    parsed = [data.layout.parse(line) for line in lines]
    n = len(parsed)
    ids = np.array([[data.encoder.encode(j, v) for j, v in enumerate(cats)] for _, _, cats in parsed], dtype=np.int64)
    if data.columns is not None:
        ids = ids[:, data.columns]
    batch = make_batch(
        data.schema.sparse_names,
        np.array([p[0] for p in parsed], np.float32),
        np.array([p[1] for p in parsed], np.float32).reshape(n, -1),
        ids,
        np.ones(n, bool),
    )
    with torch.no_grad():
        return model(batch)[1][1]


def split_logits(model, data, split):
    """The in-process model on a split, as training and the goldens score it (real samples only)."""
    out = []
    with torch.no_grad():
        for batch in data.batches(split, 1024):
            out.append(model(batch)[1][1][batch.sample_weights > 0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def frappe_export(tmp_path_factory):
    """A tiny frappe run (shark precision, rows in all three groups), exported by `shark export`."""
    frappe = shared_data("frappe")
    tmp = tmp_path_factory.mktemp("frappe")
    run_shark(
        "train",
        "--data",
        f"csv:{frappe}",
        "--label",
        "click",
        "--precision",
        "shark",
        "--memory-budget",
        "0.6",
        "--fp32-fraction",
        "0.1",
        "--reassign-every",
        "5",
        "--max-steps",
        "20",
        "--batch-size",
        "256",
        "--embedding-dim",
        "8",
        "--dense-arch",
        "16",
        "--over-arch",
        "16",
        "--no-progress",
        "--out",
        str(tmp / "run"),
    )
    assert shark_main(["export", str(tmp / "run" / "checkpoints"), "--out", str(tmp / "export")]) == 0
    return frappe, tmp / "run" / "checkpoints", tmp / "export"


def test_frappe_export_serves_raw_lines_in_a_fresh_process(frappe_export, tmp_path):
    frappe, ckpt, export = frappe_export
    exported, cfg = export_inference_model(ckpt)
    rows = exported.model.sparse_arch.embedding_bag_collection.group_rows()
    assert all(rows[f"rows_{g}"] for g in ("fp32", "fp16", "int8")), rows  # all three go through the artifact
    manifest = json.loads((export / "serving.json").read_text())
    assert manifest["encoding"]["kind"] == "vocab" and manifest["max_abs_logit_diff_dev"] == 0.0
    data = open_dataset(cfg.dataset, cfg.train.seed)
    vocab = json.loads((export / "vocab.json").read_text())
    assert {f: len(v) + 1 for f, v in vocab.items()} == manifest["field_rows"]

    test_lines = (frappe / "test.csv").read_text().splitlines()[1:]
    seen = next(v for v in vocab["user"] if v != "400")
    crafted = [
        test_lines[0],
        test_lines[0].replace("1,400,", "1,123456789,", 1),  # a user never seen in train: the OOV row
        test_lines[0].replace("1,400,", f"1, {seen} ,", 1),  # values are stripped, as training strips them
    ]
    assert test_lines[0].startswith("1,400,") and "123456789" not in vocab["user"]
    want_crafted = reader_logits(exported, data, crafted)
    unlabelled = [line.split(",", 1)[1] for line in crafted]  # serving lines need no label column
    (tmp_path / "crafted.json").write_text(json.dumps(crafted + unlabelled))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_SCRIPT,
            str(export),
            str(frappe / "test.csv"),
            str(tmp_path / "crafted.json"),
            str(tmp_path / "out.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and Path(report["serve_file"]).parent == export
    assert not Path(report["serve_file"]).resolve().is_relative_to(ROOT)
    served = torch.load(tmp_path / "out.pt")

    want = split_logits(exported, data, "test")
    assert served["logits"].shape == want.shape == (len(test_lines),)
    torch.testing.assert_close(served["logits"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(served["crafted"], torch.cat([want_crafted, want_crafted]), rtol=0, atol=1e-6)
    assert data.encoder.encode(0, "123456789") == 0
    assert served["crafted"][1] != served["crafted"][0]  # the OOV row is not the seen user's row
    # export.json keeps its figures; the recipe in the export is the package's, verbatim
    record = json.loads((export / "export.json").read_text())
    assert record["max_abs_logit_diff_dev"] == 0.0 and record["inference_bytes"] > 0
    assert (export / "serve.py").read_text() == (ROOT / "shark_torchrec" / "serve.py").read_text()
    assert "serving_model.pt" in (export / "README.md").read_text()


def test_shark_export_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert shark_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "shark export: error:" in capsys.readouterr().err


def test_shark_export_keeps_an_earlier_export_unless_told(frappe_export, capsys):
    _, ckpt, export = frappe_export
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    assert shark_main(["export", str(ckpt), "--out", str(export)]) == 2
    assert "already holds files: pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before  # nothing written


def _criteo_files(root: Path, rng: random.Random) -> None:
    """Criteo-format TSV: empty and negative counts, empty categorical values, rare values."""
    root.mkdir()
    for split, n in (("train", 300), ("dev", 40), ("test", 60)):
        lines = []
        for _ in range(n):
            dense = [rng.choice(["", "-3", "0", str(rng.randint(1, 500)), "2.5"]) for _ in range(13)]
            cats = [rng.choice(["", f"{rng.randint(0, 8):08x}", f"{rng.randint(0, 10**6):08x}"]) for _ in range(26)]
            lines.append("\t".join([str(rng.randint(0, 1)), *dense, *cats]))
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def _headed_csv_files(root: Path, rng: random.Random) -> None:
    """A headed CSV with the label in the middle, dense columns, a dropped column and quoted
    values holding the delimiter."""
    root.mkdir()
    header = "site,price,click,city,noise,age"
    for split, n in (("train", 300), ("dev", 40), ("test", 60)):
        lines = [header]
        for _ in range(n):
            site = rng.choice(['"a,b"', "c", "d", f"s{rng.randint(0, 40)}", ""])
            price = rng.choice(["", "1.5", str(rng.randint(-5, 50))])
            city = rng.choice(['"x, y"', "z", f"c{rng.randint(0, 30)}"])
            age = rng.choice(["", str(rng.randint(10, 90))])
            lines.append(f"{site},{price},{rng.randint(0, 1)},{city},{rng.random()},{age}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _random_inference_model(cfg: JobConfig, data):
    """A mixed-precision model of `cfg` over `data` with random weights, converted for inference
    (the export does not care whether the weights were trained)."""
    from shark_torchrec.data.schema import kept_schema
    from shark_torchrec.models.dlrm import build_dlrm, table_configs
    from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection

    kept = kept_schema(data.full_schema, list(cfg.model.kept_fields) or data.full_schema.sparse_names)
    ebc = MixedPrecisionEmbeddingBagCollection(
        tables=table_configs(kept, cfg.model.embedding_dim),
        precision_policy=cfg.quant.policy(0.1, 1e-8, 0),
        device=torch.device("cpu"),
    )
    model = build_dlrm(data.full_schema, cfg.model, ebc=ebc, seed=0)
    if cfg.model.field_removal == "constant":
        with torch.no_grad():
            model.model.field_constants.normal_(generator=torch.Generator().manual_seed(1))
    return to_inference(model)


CASES = {
    # Criteo TSV, hashed ids, DLRM_DCN with two fields removed and fed constants.
    "criteo-hash-dcn-constant": dict(
        files=_criteo_files,
        source="criteo",
        encoding="hash",
        hash_size=97,
        min_count=1,
        arch="dlrm_dcn",
        kept=tuple(f"C{i}" for i in range(1, 27) if i not in (3, 17)),
        removal="constant",
    ),
    # Headed CSV, vocabularies with min_count 2 (rare values share row 0), DLRM sliced to 1 field.
    "csv-vocab-dlrm-slice": dict(
        files=_headed_csv_files,
        source="csv",
        encoding="vocab",
        hash_size=1,
        min_count=2,
        arch="dlrm",
        kept=("city",),
        removal="slice",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_served_lines_match_the_training_reader(tmp_path, case):
    spec = CASES[case]
    root = tmp_path / "data"
    spec["files"](root, random.Random(case))
    cfg = JobConfig()
    cfg.dataset.data = f"{spec['source']}:{root}"
    if spec["source"] == "csv":
        cfg.dataset.label, cfg.dataset.dense, cfg.dataset.drop = "click", "price,age", "noise"
    cfg.dataset.encoding, cfg.dataset.hash_size, cfg.dataset.min_count = (
        spec["encoding"],
        spec["hash_size"],
        spec["min_count"],
    )
    cfg.model.arch, cfg.model.kept_fields, cfg.model.field_removal = spec["arch"], spec["kept"], spec["removal"]
    cfg.model.embedding_dim, cfg.model.dense_arch, cfg.model.over_arch = 8, (16,), (16,)
    cfg.quant.precision, cfg.quant.row_fractions = "shark", (0.3, 0.3)
    data = open_dataset(cfg.dataset).with_fields(list(spec["kept"]))
    model = _random_inference_model(cfg, data)
    out = tmp_path / "export"
    out.mkdir()
    write_serving_files(serving_model(model, data.schema.num_dense), data, cfg.dataset, out)

    recipe_spec = importlib.util.spec_from_file_location(f"serve_{case.replace('-', '_')}", out / "serve.py")
    serve = importlib.util.module_from_spec(recipe_spec)
    recipe_spec.loader.exec_module(serve)
    served = serve.load(out)
    test_file = root / ("test.tsv" if spec["source"] == "criteo" else "test.csv")
    got = served.score_file(test_file)
    want = split_logits(model, data, "test")
    assert got.shape == want.shape == (60,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The encoded inputs are the training reader's ids, value for value.
    lines = test_file.read_text().splitlines()[1 if spec["source"] == "csv" else 0 :]
    _, values, _ = served.encode_lines(lines)
    (batch,) = data.batches("test", 1024)  # one batch: feature-major ids of all its real samples
    assert torch.equal(values, batch.sparse_features.values())
    if spec["encoding"] == "hash":
        assert manifest_of(out)["encoding"]["size"] == 97 and not (out / "vocab.json").exists()
    else:
        assert int((values == 0).sum()) > 0  # some test values are rare in train: the OOV row
    # A line without its label column scores as with it.
    label, delimiter = data.layout.label_index, data.layout.delimiter
    k = next(i for i, line in enumerate(lines) if '"' not in line)  # a line a plain split cuts right
    cut = lines[k].split(delimiter)
    unlabelled = delimiter.join(cut[:label] + cut[label + 1 :])
    torch.testing.assert_close(served.score_lines([unlabelled]), got[k : k + 1], rtol=0, atol=1e-6)  # batch of 1


def manifest_of(out: Path) -> dict:
    return json.loads((out / "serving.json").read_text())


def test_bad_serving_input_is_named(tmp_path):
    """Errors name the line and column (raw lines) or the tensor at fault (the model)."""
    root = tmp_path / "data"
    _headed_csv_files(root, random.Random(0))
    cfg = JobConfig()
    cfg.dataset.data, cfg.dataset.label, cfg.dataset.dense, cfg.dataset.drop = (
        f"csv:{root}",
        "click",
        "price,age",
        "noise",
    )
    cfg.model.embedding_dim, cfg.model.dense_arch, cfg.model.over_arch = 8, (16,), (16,)
    cfg.quant.precision, cfg.quant.row_fractions = "shark", (0.3, 0.3)
    data = open_dataset(cfg.dataset)
    out = tmp_path / "export"
    out.mkdir()
    write_serving_files(serving_model(_random_inference_model(cfg, data), 2), data, cfg.dataset, out)
    sys.path.insert(0, str(out))
    try:
        import serve  # the export's copy
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("serve", None)
    served = serve.load(out)
    with pytest.raises(ValueError, match="line 2: expected 6 columns"):
        served.score_lines(["c,1,0,z,0.5,30", "c,1"])
    with pytest.raises(ValueError, match="line 1: column price: 'cheap' is not a number"):
        served.score_lines(["c,cheap,0,z,0.5,30"])
    huge = "x" * (csv.field_size_limit() + 1)  # a line the csv module cannot read, as training names it
    with pytest.raises(ValueError, match=r"line 2: the line cannot be read \(csv: field larger"):
        served.score_lines(["c,1,0,z,0.5,30", f"c,1,0,{huge},0.5,30"])
    # The header given as data is refused (an all-categorical header would score as values).
    with pytest.raises(ValueError, match="line 2: this is the header line"):
        served.score_lines(["c,1,0,z,0.5,30", "site,price,click,city,noise,age"])
    with pytest.raises(ValueError, match="line 1: this is the header line"):
        served.score_lines(["site, price,city,noise,age"])
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("site,cost,click,city,noise,age\nc,1,0,z,0.5,30\n")
    with pytest.raises(ValueError, match="header"):
        served.score_file(bad_header)
    # A byte-order mark (as some editors write) is not part of the header, as in training.
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_text("site,price,click,city,noise,age\nc,1,0,z,0.5,30\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    torch.testing.assert_close(served.score_file(marked), served.score_file(plain), rtol=0, atol=0)
    F = len(served.fields)
    with pytest.raises(Exception, match="expected \\[2 fields \\* batch 1\\]"):
        served(torch.zeros(1, 2), torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int32))
    with pytest.raises(Exception, match="outside its table"):
        served(torch.zeros(1, 2), torch.full((F,), 10**6, dtype=torch.int64), torch.ones(F, dtype=torch.int32))


def _recipe_and_copy(export: Path, tmp_path: Path, name: str):
    """(the export's serve.py imported as module `name`, a copy of the export's files to alter)."""
    spec = importlib.util.spec_from_file_location(name, export / "serve.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    moved = tmp_path / "export"
    moved.mkdir()
    for f in export.iterdir():
        if f.is_file():
            (moved / f.name).write_bytes(f.read_bytes())
    return recipe, moved


def test_the_export_ships_its_kernel_library_and_refuses_another_torch(frappe_export, tmp_path):
    """The scripted model calls torch.ops.shark.mixed_lookup: the library is in the export, named
    in serving.json with the torch version it was built for; another version is refused up front."""
    _, _, export = frappe_export
    manifest = json.loads((export / "serving.json").read_text())
    assert manifest["version"] == 2 and (export / manifest["kernels"]).is_file()
    assert manifest["torch"] == torch.__version__
    recipe, moved = _recipe_and_copy(export, tmp_path, "export_serve")
    (moved / "serving.json").write_text(json.dumps({**manifest, "torch": "1.13.0"}))
    with pytest.raises(RuntimeError, match=r"built for torch 1\.13\.0; this is torch"):
        recipe.load(moved)
    assert manifest["kernels_built_for"]["machine"] == platform.machine()
    other = {**manifest, "kernels_built_for": {**manifest["kernels_built_for"], "machine": "sparc64"}}
    (moved / "serving.json").write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="compiled for sparc64 CPUs"):
        recipe.load(moved)
    (moved / "serving.json").write_text(json.dumps(manifest))
    (moved / manifest["kernels"]).unlink()
    with pytest.raises(FileNotFoundError, match="kernel library is missing"):
        recipe.load(moved)


def test_one_bit_rows_are_not_read_by_a_library_of_another_layout(frappe_export, tmp_path):
    """An export records the 1-bit row layout its library reads; loaded where a library of another
    layout is already in the process (here shark_torchrec's own, layout 3), an export holding
    1-bit rows in layout 1 (scale and bias) or 2 (an fp16 magnitude) is refused, named; one
    without 1-bit rows, or in the same layout, loads. Likewise symmetric int4 rows where the
    loaded library predates them."""
    _, _, export = frappe_export
    manifest = json.loads((export / "serving.json").read_text())
    assert manifest["one_bit_layout"] == int(torch.ops.shark.one_bit_layout()) == 3
    assert manifest["rows_int1"] == 0
    recipe, moved = _recipe_and_copy(export, tmp_path, "export_serve_layout")
    old = {k: v for k, v in manifest.items() if k not in ("one_bit_layout", "rows_int1")}  # as written before
    recipe.load_kernels(moved, old)  # no 1-bit rows (export.json says none): loads
    (moved / "export.json").write_text(json.dumps({"rows_int1": 12}))
    with pytest.raises(
        RuntimeError, match="holds 1-bit rows in layout 1; .* reads layout 3: load .* in a fresh process"
    ):
        recipe.load_kernels(moved, old)
    with pytest.raises(RuntimeError, match="holds 1-bit rows in layout 1"):
        recipe.load_kernels(moved, {**manifest, "one_bit_layout": 1, "rows_int1": 3})
    with pytest.raises(RuntimeError, match="holds 1-bit rows in layout 2"):
        recipe.load_kernels(moved, {**manifest, "one_bit_layout": 2, "rows_int1": 3})
    recipe.load_kernels(moved, {**manifest, "rows_int1": 3})  # the same layout: loads
    # Symmetric int4 and int2 rows (groups 7 and 8): this library reads ids 0..8 and loads them;
    # one that predates a tier refuses its rows by name (here: the groups shifted past the library's).
    assert int(torch.ops.shark.served_groups()) == 9 and manifest["rows_int4s"] == manifest["rows_int2s"] == 0
    recipe.load_kernels(moved, {**manifest, "rows_int4s": 5, "rows_int2s": 2})
    recipe.SYMMETRIC_GROUPS = {"rows_int4s": 7, "rows_int2s": 9}  # as if the library read one id fewer
    with pytest.raises(RuntimeError, match=r"holds symmetric rows \(int2s\); .* predates them: load .* in a fresh"):
        recipe.load_kernels(moved, {**manifest, "rows_int4s": 5, "rows_int2s": 2})
    recipe.load_kernels(moved, {**manifest, "rows_int4s": 5})  # no int2s rows: loads
    # A library from before both tiers has no served_groups op at all: it reads ids 0..6.
    recipe.SYMMETRIC_GROUPS = {"rows_int4s": 7, "rows_int2s": 8}

    class _OlderLibrary:  # the ops such a library registered
        mixed_lookup_ranked = torch.ops.shark.mixed_lookup_ranked
        one_bit_layout = torch.ops.shark.one_bit_layout

    class _Torch:
        __version__ = torch.__version__

        class ops:  # noqa: N801
            shark = _OlderLibrary

    recipe.torch = _Torch
    with pytest.raises(RuntimeError, match=r"holds symmetric rows \(int4s\); .* predates them"):
        recipe.load_kernels(moved, {**manifest, "rows_int4s": 5})
    recipe.load_kernels(moved, manifest)  # no symmetric rows: loads


def test_serve_py_warns_when_the_run_chose_another_model(monkeypatch, tmp_path, capsys):
    """An export whose compression run chose TorchRec's model over it (`served_instead` in
    serving.json): serve.py scores it as asked, and says on stderr which model was chosen
    (a newcomer ran the shipped serve.py and got, silently, the model that failed its test)."""
    import torch

    from shark_torchrec import serve

    class Exported:
        manifest = {"served_instead": "torchrec_int8_model.pt"}

        def score_file(self, path, batch_size):
            return torch.tensor([0.5])

    monkeypatch.setattr(serve, "load", lambda d: Exported())
    assert serve.main([str(tmp_path), str(tmp_path / "lines.csv")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "0.5\n"
    assert "serve.py: warning: the compression run chose torchrec_int8_model.pt over this model" in captured.err
    Exported.manifest = {}
    assert serve.main([str(tmp_path), str(tmp_path / "lines.csv")]) == 0
    assert capsys.readouterr().err == ""
