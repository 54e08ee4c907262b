"""The documentation cannot drift from the code.

- Every ```python block of Getting started, the how-to guides and the README runs, in
  page order with one namespace per page, as typed. A block preceded by
  ``<!-- test: ray -->`` runs against this module's local Ray instance; one preceded by
  ``<!-- test: grpc -->`` also gets a gRPC server, whose address replaces
  ``127.0.0.1:50051`` and whose token is ``$MEMSTORE_TOKEN``. A block that includes a
  file (``--8<-- "examples/..."``) is that example, which a test of its own runs.
- The API reference documents every public name (``__all__`` of memstore,
  memstore.client, memstore.hf, memstore.trainer.memory and memstore.trainer.config).
- Getting started runs as a reader types it (marker ``cluster``: it starts raylets): its
  numbered steps after the install, in one shell, at small sizes; each Python block is
  saved under the file name the page gives and run with the command it gives.
- docs/benchmarks.md is exactly what benchmarks/render_results.py makes of
  benchmarks/results/*.json.
- README.md (200 lines) and docs/architecture.md (400) stay short; the root
  ARCHITECTURE.md and BENCHMARKS.md only point into docs/.
- Every test module opens with a docstring naming what it checks.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
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


# ---- Getting started, as typed in a shell ----------------------------------------------
LEVEL_TWO = re.compile(r"^## ", re.M)
NUMBERED_STEP = re.compile(r"^## (?P<number>\d+)\. ", re.M)
SHELL_BLOCK = re.compile(r"^```bash\n(?P<code>.*?)^```", re.M | re.S)
SAVE_AND_RUN = re.compile(r"Save (?:it|this) as\s+`(?P<file>[\w.]+)`\s+and run\s+`(?P<run>[^`]+)`")


def getting_started_script() -> str:
    """Steps 2, 3, ... of Getting started as one bash script: each ```bash block as typed;
    each Python block written to the file named by the "Save it as `F` and run `CMD`"
    before it, then that command."""
    text = (DOCS / "getting-started.md").read_text()
    script = []
    for step in NUMBERED_STEP.finditer(text):
        if step["number"] == "1":
            continue  # the install: the suite runs inside it
        following = LEVEL_TWO.search(text, step.end())
        body = text[step.end() : following.start() if following else len(text)]
        pieces = [(m.start(), m["code"]) for m in SHELL_BLOCK.finditer(body)]
        for block in FENCE.finditer(body):
            saves = list(SAVE_AND_RUN.finditer(body, 0, block.start()))
            assert saves, f"step {step['number']}: a Python block without 'Save it as'"
            file, run = saves[-1]["file"], saves[-1]["run"]
            pieces.append((block.start(), f"cat > {file} <<'PAGE'\n{block['code']}PAGE\n{run}\n"))
        script += [code for _, code in sorted(pieces)]
    return "".join(script)


# The main job at small sizes: the same three models, a few steps of a small corpus.
SMALL_FACTS = (
    " --set steps=12 --set warmup=2 --set eval_every=6 --set checkpoint_every=12"
    " --set batch_size=32 --set data.entities=100"
)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_getting_started_runs_as_typed_in_a_shell(tmp_path):
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() or shutil.which("bash") is None:
        pytest.skip(f"`ray start` unavailable: no ray CLI at {ray_cli} or no bash")
    script = getting_started_script()
    for typed in ("memstore.bench.facts --quick", "memstore up", "train.py", "memstore down"):
        assert typed in script, f"Getting started no longer has {typed!r}"
    grpc_address = f"127.0.0.1:{_free_port('127.0.0.1')}"
    script = script.replace(
        "memstore.bench.facts --quick", "memstore.bench.facts --quick" + SMALL_FACTS
    )
    script = script.replace(
        "memstore serve --detach", f"memstore serve --detach --address {grpc_address}"
    )
    script = script.replace(GRPC_ADDRESS, grpc_address)
    work, home = tmp_path / "clone", tmp_path / "home"
    work.mkdir(), home.mkdir()
    (work / ".venv").symlink_to(sys.prefix)  # the page's commands name .venv/bin/...
    head_ip = "127.0.0.40"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))},
        "HOME": str(home),  # the gRPC token file and the checkpoint secret go here
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "HEAD_IP": head_ip,  # `memstore up`'s own cluster, apart from any other
        "RAY_PORT": str(_free_port(head_ip)),
        "RAY_LOCAL_DIR": tempfile.mkdtemp(prefix="rgs", dir="/tmp"),  # short socket paths
    }
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        stop = REPO / "cluster/local/stop-local.sh"
        subprocess.run(["bash", str(stop)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(env["RAY_LOCAL_DIR"], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    out = done.stdout
    assert re.search(r"^\| memory .*\| pkm", out, re.M | re.S), out  # the main job's table
    assert (work / "runs/facts-quick/summary.json").is_file()
    assert re.search(r"^loss after 50 steps: \d", out, re.M), out
    assert "['quickstart']" in out and "(3, 2, 8) (3, 32) 50" in out, out


# ---- short pages ----------------------------------------------------------------------
def test_the_readme_the_architecture_page_and_the_root_pointers_stay_short():
    limits = {"README.md": 200, "docs/architecture.md": 400}
    limits |= {"ARCHITECTURE.md": 15, "BENCHMARKS.md": 15}  # pointers into docs/
    longer = {
        name: lines
        for name, limit in limits.items()
        if (lines := len((REPO / name).read_text().splitlines())) > limit
    }
    assert not longer, f"pages over their line limits {limits}: {longer}"


# ---- every test module says what it checks ---------------------------------------------
def test_every_test_module_opens_with_a_docstring_of_what_it_checks():
    missing = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").rglob("test_*.py"))
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert not missing, f"test modules without a module docstring: {missing}"


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
