"""A GGUF file's key-value metadata (architecture, hyperparameters, tokenizer, chat template) carried from one file
into another as it was stored, value types included."""

from __future__ import annotations

from gguf import GGUFReader, GGUFValueType, GGUFWriter

# Written by GGUFWriter itself from what it is given (the header's counts, the architecture passed to it).
WRITER_OWNED = ("GGUF.", "general.architecture")


def field_value(reader: GGUFReader, key: str):
    """The Python value of a metadata field (a list for arrays), or None if the file has no such key."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def copy_fields(reader: GGUFReader, writer: GGUFWriter, replace: dict | None = None) -> None:
    """Every metadata field of `reader` into `writer`, in the file's order and with its stored types; `replace`
    maps a key to a new value of the same type."""
    replace = replace or {}
    for key, field in reader.fields.items():
        if key.startswith(WRITER_OWNED):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = replace.get(key, field.contents())
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
