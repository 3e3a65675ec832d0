"""Adds ftkit's method names to PEFT's `PeftType` enum.

PEFT's `register_peft_method` only accepts names already in `PeftType`, which a third-party package cannot edit,
so the member is added here exactly as PEFT defines its own (a `str` enum whose value is the upper-case name).
Adding a name twice is harmless.
"""

from __future__ import annotations

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
