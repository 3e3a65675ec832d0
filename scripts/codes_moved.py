"""How many low-bit codes training moved: each run's checkpoint against the untrained quantized model its recipe
builds (same format, same scales), one line per run.

    python scripts/codes_moved.py runs/study-smollm2/sst2/quzo_int4/seed0 runs/study-smollm2/sst2/quzo_int4_nearest/seed0

For QuZO this is where its update rounding shows: an update far below one grid step moves no code when rounded to
the nearest point, and moves a fraction of codes proportional to its size when rounded stochastically. Prints, per
run, the codes in all, how many differ from the base, by how many grid steps, and the largest change of any
full-precision tensor (norms, adapters). The codes are decoded by the layers themselves, the checkpoint read by the
loader `ftkit eval` uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ftkit.quant.linear import QuantLinear
from ftkit.runs import load_run_recipe
from ftkit.training import checkpoint as ckpt
from ftkit.training.setup import build_run


def moved(run_dir: Path, which: str) -> dict:
    recipe = load_run_recipe(run_dir)
    step_dir = ckpt.resolve(run_dir / "checkpoints", which)
    if step_dir is None:
        raise SystemExit(f"{run_dir}: no {which} checkpoint")
    model = build_run(recipe, splits=("train",)).model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    floats = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    with torch.no_grad():  # the untrained base, then the checkpoint loaded into the same model
        base_codes = {name: layer.code_values() for name, layer in layers.items()}  # grid values, float32
        base_floats = {name: t.detach().clone() for name, t in floats.items()}
        ckpt.load_checkpoint(step_dir, model)
        codes = changed = 0
        by_steps: dict[int, int] = {}
        for name, layer in layers.items():
            delta = layer.code_values() - base_codes[name]
            codes += delta.numel()
            nonzero = delta[delta != 0]
            changed += nonzero.numel()
            if layer.fmt.startswith("int"):  # integer grids: a change is a whole number of grid steps
                for value, count in zip(*torch.unique(nonzero, return_counts=True)):
                    by_steps[int(value)] = by_steps.get(int(value), 0) + int(count)
        float_change = max(((t.float() - base_floats[name].float()).abs().max().item()
                            for name, t in floats.items() if t.numel()), default=0.0)
    return {"run": str(run_dir), "checkpoint": step_dir.name, "codes": codes, "changed": changed,
            "by_steps": dict(sorted(by_steps.items())), "float_change": float_change}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--checkpoint", default="last", help="which checkpoint of each run: last (default) or best")
    args = parser.parse_args()
    for run_dir in args.runs:
        r = moved(run_dir, args.checkpoint)
        share = r["changed"] / max(1, r["codes"])
        steps = ", ".join(f"{k:+d}: {v:,}" for k, v in r["by_steps"].items()) or "none"
        print(f"{r['run']} ({r['checkpoint']}): {r['changed']:,} of {r['codes']:,} codes moved ({share:.4%}; "
              f"by grid steps {steps}); largest full-precision change {r['float_change']:.3g}")


if __name__ == "__main__":
    main()
