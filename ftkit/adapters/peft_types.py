"""Adds ftkit's method names to PEFT's `PeftType` enum.

PEFT's `register_peft_method` only accepts names already in `PeftType`, which a third-party package cannot edit,
so the member is added here exactly as PEFT defines its own (a `str` enum whose value is the upper-case name).
Adding a name twice is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType


def add_peft_type(name: str) -> PeftType:
    if name not in PeftType.__members__:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        PeftType._member_names_.append(name)
    return PeftType[name]


@dataclass
class LorettaPeftConfig(PeftConfig):
    """Options both LoRETTA methods share in PEFT."""

    tensor_rank: int = field(default=5, metadata={"help": "TT rank"})
    modes: Optional[int] = field(default=None, metadata={"help": "modes per dimension for automatic shapes"})
    init: str = field(default="identity", metadata={"help": "identity (the model is unchanged at first) or paper"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "module names or regex"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra trained and saved modules"})

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("identity", "paper"):
            raise ValueError(f"init must be 'identity' or 'paper', got {self.init!r}")
