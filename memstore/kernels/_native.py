"""Builds, caches and calls the C fast paths in ``csrc/cpu_kernels.c``.

The library compiles on first use with the system C compiler (about a second) into a
cache directory keyed by the source, the flags and the CPU, so ``-march=native`` is
safe. Calls go through ctypes, which releases the GIL; the C code splits its work over
OpenMP threads of torch's own runtime (``torch.set_num_threads`` sizes it). When no
compiler is present, or ``MEMSTORE_NATIVE=0``, ``library()`` returns None and callers
use torch composites.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
# -fno-math-errno lets sqrtf vectorise (results unchanged: sqrt is correctly rounded);
# -ffp-contract=off keeps a*b+c unfused, as torch's reference computes it. On x86,
# GCC's -march=native picks 256-bit vectors even where AVX-512 exists; 512-bit ones
# measured 1.12-1.2x faster on the float32 forward and 1.1x on the bfloat16 one
# (Sapphire Rapids; the flag does nothing on CPUs without AVX-512).
_FLAGS = [
    "-O3",
    "-march=native",
    *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []),
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float

# Argument types of every exported function; the trailing (lo, hi) range is implicit.
# A gradient argument of the optimizers is the address of a RowGrads struct.
_SIGNATURES = {
    "bag_forward": [_P, _I, _P, _P, _P, _I, _P],
    "bag_dw": [_P, _I, _P, _P, _P, _I, _P],
    "row_grads": [_P, _I, _P],
    "sgd": [_P, _I, _P, _P, _I, _F, _F],
    "adagrad": [_P, _I, _P, _P, _P, _I, _F, _F],
    "rowwise_adagrad": [_P, _I, _P, _P, _P, _I, _F, _F],
    "adam": [_P, _I, _P, _P, _P, _P, _I, _F, _F, _F, _F, _F, _F, _F],
    "pk_topk": [_P, _I, _I, _I, _I, _I, _I, _P, _P],
    "pk_scores_backward": [_P, _P, _P, _P, _I, _I, _I, _I, _P, _P],
    "group_rows": [_P, _I, _P, _P, _P, _P, _P],
    "group_rows_radix": [_P, _I, _P, _P, _P, _P, _P, _P, _P],
}
_TYPED = ("bag_forward", "bag_dw", "sgd", "adagrad", "rowwise_adagrad", "adam")
DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cache_dir() -> Path:
    root = os.environ.get("MEMSTORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memstore"
    )
    return Path(root) / "native"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"memstore_cpu_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


FORWARD_ENV = "MEMSTORE_BAG_FORWARD"


def c_forward_wins(cpuinfo: str) -> bool:
    """Whether the C float32 bag forward was measured faster than ``F.embedding_bag`` on
    a CPU like the one ``cpuinfo`` (the text of /proc/cpuinfo) describes.

    Intel with AVX-512: 1.18-1.20x through the store's dispatch (Sapphire Rapids,
    ``benchmarks/ops.py``). Elsewhere the library stays: on the AMD EPYC VM the C
    forward measured 0.44-0.83x, before the 512-bit build, and has not been measured
    since.
    """
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return "GenuineIntel" in cpuinfo and "avx512f" in flags.split()


@functools.cache
def prefer_c_forward() -> bool:
    """The float32 CPU bag forward's implementation on this machine: the C kernel (True)
    or ``F.embedding_bag``. ``MEMSTORE_BAG_FORWARD=native`` or ``library`` overrides the
    measured default, for a machine where ``benchmarks/ops.py`` says otherwise."""
    choice = os.environ.get(FORWARD_ENV, "")
    if choice in ("native", "library"):
        return choice == "native"
    if choice:
        raise ValueError(f"{FORWARD_ENV}: expected 'native' or 'library', got {choice!r}")
    try:
        return c_forward_wins(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C library, or None when the native path is off or cannot build."""
    if os.environ.get("MEMSTORE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: kernels use the slower torch composites")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the C kernels failed, using torch composites: %s", detail)
        return None
    for name, args in _SIGNATURES.items():
        names = [f"{name}_{sfx}" for sfx in DTYPE_SUFFIX.values()] if name in _TYPED else [name]
        for symbol in names:
            fn = getattr(lib, symbol)
            fn.argtypes = [*args, _I, _I]
            fn.restype = None
    return lib


def parallel_for(fn, count: int, *args) -> None:
    """Run ``fn(*args, 0, count)``: the C function splits [0, count) over threads."""
    fn(*args, 0, count)


def typed(name: str, dtype: torch.dtype):
    """The dtype-specialised function ``name`` for values of ``dtype``."""
    return getattr(library(), f"{name}_{DTYPE_SUFFIX[dtype]}")


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [_P, ctypes.c_size_t, ctypes.c_int]
    return fn


def empty_hugepages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory asks the kernel for 2 MiB pages.

    Value tables are read at random rows: with 4 KiB pages nearly every row costs a
    TLB miss, and a fresh buffer costs one page fault per 4 KiB on first touch.
    Transparent huge pages cut both by 512×. Small tensors, and systems where THP is
    off, get an ordinary tensor.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if platform.system() == "Linux" else None
    if madvise is None or nbytes < 4 * _HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE_PAGE
    buf = raw[start : start + nbytes]
    madvise(buf.data_ptr(), nbytes - nbytes % _HUGE_PAGE, _MADV_HUGEPAGE)
    return buf.view(dtype).view(shape)
