"""Load recipes/multi30k.py as a module (it is a script, not part of the package)."""

import importlib.util
import sys

from multi30k_fixtures import REPO

RECIPE = REPO / "recipes" / "multi30k.py"


def load_recipe_module(fresh: bool = False):
    """The recipe module; ``fresh`` executes it again (to see what its import-time code does)."""
    if "multi30k_recipe" in sys.modules and not fresh:
        return sys.modules["multi30k_recipe"]
    spec = importlib.util.spec_from_file_location("multi30k_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["multi30k_recipe"] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module
