"""The C fast path must build wherever a compiler exists (a silent fallback to the torch
composites would skip every native-path test and lose the performance), and large
tables get 2 MiB-aligned memory advised for transparent huge pages."""

import os
import platform
import shutil

import pytest
import torch

from kernels import _native, empty_table

HUGE_PAGE = 2 << 20
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler")
def test_native_library_builds_and_loads():
    assert _native.library() is not None


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
