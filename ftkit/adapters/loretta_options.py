"""`method.loretta`: the options both LoRETTA adapters read (torch-free), and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ftkit.components import Section, option


@dataclass
class LorettaSpec:
    """Options of both LoRETTA methods (see ftkit/adapters/loretta_adp and loretta_rep)."""

    tensor_rank: int = option(5, help="TT rank of every core.")
    modes: Optional[int] = option(None, help="Modes per factorised dimension when shapes are automatic (unset: "
                                             "factors of about 8).")
    shapes: dict[str, list[int]] = option(factory=dict, help="Explicit TT shapes by role: down / up / head "
                                                             "(loretta_adp), a / b (loretta_rep).")
    target_modules: Optional[list[str]] = option(None, help="Module-name suffixes or regular expressions; unset: the "
                                                            "architecture's defaults.")
    init: Literal["identity", "paper"] = option("identity", help="identity: the model is unchanged at step 0 (one "
                                                                 "core zeroed); paper: Glorot-scale random cores.")
    bottleneck: int = option(64, help="loretta_adp: adapter width.")
    nonlinearity: Literal["relu", "gelu", "tanh", "silu"] = option("relu", help="loretta_adp: activation.")
    scaling: float = option(1.0, help="loretta_adp: multiplies the adapter's update.")
    train_norms: bool = option(True, help="loretta_adp: train the model's normalisation layers too (as the paper).")
    tt_head: bool = option(False, help="loretta_adp: a residual TT hidden layer before an encoder's classifier.")
    r: int = option(8, help="loretta_rep: LoRA rank.")
    alpha: float = option(16.0, help="loretta_rep: the update is (alpha / r) B A x.")
    dropout: float = option(0.0, help="Dropout on the adapter's input.")


def _check(spec: LorettaSpec, recipe, chosen, fail) -> None:
    for key in ("tensor_rank", "bottleneck", "r"):
        if getattr(spec, key) < 1:
            fail(f"method.loretta.{key}", f"must be at least 1, got {getattr(spec, key)}")
    if spec.modes is not None and spec.modes < 1:
        fail("method.loretta.modes", f"must be at least 1, got {spec.modes}")
    if not 0 <= spec.dropout < 1:
        fail("method.loretta.dropout", f"must be in [0, 1), got {spec.dropout}")
    adapter, roles = chosen.adapter.name, chosen.adapter.tt_roles
    for role, shape in spec.shapes.items():
        if role not in roles:
            fail(f"method.loretta.shapes.{role}", f"not a TT role of method.adapter {adapter} "
                 f"(roles: {', '.join(roles) or 'none'})")
        if not shape or any(n < 1 for n in shape):
            fail(f"method.loretta.shapes.{role}", f"needs positive modes, got {shape}")


def config_int(architecture: dict, key: str) -> int | None:
    value = architecture.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


LORETTA_SECTION = Section("loretta", LorettaSpec, _check)
