"""The suite's two-process runs, trained together: each test module registers its runs when it is imported (`run`),
and the session fixture `two_process_runs` (conftest.py) trains the runs of every module selected in one torchrun
launch, each through `ftkit train` in turn (tests/train_each.py), instead of one launch per run: most of a launch's
time is three processes importing torch. The tests train their one-process references themselves."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, tiny_recipe
from train_each import MARK

# Global batch 8 in chunks of 4: one chunk per process on 2 processes, two chunks in turn on one. Evaluation in
# batches of 8 deals 4 dev batches and 109 test batches (an odd count) to the processes.
SHARED = {"max_steps": 20, "batch_size": 8, "micro_batch_size": 4, "eval_every": 10, "save_every": 10,
          "eval_batch_size": 8, "lr": 2e-3}
RUNS: dict[str, dict] = {}  # name: {"module", "sections", "overrides"}


def run(name: str, *overrides: str, **sections) -> str:
    """Register a two-process run of the tiny recipe with `sections` (and command-line `overrides`); its name."""
    assert name not in RUNS, f"two-process run {name!r} registered twice"
    RUNS[name] = {"module": sys._getframe(1).f_globals["__name__"], "sections": sections, "overrides": list(overrides)}
    return name


def sections_of(name: str) -> dict:
    return copy.deepcopy(RUNS[name]["sections"])


def write(path: Path, output_dir: Path, **sections) -> Path:
    """The tiny recipe with `sections`, SHARED under them, its run directory `output_dir`, written to `path`."""
    sections = copy.deepcopy(sections)
    sections["train"] = {**SHARED, **sections.get("train", {}), "output_dir": str(output_dir)}
    path.write_text(yaml.safe_dump(tiny_recipe(**sections), sort_keys=False))
    return path


def launch(modules: set[str], root: Path) -> dict[str, tuple[Path, str]]:
    """Train the runs `modules` registered in one `torchrun --standalone --nproc_per_node 2` launch, under `root`;
    {name: (run directory, the output of its `ftkit train`)}. The test that needs a run fails on a non-zero exit."""
    chosen = [name for name, entry in RUNS.items() if entry["module"] in modules]
    commands = [json.dumps([name, "train", str(write(root / f"{name}.yaml", root / name, **RUNS[name]["sections"])),
                            *RUNS[name]["overrides"]]) for name in chosen]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "train_each.py"), *commands], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = dict(part.split("\n", 1) for part in done.stdout.split(MARK)[1:])
    return {name: (root / name, outputs[name]) for name in chosen}
