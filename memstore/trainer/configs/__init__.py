"""The trainer's built-in configs, shipped inside the package as ``*.yaml`` files.

``path(name_or_path)`` turns what a user passes to ``--config`` into a file: an existing
file wins, so a user's own config always does what it says; otherwise a built-in name,
with or without ``.yaml`` (``tiny``, ``facts-small-memory.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from memstore.errors import InvalidArgument

# The folder of this package: installed, the yaml files are package data beside this file.
FOLDER = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def names() -> list[str]:
    """The built-in configs' names (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in FOLDER.glob(f"*{SUFFIX}"))


def path(name_or_path: str | os.PathLike) -> Path:
    """The config file ``name_or_path`` names: an existing file as given, else the
    built-in config of that name (``.yaml`` optional); anything else raises
    :class:`InvalidArgument` listing the built-in names."""
    if isinstance(name_or_path, bool) or not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidArgument(
            "config", "a file path or a built-in config name", type(name_or_path).__name__
        )
    given = Path(name_or_path)
    if given.is_file():
        return given
    name = os.fspath(name_or_path)
    stem = name.removesuffix(SUFFIX)
    builtin = names()
    if stem not in builtin:
        raise InvalidArgument(
            "config", f"an existing file or a built-in config name, one of {builtin}", name
        )
    return FOLDER / f"{stem}{SUFFIX}"
