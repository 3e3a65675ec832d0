"""The recipe reference (docs/recipe.md), generated from the schema and the components' declared options, so it
cannot drift from what the loader accepts:

    python -m ftkit.recipe.reference docs/recipe.md
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from ftkit.recipe.load import all_keys

INTRO = """# Recipe reference

Every key a recipe may hold, its type, default and meaning. Generated from `ftkit/recipe/schema.py` and the options
the engines, optimizers and adapters declare (`python -m ftkit.recipe.reference docs/recipe.md`; a test checks it is
current). Keys marked *no* under "computes" decide how long, how often or where, not what is computed: a resumed run
and a replay may change them. An unknown key, a value of the wrong type or an impossible combination is refused before
anything is loaded, with one line naming the file and the key.
"""


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        return type_name(inner[0]) + " or null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value!r}`" if isinstance(value, (list, dict, str)) and value != "" else f"`{value}`"


def render() -> str:
    """One table per section (top level, model, ..., method.zo, data.tasks), each listing its own keys."""
    tables: dict[str, list[str]] = {"": []}
    for key, f, hint in all_keys():
        if _is_section(f, hint):
            tables[key] = []
        else:
            section = key.rpartition(".")[0].removesuffix(".<name>")
            tables[section].append(_row(key, f, hint))
    lines = [INTRO]
    for section, rows in tables.items():
        title = "## top level" if not section else f"{'##' if '.' not in section else '###'} `{section}`"
        what = " (each task defined in the recipe, under its name)" if section == "data.tasks" else ""
        lines += ["", title + what, "", HEADER, *rows]
    return "\n".join(lines) + "\n"


HEADER = "| key | type | default | computes | meaning |\n| --- | --- | --- | --- | --- |"


def _row(key, f, hint) -> str:
    computes = "" if f.metadata.get("computes", True) else "no"
    cells = [f"`{key.rsplit('.', 1)[-1]}`", type_name(hint), default_of(f), computes, _meaning(f)]
    return "| " + " | ".join(cell.replace("|", "\\|") if i > 1 else cell for i, cell in enumerate(cells)) + " |"


def _meaning(f) -> str:
    """The help line, and for a key naming a component the registered choices with their summaries."""
    meaning, choices = f.metadata.get("help", ""), f.metadata.get("choices")
    if choices is None:
        return meaning
    return meaning + " One of: " + "; ".join(f"`{c.name}`: {c.summary}" for c in choices())


def _is_section(f, hint) -> bool:
    return f is None or dataclasses.is_dataclass(hint) or _holds_sections(hint)


def _holds_sections(hint) -> bool:
    return typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1])


if __name__ == "__main__":
    text = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
