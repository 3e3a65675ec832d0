"""Weight formats. A format is a function that converts a model's linear layers in place.

`none` keeps the weights in the model's dtype (fp32 or bf16).
"""

from __future__ import annotations


def keep_full_precision(model, spec):
    return model


# name -> converter(model, QuantSpec) -> model
FORMATS = {"none": keep_full_precision}
