"""The configs shipped with vlamp (``src/vlamp/recipes/*.yaml``: Meta-World MT10 and MT50), usable
wherever a config file is: ``vlamp train --config mt10``."""

from __future__ import annotations

import os
from pathlib import Path

from vlamp.precision.errors import VlampError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # configs shipped with vlamp


def recipe_names() -> list[str]:
    """The recipes shipped with vlamp (``mt10``, ``mt50``), usable as ``--config NAME``."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def config_file(path: str | os.PathLike[str]) -> Path:
    """A config file's path: ``path`` itself, or a shipped recipe's when ``path`` is its name.

    Raises:
        VlampError: If it is neither; the message lists the recipes.
    """
    p = Path(path)
    if p.is_file():
        return p
    if str(path) in recipe_names():
        return RECIPES / f"{path}.yaml"
    raise VlampError(f"config file {str(p)!r} not found (a YAML file, or one of vlamp's recipes: "
                     f"{', '.join(recipe_names())})")
