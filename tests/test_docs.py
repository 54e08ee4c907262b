"""The documentation cannot drift from the code.

- Every ```python block of Getting started, the how-to guides and the README runs, in
  page order with one namespace per page, as typed. A block preceded by
  ``<!-- test: ray -->`` runs against this module's local Ray instance; one preceded by
  ``<!-- test: grpc -->`` also gets a gRPC server, whose address replaces
  ``127.0.0.1:50051`` and whose token is ``$MEMSTORE_TOKEN``. A block that includes a
  file (``--8<-- "examples/..."``) is that example, which a test of its own runs.
- The API reference documents every public name (``__all__`` of memstore,
  memstore.client, memstore.hf, memstore.trainer.memory and memstore.trainer.config).
- docs/benchmarks.md is exactly what benchmarks/render_results.py makes of
  benchmarks/results/*.json.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.local_ray import local_ray

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(
    r"(?:<!--\s*test:\s*(?P<mode>[\w-]+)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```",
    re.M | re.S,
)
MODES = {None, "ray", "grpc"}
GRPC_ADDRESS = "127.0.0.1:50051"
TOKEN = "docs-test-token-" + "d" * 24


def readme() -> Path:
    return REPO / "README.md"


def pages_with_code() -> list[Path]:
    return [DOCS / "getting-started.md", *sorted((DOCS / "guides").glob("*.md")), readme()]


def python_blocks(page: Path) -> list[tuple[str | None, str]]:
    """(mode, code) of each ```python block; included example files are left out."""
    blocks = []
    for m in FENCE.finditer(page.read_text()):
        code = m["code"]
        if code.lstrip().startswith("--8<--"):
            included = REPO / code.split('"')[1]
            assert included.is_file(), f"{page.name} includes a missing file {included}"
            continue
        assert m["mode"] in MODES, f"{page.name}: unknown test mode {m['mode']!r}"
        blocks.append((m["mode"], code))
    return blocks


def _drop_every_table() -> None:
    import ray

    import memstore

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "memstore" and actor["name"].endswith("/catalog"):
            memstore.drop_table(actor["name"].rsplit("/", 1)[0])


@pytest.fixture(scope="module")
def ray_for_docs():
    with local_ray(num_cpus=4) as ray:
        yield ray


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs_as_typed(page, ray_for_docs, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    monkeypatch.chdir(tmp_path)  # files a block writes go to a fresh folder
    namespace = {"__name__": "__docs__"}
    address = None
    try:
        for number, (mode, code) in enumerate(blocks, 1):
            if mode == "grpc" and address is None:
                address = _start_grpc(monkeypatch)
            if address is not None:
                code = code.replace(GRPC_ADDRESS, address)
            exec(compile(code, f"{page.name}, python block {number}", "exec"), namespace)
    finally:
        if address is not None:
            _stop_grpc()
        _drop_every_table()


_servers: list = []


def _start_grpc(monkeypatch) -> str:
    from memstore import server

    monkeypatch.setenv("MEMSTORE_TOKEN", TOKEN)
    running = server.start(
        server.ServerOptions(
            address="127.0.0.1:0", tokens={TOKEN: frozenset({"read", "write", "admin"})}
        )
    )
    _servers.append(running)
    return running.address


def _stop_grpc() -> None:
    while _servers:
        _servers.pop().stop()


def test_the_block_finder_sees_modes_and_skips_included_examples(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- test: ray -->\n```python\ny = 2\n```\n\n"
        '```python\n--8<-- "examples/ray_train_memory.py"\n```\n\n```bash\nls\n```\n'
    )
    assert python_blocks(page) == [(None, "x = 1\n"), ("ray", "y = 2\n")]


def test_every_guide_and_getting_started_has_code_the_suite_runs():
    for page in pages_with_code():
        text = page.read_text()
        assert python_blocks(page) or "--8<--" in text, f"{page.name} has no tested code"


# ---- the API reference ---------------------------------------------------------------
PUBLIC_MODULES = [
    "memstore",
    "memstore.client",
    "memstore.hf",
    "memstore.trainer.memory",
    "memstore.trainer.config",
]


def documented_objects() -> list[object]:
    """The objects the reference pages render (``::: module.name`` lines)."""
    objects = []
    for page in (DOCS / "reference").glob("*.md"):
        for path in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M):
            module, _, name = path.rpartition(".")
            objects.append(getattr(importlib.import_module(module), name))
    return objects


def test_the_api_reference_documents_every_public_name():
    documented = documented_objects()
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if not any(getattr(importlib.import_module(module), name) is o for o in documented)
    ]
    assert not missing, f"names without a reference entry: {missing}"


# ---- the benchmarks page -------------------------------------------------------------
def test_the_benchmarks_page_is_rendered_from_the_result_files():
    from benchmarks import render_results

    expected = render_results.render(render_results.load_results(REPO / "benchmarks/results"))
    assert (DOCS / "benchmarks.md").read_text() == expected, (
        "docs/benchmarks.md differs from the result files: run python -m benchmarks.render_results"
    )


def test_a_written_result_is_a_table_with_its_command_and_machine(tmp_path):
    from benchmarks import render_results
    from benchmarks._results import write_result

    figures = {"Ray, 2 shards": {"vs in-process": 0.812345, "round ms": 120}, "b": {"x": "y"}}
    path = write_result("store", figures, "python -m benchmarks.store", directory=tmp_path)
    written = json.loads(path.read_text())
    assert path.name == "store.json" and written["command"] == "python -m benchmarks.store"
    assert written["figures"]["Ray, 2 shards"] == {"vs in-process": 0.8123, "round ms": 120}
    assert written["machine"]["cores"] == os.cpu_count()
    page = render_results.render(render_results.load_results(tmp_path))
    assert "- **Command:** `python -m benchmarks.store`" in page
    assert f"- **Machine:** {os.cpu_count()}-core " in page
    assert "| | vs in-process | round ms | x |" in page
    assert "| Ray, 2 shards | 0.8123 | 120 | – |" in page
    assert "| b | – | – | y |" in page


def test_no_page_links_outside_the_site_by_a_relative_path():
    """mkdocs --strict catches broken links between pages; a relative link out of docs/
    would be broken on the site although it works on GitHub."""
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\((\.\./[^)#]*)", page.read_text()):
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(DOCS), f"{page}: link out of docs/: {target}"
