"""Weight formats. A format is a function that converts a model's linear layers in place (`FORMATS`).

`none` keeps the weights in the model's dtype (fp32 or bf16). The low-bit formats store real codes: int8 and
FP8 one byte per weight, int4 two weights per byte, with bf16 or fp32 scales (see ftkit.quant.linear). The
bitsandbytes engine provides frozen nf4/fp4/int8 bases (ftkit.quant.bnb).
"""

from __future__ import annotations

from ftkit.quant.codecs import CODECS
from ftkit.quant.convert import quantize_model

BNB_FORMATS = ("int8", "int4")


def keep_full_precision(model, spec):
    return model


# name -> converter(model, QuantSpec) -> model
FORMATS = {"none": keep_full_precision, **{name: quantize_model for name in CODECS}}
