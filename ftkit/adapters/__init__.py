"""Adapters, declared in `ADAPTERS` (torch-free; see ftkit.components.Adapter). One folder per adapter: its
declaration and options in `__init__.py`, its layers and injection in `layer.py`.

`none` trains the model's own parameters (full fine-tuning).
"""

from ftkit.adapters.lora import LORA
from ftkit.adapters.loretta_adp import LORETTA_ADP
from ftkit.adapters.loretta_rep import LORETTA_REP
from ftkit.components import Adapter, Registry

FULL = Adapter("none", "no adapter: the model's own parameters are trained")

ADAPTERS: Registry = Registry("method.adapter", [FULL, LORETTA_ADP, LORETTA_REP, LORA])
