"""Benchmark results as data: one JSON file per area under benchmarks/results/.

A script ends with ``write_result(area, figures, command)``; that replaces
``benchmarks/results/<area>.json`` with the figures, the command that made them, the
machine and the UTC date. ``python -m benchmarks.render_results`` turns every file into
the tables of docs/benchmarks.md; older runs stay in git history.

``figures`` is ``{row: {column: value}}`` (a table) or ``{name: value}`` (a list of
figures); values are numbers or short strings, in the order the page shows them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the figures were measured: CPU, cores, memory, GPU, software, load."""
    gpu = None
    torch = sys.modules.get("torch")  # only if the benchmark itself imported it
    if torch is not None and torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    software = [f"Python {platform.python_version()}"]
    for name in ("torch", "ray", "grpc"):
        module = sys.modules.get(name)
        if module is not None:
            software.append(f"{name} {getattr(module, '__version__', '?')}")
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": gpu,
        "software": ", ".join(software),
        "load_average": round(os.getloadavg()[0], 1),
    }


def _plain(value):
    """A JSON value of a figure: numbers rounded to 4 significant digits, NaN as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    value = float(value)
    return None if not math.isfinite(value) else float(f"{value:.4g}")


def write_result(
    area: str,
    figures: dict,
    command: str,
    *,
    title: str | None = None,
    notes: str | None = None,
    directory: Path = RESULTS,
) -> Path:
    """Write ``<directory>/<area>.json`` and return its path."""
    if not area.replace("_", "").isalnum():
        raise ValueError(f"area must be letters, digits and _, got {area!r}")
    result = {
        "area": area,
        "title": title or area.replace("_", " ").capitalize(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine(),
        "figures": _plain(figures),
    }
    if notes:
        result["notes"] = notes
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{area}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return path


def command_line(module: str) -> str:
    """The command as typed: ``python -m <module>`` and this process's arguments."""
    return " ".join(["python -m", module, *sys.argv[1:]])
