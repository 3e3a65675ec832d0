"""LoRA, the baseline, through the PEFT library (same targets as LoRETTA_rep, so comparisons are like for like).
Declared here (torch-free); injected by layer.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ftkit.components import Adapter, Hook, Section, option


@dataclass
class LoraSpec:
    r: int = option(8, help="Rank of the update B A.")
    alpha: float = option(16.0, help="The update is (alpha / r) B A x.")
    dropout: float = option(0.0, help="Dropout on the adapter's input.")
    target_modules: Optional[list[str]] = option(None, help="Module-name suffixes or regular expressions; unset: the "
                                                            "architecture's query and value projections.")


def _check(spec: LoraSpec, recipe, chosen, fail) -> None:
    if not 0 <= spec.dropout < 1:
        fail("method.lora.dropout", f"must be in [0, 1), got {spec.dropout}")
    if spec.r < 1:
        fail("method.lora.r", f"must be at least 1, got {spec.r}")


def _check_base(recipe, chosen, fail) -> None:
    """PEFT wraps the layer types it knows: full-precision ones and those of the engines in `base_engines`."""
    if chosen.format.low_bit and chosen.engine.name not in chosen.adapter.base_engines:
        fail("method.adapter", f"lora wraps the layer types PEFT knows, and ftkit's {chosen.engine.name} "
             f"{chosen.format.name} layers are not one of them: use quant.engine: bitsandbytes (QLoRA), or "
             f"loretta_rep / loretta_adp, which work over every format")


LORA = Adapter("lora", "LoRA through PEFT (full-precision or bitsandbytes bases)",
               section=Section("lora", LoraSpec, _check), inject=Hook("ftkit.adapters.lora.layer:inject"),
               unwrap=Hook("ftkit.adapters.lora.layer:unwrap"), mergeable=True, parameters=r"lora_",
               base_engines=("bitsandbytes",), validate=_check_base)
