"""Fixed-seed golden outputs of `shark train`, `shark compress` and the export, reproduced bit
for bit by later changes (refactors, new tiers, fused kernels).

A golden is a JSON file in `tests/goldens/`: the run's figures (AUC, log loss, bytes, rows per
group) and, per checkpoint tensor and for the exported model's test logits, a SHA-256 of the raw
bytes plus float64 summaries. Floating point sums differ between CPU instruction sets (an AMD
EPYC and an Intel Xeon with AMX give different matmul roundings, and 48 training steps carry
them into every weight), so a golden holds one capture per kind of CPU it was recorded on, each
with its CPU. On a recorded kind the test compares hashes exactly; on any other kind the hashes
are not comparable and it compares the summaries of the first capture within CROSS_CPU_TOLERANCE
instead (the failure message says which).

Capture (only when a change of results is intended, and say so in the commit):

    .venv/bin/python tests/helpers/golden.py train        # runs `shark train GOLDEN_TRAIN` and records it
    .venv/bin/python tests/helpers/golden.py compress     # runs `shark compress GOLDEN_COMPRESS` and records it
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict

import torch

if __name__ == "__main__":  # run as a script: tests/ (conftest) is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TINY  # noqa: E402

GOLDEN_DIR = Path(__file__).parents[1] / "goldens"

# Exact figures of a run (timings and RSS are not reproducible, so they are left out).
TRAIN_KEYS = (
    "test_auc",
    "test_logloss",
    "dev_auc",
    "dev_logloss",
    "steps",
    "embedding_bytes",
    "optimizer_bytes",
    "priority_bytes",
    "fp32_embedding_bytes",
    "rows_fp32",
    "rows_fp16",
    "rows_int8",
)
COMPRESS_KEYS = (
    *TRAIN_KEYS,
    "base_test_auc",
    "memory_ratio",
    "prune_memory_ratio",
    "quant_budget",
    "kept_fields",
    "pruned_fields",
)


def cpu_signature() -> str:
    """The CPU model and vector extensions (what can change float results)."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = " ".join(
                    sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "sse", "amx")))
                )
                break
    except OSError:
        pass
    return f"{model} | {flags} | torch {torch.__version__}"


def tensor_digest(t: torch.Tensor) -> Dict[str, Any]:
    t = t.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() and t.dtype != torch.bool else t.to(torch.uint8)
    f = t.double() if t.is_floating_point() else t.to(torch.float64)
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
        "sum": float(f.sum()) if t.numel() else 0.0,
        "abs_sum": float(f.abs().sum()) if t.numel() else 0.0,
    }


def state_digest(state: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Digest of every tensor of a (nested) state dict; other values by repr."""
    out: Dict[str, Any] = {}
    for key in sorted(state, key=str):
        value, name = state[key], f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(state_digest(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            out[name] = tensor_digest(value)
        elif isinstance(value, (list, tuple)):
            out[name] = repr(value)
        else:
            out[name] = repr(value)
    return out


def checkpoint_digest(ckpt_dir: Path) -> Dict[str, Any]:
    from shark_torchrec.jobs.checkpoint import load_full_state

    return state_digest(load_full_state(ckpt_dir))


def export_logits_digest(quantize_ckpt: Path) -> Dict[str, Any]:
    """The inference model exported from a checkpoint, scored on the test split."""
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import export_inference_model

    model, cfg = export_inference_model(quantize_ckpt)
    data = open_dataset(cfg.dataset, cfg.train.seed)
    if cfg.model.kept_fields:
        data = data.with_fields(list(cfg.model.kept_fields))
    with torch.no_grad():
        logits = torch.cat([model(b)[1][1] for b in data.batches("test", cfg.train.eval_batch_size)])
    ebc = model.model.sparse_arch.embedding_bag_collection
    return {"logits": tensor_digest(logits), "inference_bytes": ebc.memory_bytes(), **ebc.group_rows()}


def train_fingerprint(run_dir: Path) -> Dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "metrics": {k: metrics[k] for k in TRAIN_KEYS},
        "dev_history": [[h["step"], h["dev_auc"], h["dev_logloss"]] for h in metrics["dev_history"]],
        "checkpoint": checkpoint_digest(run_dir / "checkpoints"),
    }


def compress_fingerprint(run_dir: Path) -> Dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text())
    return {
        "metrics": {k: metrics[k] for k in COMPRESS_KEYS},
        "stages": {
            "base": {k: stages["base"][k] for k in ("test_auc", "dev_auc", "embedding_bytes")},
            "prune": {
                k: stages["prune"][k]
                for k in ("kept_fields", "pruned_fields", "memory_ratio", "stop_reason", "dev_auc", "test_auc")
            },
            "quantize": {k: stages["quantize"][k] for k in ("budget", "test_auc", "embedding_bytes")},
        },
        "base_checkpoint": checkpoint_digest(run_dir / "base" / "checkpoints"),
        "quantize_checkpoint": checkpoint_digest(run_dir / "quantize" / "checkpoints"),
        "export": export_logits_digest(run_dir / "quantize" / "checkpoints"),
    }


FINGERPRINTS = {"train": train_fingerprint, "compress": compress_fingerprint}

# The golden runs: every flag that decides a result is given (defaults may change).
GOLDEN_TRAIN = [
    *TINY,
    "--embedding-dim",
    "16",
    "--precision",
    "shark",
    "--memory-budget",
    "0.6",
    "--fp32-fraction",
    "0.1",
    "--reassign-every",
    "10",
    "--lr",
    "0.1",
    "--alpha",
    "2.0",
    "--beta",
    "0.99",
    "--seed",
    "0",
]
GOLDEN_COMPRESS = [
    *TINY,
    "--target-memory",
    "0.3",
    "--max-auc-drop",
    "0.03",
    "--max-iterations",
    "2",
    "--order",
    "per-byte",
    "--min-saving",
    "0.01",
    "--max-rejections",
    "1",
    "--confidence",
    "0.95",
    "--support-rows",
    "2000",
    "--quant-epochs",
    "2",
    "--quant-evals-per-epoch",
    "0",
    "--checkpoint-every",
    "10",
    "--lr",
    "0.1",
    "--seed",
    "0",
]
COMMANDS = {"train": ["train", *GOLDEN_TRAIN], "compress": ["compress", *GOLDEN_COMPRESS]}


# Tolerances of a run on an unrecorded kind of CPU: a tensor's sum and absolute sum within
# CROSS_CPU_TOLERANCE of its absolute sum (a sum of signed values can cancel), and a figure
# (AUC, log loss, bytes) within FIGURE_TOLERANCE of max(1, itself). Measured between the AMD
# EPYC and Intel Xeon (AMX) captures: at most 5.5e-4 (train) and 1.1e-3 (compress, an optimizer
# state) of a tensor's absolute sum, 6.1e-5 of a figure (compress's test log loss).
CROSS_CPU_TOLERANCE = 5e-3
FIGURE_TOLERANCE = 5e-4


def _differences(want: Any, got: Any, path: str, exact: bool, out: list) -> None:
    if isinstance(want, dict) and "sha256" in want and isinstance(got, dict):
        if exact:
            if want != got:
                out.append(f"{path}: {got} != golden {want}")
        else:
            same_shape = want["shape"] == got["shape"] and want["dtype"] == got["dtype"]
            scale = max(1.0, abs(want["abs_sum"]))
            close = all(abs(want[k] - got[k]) <= CROSS_CPU_TOLERANCE * scale for k in ("sum", "abs_sum"))
            if not (same_shape and close):
                out.append(f"{path}: {got} vs golden {want} (summaries, other CPU)")
        return
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got or k not in want:
                out.append(f"{path}.{k}: {'missing' if k not in got else 'not in the golden'}")
            else:
                _differences(want[k], got[k], f"{path}.{k}", exact, out)
        return
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got) and not exact:
        for i, (w, g) in enumerate(zip(want, got)):
            _differences(w, g, f"{path}[{i}]", exact, out)
        return
    if isinstance(want, float) and isinstance(got, float) and not exact:
        if abs(want - got) > FIGURE_TOLERANCE * max(1.0, abs(want)):
            out.append(f"{path}: {got!r} != golden {want!r}")
        return
    if want != got:
        out.append(f"{path}: {got!r} != golden {want!r}")


def _captures(case: str) -> list:
    """The golden's captures, one a kind of CPU: [{"cpu": ..., "fingerprint": ...}, ...]."""
    path = GOLDEN_DIR / f"{case}.json"
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    return record["captures"]


def check(case: str, run_dir: Path) -> None:
    """Compare a finished run with its golden: exactly with the capture from this kind of CPU,
    else within CROSS_CPU_TOLERANCE / FIGURE_TOLERANCE of the first capture.

    Args:
        case: "train" or "compress".
        run_dir: the finished run's --out folder.

    Returns:
        None; AssertionError listing every difference.
    """
    captures = _captures(case)
    if not captures:
        raise AssertionError(f"tests/goldens/{case}.json holds no capture: run `tests/helpers/golden.py {case}`")
    here = [c for c in captures if c["cpu"] == cpu_signature()]
    exact = bool(here)
    golden = here[0] if here else captures[0]
    got = json.loads(json.dumps(FINGERPRINTS[case](Path(run_dir))))  # the same float round trip
    problems: list = []
    _differences(golden["fingerprint"], got, case, exact, problems)
    if problems:
        where = (
            ""
            if exact
            else f" (no capture from this CPU, {cpu_signature()}; compared within {CROSS_CPU_TOLERANCE} "
            f"(tensors) and {FIGURE_TOLERANCE} (figures) with the capture from {golden['cpu']})"
        )
        shown = "\n".join(problems[:40])
        raise AssertionError(
            f"{case} differs from tests/goldens/{case}.json{where}: {len(problems)} difference(s)\n{shown}"
        )


def capture(case: str, run_dir: Path) -> Path:
    """Record a finished run as the golden's capture for this kind of CPU (replacing an earlier
    one from the same kind; the other kinds' captures stay).

    Args:
        case: "train" or "compress".
        run_dir: the finished run's --out folder.

    Returns:
        The golden's path.
    """
    GOLDEN_DIR.mkdir(exist_ok=True)
    path = GOLDEN_DIR / f"{case}.json"
    mine = {"cpu": cpu_signature(), "fingerprint": FINGERPRINTS[case](Path(run_dir))}
    others = [c for c in _captures(case) if c["cpu"] != mine["cpu"]]
    record = {"case": case, "captures": [*others, mine]}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(2)
    import tempfile

    from conftest import run_shark

    with tempfile.TemporaryDirectory() as tmp:
        run_shark(*COMMANDS[sys.argv[1]], "--out", f"{tmp}/run")
        print(capture(sys.argv[1], Path(tmp) / "run"))
