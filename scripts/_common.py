"""What the scripts share: where the repository is, the model shapes they measure, how they time calls side by
side, and how they write a section of a Markdown file. A script imports it as `_common` (its own folder is first
on sys.path when it runs); scripts do not import one another for these. Imports no torch until a function needs it,
so scripts that only plan and report stay light.

Models, data and methods are built by `ftkit.training.setup.build_run`, as `ftkit train` builds them."""

from __future__ import annotations

import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"  # the datasets beside a checkout (README: Data)


def use_shared_data() -> None:
    """FTKIT_DATA_DIR, where not set, is the shared data beside this checkout."""
    os.environ.setdefault("FTKIT_DATA_DIR", str(SHARED_DATA.resolve()))


# Model shapes (Hugging Face configs) for random-weight speed and memory measurements.
OPT_125M = {"model_type": "opt", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "ffn_dim": 3072, "word_embed_proj_dim": 768, "max_position_embeddings": 2048, "vocab_size": 50272}
OPT_350M = {"model_type": "opt", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
            "ffn_dim": 4096, "word_embed_proj_dim": 512, "do_layer_norm_before": False,
            "max_position_embeddings": 2048, "vocab_size": 50272}
OPT_1_3B = {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
            "ffn_dim": 8192, "word_embed_proj_dim": 2048, "max_position_embeddings": 2048, "vocab_size": 50272}
LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


# The SmolLM2 studies' tasks (scripts/study_smollm2.py, scripts/zo_race.py): per task its data section (MeZO's
# 1,000 / 500 draw where the training file allows; CB and COPA as MeZO does), tokens, and how many validation rows are
# its test set (all, or the first N where evaluating is slow).
SMOLLM2_TASKS = {
    "sst2": {"data": {"task": "sst2", "n_train": 1000, "n_dev": 500, "max_seq_len": 128}, "metric": "accuracy"},
    "cb": {"data": {"task": "cb", "n_train": 150, "n_dev": 100, "max_seq_len": 320}, "metric": "macro_f1"},
    "copa": {"data": {"task": "copa", "n_train": 300, "n_dev": 100, "max_seq_len": 64}, "metric": "accuracy"},
    "boolq": {"data": {"task": "boolq", "n_train": 1000, "n_dev": 200, "max_seq_len": 320}, "metric": "accuracy",
              "test_rows": 500},
    "squad": {"data": {"task": "squad", "n_train": 1000, "n_dev": 100, "max_seq_len": 384}, "metric": "f1",
              "test_rows": 200},
}
SMOLLM2_TEST_FILES = {"boolq": "val.jsonl", "squad": "validation.jsonl"}


def smollm2_test_subset(task: str, root: Path) -> Path:
    """The first `test_rows` rows of the task's validation file (its test set under MeZO's protocol), written once
    under `root`."""
    rows = SMOLLM2_TASKS[task]["test_rows"]
    source = Path(os.environ["FTKIT_DATA_DIR"]) / task / SMOLLM2_TEST_FILES[task]
    target = root / task / f"test-{rows}.jsonl"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
        target.write_text("".join(lines), encoding="utf-8")
    return target


def utc_stamp(fmt: str = "%Y-%m-%d %H:%M") -> str:
    """Now, in UTC, for the "_Measured ..._" line above a table."""
    return f"{datetime.now(timezone.utc):{fmt}} UTC"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin_medians(cases: list[tuple[str, object]], repeats: int, warmup: int = 2,
                        device=None) -> list[tuple[str, float]]:
    """Median time of each case's call, timing the cases in turn so machine noise falls on all of them alike (the
    device synchronised around each call, so a GPU's queued work is timed too), under inference_mode."""
    import torch

    device = device if device is not None else torch.device("cpu")
    times = {label: [] for label, _ in cases}
    with torch.inference_mode():
        for _ in range(warmup):
            for _, call in cases:
                call()
        for _ in range(repeats):
            for label, call in cases:
                synchronize(device)
                start = time.perf_counter()
                call()
                synchronize(device)
                times[label].append(time.perf_counter() - start)
    return [(label, statistics.median(times[label])) for label, _ in cases]


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace the text between <!-- marker:begin --> and <!-- marker:end --> (appended if absent)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
