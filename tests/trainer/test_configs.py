"""trainer.configs: the built-in configs by name, and their shipping as package data.

Every shipped YAML is found by name and by file name and loads; an existing file wins
over a built-in name; an unknown name is refused listing the built-in names; the
package data lists every config file on disk; the facts configs pass the experiment's
like-with-like checks and a peer with another value_lr is refused; steps to a recall
are interpolated between evaluations, against values computed by hand.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from memstore.errors import InvalidArgument
from memstore.trainer import configs
from memstore.trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "memstore" / "trainer" / "configs"
YAML_FILES = sorted(p.name for p in FOLDER.glob("*.yaml"))


def test_every_shipped_config_is_found_by_name_and_by_file_name():
    assert configs.names() == [name[: -len(".yaml")] for name in YAML_FILES]
    for file_name in YAML_FILES:
        expected = FOLDER / file_name
        assert configs.path(file_name) == expected
        assert configs.path(file_name[: -len(".yaml")]) == expected


def test_every_shipped_config_loads():
    for name in configs.names():
        load_config(configs.path(name))


def test_an_existing_file_wins_over_a_built_in_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("steps: 3\n", encoding="utf-8")
    assert configs.path("tiny") == Path("tiny")
    assert configs.path(tmp_path / "tiny") == tmp_path / "tiny"
    assert configs.path("tiny.yaml") == FOLDER / "tiny.yaml"


@pytest.mark.parametrize("name", ["nope", "tiny.yml", "../configs/tiny", "", "configs/tiny"])
def test_an_unknown_name_is_refused_with_the_built_in_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        configs.path(name)
    assert err.value.field == "config"
    assert "tiny" in err.value.expected and "facts-small-memory" in err.value.expected


@pytest.mark.parametrize("value", [None, 3, True, ["tiny"]])
def test_a_config_that_is_no_name_or_path_is_refused(value):
    with pytest.raises(InvalidArgument, match="config"):
        configs.path(value)


def test_the_package_data_lists_every_config():
    """pyproject.toml ships each yaml of memstore/trainer/configs with the package."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(REPO / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert any(
        fnmatch.fnmatch("memstore.trainer.configs", pattern)
        for pattern in setuptools["packages"]["find"]["include"]
    )
    patterns = setuptools["package-data"]["memstore.trainer.configs"]
    unshipped = [
        name
        for name in YAML_FILES
        if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
    ]
    assert YAML_FILES and not unshipped


def test_the_facts_configs_compare_like_with_like():
    """benchmarks.facts refuses configs that differ beyond the layer (and, for the PKM
    peer, beyond running in-process): the shipped ones pass, quick and full."""
    facts = pytest.importorskip("memstore.bench.facts")
    for quick in (True, False):
        args, margs = facts.load_runs(facts.configs(quick), [])
        assert margs["pkm"].pkm_peer and not margs["memory"].pkm_peer
        assert args["pkm"].value_lr == args["memory"].value_lr
    args["pkm"] = load_config(configs.path("facts-pkm"), ["value_lr=0.01"])
    with pytest.raises(SystemExit, match="value_lr"):
        facts.check_peer(args)


def test_steps_to_a_recall_are_interpolated_between_evaluations():
    import numpy as np

    facts = pytest.importorskip("memstore.bench.facts")
    c = {
        "step": np.array([100.0, 200.0, 300.0]),
        "seconds": np.array([10.0, 20.0, 40.0]),
        "recall": np.array([0.5, 0.8, 1.0]),
    }
    assert facts.first_reaching(c, 0.9) == {"step": 250.0, "seconds": 30.0}
    assert facts.first_reaching(c, 0.4) == {"step": 100.0, "seconds": 10.0}
    assert facts.first_reaching(c, 1.01) is None
