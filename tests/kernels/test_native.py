"""The C fast path must build wherever a compiler exists (a silent fallback to the torch
composites would skip every native-path test and lose the performance), and large
tables get 2 MiB-aligned memory advised for transparent huge pages.

The build is cached by source and renamed into place; the C kernels share torch's
OpenMP runtime and thread count; without the library the ops take the composites; the
float32 bag forward takes C only on the CPU family where it measured faster, and
``MEMSTORE_BAG_FORWARD`` overrides it. Checked on the loaded library, the recorded
madvise call and the dispatch counts, never by timing.
"""

import collections
import ctypes
import os
import platform
import re
import shutil

import pytest
import torch

from memstore.kernels import _native, empty_table

HUGE_PAGE = 2 << 20
NATIVE_BUILDS = shutil.which("cc") is not None or shutil.which("gcc") is not None
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_native_library_builds_and_loads():
    lib = _native.library()
    assert lib is not None
    assert type(lib) is ctypes.CDLL  # calls release the GIL (a ctypes.PyDLL would hold it)


def test_empty_table_is_a_writable_tensor_of_the_asked_shape():
    for shape in [(3, 5), (1 << 12, 256)]:
        t = empty_table(shape, torch.float32)
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
        t.fill_(1.5)
        assert float(t.sum()) == 1.5 * t.numel()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and head and head[0] == "VmFlags:":
                return head[1:]
    raise AssertionError(f"no mapping holds address {address:#x}")


@pytest.mark.skipif(platform.system() != "Linux", reason="huge pages are asked for on Linux only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_table_large_tensor_is_2mib_aligned_and_advised(monkeypatch, dtype):
    advised = []
    real = _native._madvise()
    assert real is not None, "libc madvise is not reachable through ctypes"

    def recording(addr, length, advice):
        advised.append((addr, length, advice))
        return real(addr, length, advice)

    monkeypatch.setattr(_native, "_madvise", lambda: recording)
    shape = (3000, 1000)  # 6 or 12 MB: above the 8 MiB threshold for float32 only
    t = empty_table(shape, dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * HUGE_PAGE:  # small tables stay ordinary tensors, never advised
        assert advised == []
        return
    assert t.data_ptr() % HUGE_PAGE == 0
    assert advised == [(t.data_ptr(), nbytes - nbytes % HUGE_PAGE, 14)]  # 14: MADV_HUGEPAGE
    t.fill_(1.0)
    assert float(t.float().sum()) == t.numel()
    if os.path.exists(THP_SYSFS):  # the kernel knows THP: the advice is on the mapping
        assert "hg" in _vm_flags(t.data_ptr())


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_build_is_cached_by_source_and_renamed_into_place(monkeypatch, tmp_path):
    """The library lands in the cache under a name keyed by source, flags and CPU, is
    reused while they stay, and no temporary file is left beside it."""
    monkeypatch.setenv("MEMSTORE_CACHE_DIR", str(tmp_path))
    first = _native._build("cc")
    assert first.parent == tmp_path / "native" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert _native._build("cc") == first and first.stat().st_mtime_ns == mtime
    edited = tmp_path / "cpu_kernels.c"
    edited.write_text(_native._SOURCE.read_text() + "\n/* another source */\n")
    monkeypatch.setattr(_native, "_SOURCE", edited)
    second = _native._build("cc")
    assert second != first and second.exists()
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == sorted(
        [first.name, second.name]
    )


def _openmp_runtimes() -> set[str]:
    """Mapped OpenMP runtimes: GNU libgomp, Intel libiomp5, LLVM libomp (by file name;
    other libraries with "omp" in their names, like libarrow_compute, are not ones)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.split()[-1].startswith("/")}
    return {p for p in paths if re.match(r"lib(g|i)?omp[0-9]*([.-]|$)", p.rsplit("/", 1)[-1])}


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_c_kernels_share_torchs_openmp_runtime(native_calls):
    """After a C kernel ran, one OpenMP runtime is loaded: the library links libgomp by
    soname and so binds to the one torch already loaded."""
    values = torch.randn(1000, 64).bfloat16()
    from memstore.kernels import bag_forward

    bag_forward(values, torch.randint(0, 1000, (300, 8)), torch.rand(300, 8))
    native_calls.took(bag_forward_csr="native")
    assert len(_openmp_runtimes()) == 1, _openmp_runtimes()


def test_c_kernels_thread_pool_is_sized_by_torch_set_num_threads(native_calls):
    """The C kernels' OpenMP pool is torch's: torch.set_num_threads sizes it."""
    omp_max_threads = _native.library().omp_get_max_threads  # libgomp, through the library
    omp_max_threads.restype = ctypes.c_int
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert omp_max_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_without_native_library_the_ops_use_the_composites(monkeypatch, caplog):
    """MEMSTORE_NATIVE=0, or no compiler, turns the C path off (with a warning when a
    compiler is missing) and every op still answers, through its composite."""
    from memstore.kernels import _dispatch, adam_step

    monkeypatch.setenv("MEMSTORE_NATIVE", "0")
    _native.library.cache_clear()
    try:
        assert _native.library() is None
        monkeypatch.setenv("MEMSTORE_NATIVE", "1")
        monkeypatch.setenv("MEMSTORE_CACHE_DIR", "/nonexistent-memstore-cache")
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", "")
        _native.library.cache_clear()
        with caplog.at_level("WARNING", logger="memstore.kernels._native"):
            assert _native.library() is None
        assert "no C compiler" in caplog.text
        before = _dispatch.COUNTS[("adam_step", "composite")]
        values, m, v = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
        adam_step(
            values,
            m,
            v,
            torch.tensor([1]),
            torch.ones(1, 3),
            step=1,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )
        assert _dispatch.COUNTS[("adam_step", "composite")] == before + 1
        torch.testing.assert_close(
            values[1], torch.full((3,), -0.1)
        )  # Adam's first step: -lr·sign(g)
        assert not values[[0, 2, 3]].any()
    finally:
        monkeypatch.undo()
        _native.library.cache_clear()
    assert _native.library() is not None or not NATIVE_BUILDS


INTEL_AVX512 = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
INTEL_AVX2 = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2\n"
AMD_AVX512 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
# "avx512f" must be a whole flag, not a prefix of another.
INTEL_AVX512FP16_ONLY = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512fp16\n"


@pytest.mark.parametrize(
    "cpuinfo, wins",
    [
        (INTEL_AVX512, True),
        (INTEL_AVX2, False),
        (AMD_AVX512, False),
        (INTEL_AVX512FP16_ONLY, False),
    ],
)
def test_c_forward_is_chosen_only_on_the_cpus_where_it_was_measured_faster(cpuinfo, wins):
    assert _native.c_forward_wins(cpuinfo) is wins


@pytest.mark.parametrize("choice, native", [("native", True), ("library", False)])
def test_bag_forward_choice_can_be_set_and_the_dispatch_follows(monkeypatch, choice, native):
    from memstore.kernels import _dispatch
    from memstore.kernels.bag import bag_forward_csr

    monkeypatch.setenv(_native.FORWARD_ENV, choice)
    _native.prefer_c_forward.cache_clear()
    try:
        assert _native.prefer_c_forward() is native
        g = torch.Generator().manual_seed(0)
        values, w = torch.randn(50, 9, generator=g), torch.rand(12, generator=g)
        rows, offsets = torch.randint(0, 50, (12,), generator=g), torch.tensor([0, 5, 5, 12])
        before = collections.Counter(_dispatch.COUNTS)
        out = bag_forward_csr(values, rows, w, offsets)
        took = {path for (op, path), n in _dispatch.COUNTS.items() if n > before[(op, path)]}
        expected_path = "native" if native and _native.library() is not None else "library"
        assert took == {expected_path}
        ref = torch.zeros(3, 9, dtype=torch.float64)
        for b in range(3):
            for p in range(offsets[b], offsets[b + 1]):
                ref[b] += w[p].double() * values[rows[p]].double()
        torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    finally:
        _native.prefer_c_forward.cache_clear()


def test_a_bag_forward_choice_that_is_not_a_path_is_refused(monkeypatch):
    monkeypatch.setenv(_native.FORWARD_ENV, "fastest")
    _native.prefer_c_forward.cache_clear()
    try:
        with pytest.raises(ValueError, match="MEMSTORE_BAG_FORWARD: expected 'native' or"):
            _native.prefer_c_forward()
    finally:
        monkeypatch.undo()
        _native.prefer_c_forward.cache_clear()
