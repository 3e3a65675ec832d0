"""Summarise finished runs as Markdown for BENCHMARKS.md: dev metric by step, best, time, memory.

    python scripts/report_run.py runs/full_ft_sst2 [runs/other ...]
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch


def report(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = summary["metric"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dev = [(e["step"], e[metric]) for e in events if e["split"] == "dev"]
    lines = [
        f"### {run_dir.name}",
        "",
        f"- recipe: `{summary['recipe']}`; steps: {summary['steps']}; trainable parameters: {summary['trainable_params']:,}",
        f"- wall time: {summary['wall_seconds'] / 60:.1f} min ({summary['seconds_per_step']:.3f} s/step); "
        f"peak RSS: {summary['peak_rss_mb']:.0f} MB",
        f"- best dev {metric}: {summary['best_dev']:.4f} at step {summary['best_step']}",
        "",
        "| step | " + " | ".join(str(s) for s, _ in dev) + " |",
        "| --- | " + " | ".join("---" for _ in dev) + " |",
        f"| dev {metric} (%) | " + " | ".join(f"{100 * v:.1f}" for _, v in dev) + " |",
    ]
    if summary.get("test"):
        lines.append(f"\ntest {metric} on the best checkpoint: {100 * summary['test'][metric]:.1f}%")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    print(f"_Reported {date.today().isoformat()} on {platform.machine()} with {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}._\n")
    for path in paths:
        print(report(Path(path)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
