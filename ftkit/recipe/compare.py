"""Whether two recipes compute the same thing: what a resumed run and a replay check against the recipe they
continue. Keys whose schema field says `computes=False` (how long, how often, where) may differ; see
ftkit.recipe.schema."""

from __future__ import annotations

from ftkit.recipe.load import all_keys

# Values compared whole rather than key by key: an architecture, and tasks defined in the recipe.
WHOLE = ("model.config", "data.tasks")


def non_computing_keys() -> set[str]:
    """The keys a resumed run or a replay may change, from the schema."""
    return {key for key, f, _ in all_keys() if f is not None and f.metadata.get("computes") is False}


def computing_differences(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """(key, value before, value after) for every key that changes the computation, in sorted order; recipes as
    `recipe_to_dict` gives them."""
    old, new = flatten(before), flatten(after)
    free = non_computing_keys()
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in free and old.get(key) != new.get(key)]


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in WHOLE:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
