"""Post-training quantization of MiniLM on SST-2: dev accuracy of each weight format against fp32.

    python scripts/ptq_study.py [RUN_DIR]        # default runs/full_ft_sst2 (train it first)

Two columns: the fine-tuned run quantized after training (`ftkit eval RUN_DIR quant.format=...`), and the untrained
model with its prototype head (`ftkit eval recipes/full_ft_sst2.yaml quant.format=...`). Rounding is to nearest.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from ftkit.runs import evaluate_target

RECIPE = Path("recipes/full_ft_sst2.yaml")
CASES = [
    ("fp32", []),
    ("int8 per-channel", ["quant.format=int8"]),
    ("fp8_e4m3 per-channel", ["quant.format=fp8_e4m3"]),
    ("fp8_e5m2 per-channel", ["quant.format=fp8_e5m2"]),
    ("int4 per-channel", ["quant.format=int4"]),
    ("int4 group 128", ["quant.format=int4", "quant.group_size=128"]),
    ("int4 group 32", ["quant.format=int4", "quant.group_size=32"]),
    ("int4 per-channel, MSE-searched scales", ["quant.format=int4", "quant.scale_method=mse"]),
    ("int4 group 128, fp32 scales", ["quant.format=int4", "quant.group_size=128", "quant.scale_dtype=float32"]),
]


def main(run_dir: Path) -> None:
    print(f"_Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: `python scripts/ptq_study.py {run_dir}`._\n")
    print("| weights | fine-tuned run, quantized after training | untrained, prototype head |")
    print("| --- | --- | --- |")
    for label, overrides in CASES:
        trained = evaluate_target(run_dir, "dev", None, overrides)["accuracy"]
        zero_shot = evaluate_target(RECIPE, "dev", None, overrides)["accuracy"]
        print(f"| {label} | {100 * trained:.1f} | {100 * zero_shot:.1f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/full_ft_sst2"))
