"""`quant.bitsandbytes`: the bitsandbytes engine's options (torch-free), read by its conversion in bnb.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ftkit.components import Section, option


@dataclass
class BitsandbytesSpec:
    int4_type: Literal["nf4", "fp4"] = option("nf4", help="The 4-bit type that holds int4.")
    double_quant: bool = option(False, help="Quantize the 4-bit statistics too.")
    int8_threshold: float = option(6.0, help="LLM.int8's outlier threshold (int8).")


def _check(spec: BitsandbytesSpec, recipe, chosen, fail) -> None:
    if spec.int8_threshold < 0:
        fail("quant.bitsandbytes.int8_threshold", f"must be at least 0, got {spec.int8_threshold}")


BITSANDBYTES_SECTION = Section("bitsandbytes", BitsandbytesSpec, _check)
