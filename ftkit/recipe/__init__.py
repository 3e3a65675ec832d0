"""Recipes: the typed schema and its strict loader."""

from ftkit.recipe.load import load_recipe, recipe_from_dict, recipe_to_dict
from ftkit.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "recipe_to_dict"]
