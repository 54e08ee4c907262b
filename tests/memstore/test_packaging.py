"""One import name: everything memstore installs lives under ``memstore``, so it installs
and imports beside packages with generic names, Hugging Face's ``kernels`` (which
transformers requires) first among them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[2]

BOTH = """
import memstore.kernels, memstore.trainer, memstore.bench
from memstore.kernels import product_key_topk
from memstore import MemoryLayer
import kernels
from kernels import get_kernel
assert not kernels.__file__.startswith(memstore.__path__[0]), kernels.__file__
print(kernels.__file__)
"""


def test_the_packages_that_ship_are_all_under_memstore():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(REPO / "pyproject.toml", "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(where=REPO, include=find["include"])
    assert "memstore.kernels" in shipped and "memstore.trainer" in shipped
    assert "memstore.bench" in shipped
    assert {name.split(".")[0] for name in shipped} == {"memstore"}


def test_the_installed_distribution_has_one_top_level_name():
    assert distribution("memstore").read_text("top_level.txt").split() == ["memstore"]


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_memstore_kernels_and_hugging_face_kernels_import_together(where, tmp_path):
    pytest.importorskip("transformers")
    cwd = REPO if where == "repository root" else tmp_path
    out = subprocess.run(
        [sys.executable, "-c", BOTH], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout


def _imports(folder: Path, exclude: set[str]) -> dict[str, list[str]]:
    """The ``memstore`` import lines of each module under ``folder``, skipping the
    subfolders named in ``exclude``."""
    found = {}
    for path in folder.rglob("*.py"):
        if exclude & set(path.relative_to(folder).parts):
            continue
        lines = [
            line.strip()
            for line in path.read_text().splitlines()
            if line.lstrip().startswith(("from memstore", "import memstore", "from ..."))
        ]
        found[str(path.relative_to(REPO))] = lines
    return found


def test_dependencies_point_one_way():
    """kernels <- store <- trainer <- integrations (hf) and experiments (bench): the
    kernels import nothing of the store, the store nothing of the trainer, the Hugging
    Face integration or the experiments."""
    kernels = _imports(REPO / "memstore" / "kernels", set())
    store = _imports(REPO / "memstore", {"kernels", "trainer", "bench", "hf"})
    up_from_kernels = {
        p: [
            x
            for x in lines
            if not x.startswith(("from memstore.kernels", "import memstore.kernels"))
        ]
        for p, lines in kernels.items()
    }
    up_from_store = {
        p: [x for x in lines if any(f"memstore.{up}" in x for up in ("trainer", "bench", "hf"))]
        for p, lines in store.items()
    }
    assert kernels and store
    assert not {p: x for p, x in up_from_kernels.items() if x}
    assert not {p: x for p, x in up_from_store.items() if x}
