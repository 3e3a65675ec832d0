"""Read a YAML recipe, apply dotted overrides, and build the typed `Recipe`, or fail with one clear line.

Checking is strict: an unknown key is an error with a "did you mean" suggestion, a value of the wrong type
is an error naming the key, and combinations that cannot run are refused before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftkit.errors import RecipeError, first_line
from ftkit.recipe.schema import MOVED_KEYS, Recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load `path`, apply `key=value` overrides, validate, and return the Recipe."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        hint = _nearby_recipe(path)
        raise RecipeError(f"recipe file not found: {path}" + (f" (did you mean {hint}?)" if hint else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{where}: cannot read it: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{where}: not UTF-8 text ({first_line(err)})") from None
    try:
        raw = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise RecipeError(f"{where}: not valid YAML: {first_line(err)}") from None
    if not isinstance(raw, type(OmegaConf.create({}))):
        raise RecipeError(f"{where}: a recipe is a mapping of sections (model, quant, method, data, train)")
    if not raw:  # every default at once is never what someone meant: a file emptied by mistake, or the wrong file
        raise RecipeError(f"{where}: the recipe is empty; a recipe sets at least one of its sections (model, quant, "
                          f"method, data, train), e.g. train: {{max_steps: 100}}")
    override_keys = {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-5)")
        override_keys[key.strip()] = item
    parsed = []
    for item in overrides:  # one at a time, so that a value YAML cannot read is named
        try:
            parsed.append(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise RecipeError(f"override {item!r}: its value is not valid YAML ({first_line(err)}); a value that "
                              f"starts with {{ or [ but is text needs quotes, e.g. data.template=\"'{{sentence}} "
                              f"It was'\"") from None
    try:
        merged = OmegaConf.merge(raw, *parsed) if parsed else raw
        data = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise RecipeError(f"{where}: {first_line(err)}") from None
    recipe = recipe_from_dict(data, where, override_keys)
    recipe.source = str(path)
    check_recipe(recipe, where)
    return recipe


def recipe_from_dict(data: Any, where: str = "<recipe>", override_keys: dict[str, str] | None = None) -> Recipe:
    """Build a Recipe from plain data, checking every key and type against the schema."""
    return _build(Recipe, data, "", _Context(where, override_keys or {}))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain data, as recipe.yaml holds it: component sections appear as sections of `method` and `quant`."""
    data = dataclasses.asdict(recipe)
    data.pop("source", None)
    quant, method = data["quant"], data["method"]
    engine_sections = quant.pop("sections")
    data["quant"] = {**quant, **engine_sections}
    sections = method.pop("sections")
    freeze = method.pop("freeze")
    data["method"] = {**method, **sections, "freeze": freeze}
    return data


def check_recipe(recipe: Recipe, where: str) -> None:
    """Cross-field checks and availability of formats and methods (what the schema types cannot say)."""
    from ftkit.recipe.checks import run_checks

    run_checks(recipe, where)


# --- building dataclasses from plain data --------------------------------------------------------------


class _Context:
    def __init__(self, where: str, override_keys: dict[str, str]):
        self.where = where
        self.override_keys = override_keys

    def error(self, key: str, message: str) -> RecipeError:
        source = f"override {self.override_keys[key]!r}" if key in self.override_keys else self.where
        return RecipeError(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def _build(cls: type, data: Any, prefix: str, ctx: _Context):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error(prefix.rstrip("."), f"must be a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    # A field marked "sections" holds the options sections components declare (method.zo, method.lora, ...).
    holder = next((f for f in dataclasses.fields(cls) if "sections" in f.metadata), None)
    sections = holder.metadata["sections"]() if holder else {}
    values, built = {}, {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key in fields:
            values[key] = _convert(hints[key], value, dotted, ctx)
        elif key in sections:
            built[key] = _build(sections[key].options, value, dotted + ".", ctx)
        elif dotted in MOVED_KEYS:
            raise ctx.error(dotted, f"has moved to {MOVED_KEYS[dotted]}")
        else:
            raise ctx.error(dotted, f"unknown key{_suggest(str(key), prefix, list(fields) + list(sections))}")
    if holder is not None:
        values[holder.name] = {name: built.get(name) or section.options() for name, section in sections.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, ctx: _Context):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", ctx)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, ctx)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.error(key, f"{value!r} is not one of: {choices}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ctx.error(key, f"must be a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(key, f"must be a mapping, got {_describe(value)}")
        return {str(k): _convert(args[1], v, f"{key}.{k}", ctx) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ctx.error(key, f"must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(key, f"must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ctx.error(key, f"must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ctx.error(key, f"must be a string, got {_describe(value)}")
        return value
    raise TypeError(f"schema type {hint!r} at {key} is not supported by the loader")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def all_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, dataclasses.Field | None, Any]]:
    """Every recipe key as (dotted name, its field, its type), in schema order: sections (a component section such
    as method.zo has no field), the keys inside them, and those of entries of a mapping of sections
    (data.tasks.<name>.kind)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            for name, section in f.metadata["sections"]().items():
                keys.append((prefix + name, None, section.options))
                keys.extend(all_keys(section.options, f"{prefix}{name}."))
        if f.metadata.get("internal"):
            continue
        dotted, hint = prefix + f.name, hints[f.name]
        keys.append((dotted, f, hint))
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, dotted + "."))
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            keys.extend(all_keys(typing.get_args(hint)[1], dotted + ".<name>."))
    return keys


def _suggest(key: str, prefix: str, siblings: list[str]) -> str:
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # The key may belong to another section: train.adapter -> method.adapter.
    elsewhere = [k for k, _, _ in all_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    if siblings:
        return f" (valid keys: {', '.join(siblings)})"
    return ""


def _nearby_recipe(path: Path) -> str | None:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return None
    names = [p.name for p in folder.glob("*.yaml")]
    close = difflib.get_close_matches(path.name, names, n=1)
    return str(folder / close[0]) if close else None

