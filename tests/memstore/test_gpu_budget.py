"""The GPU memory check of GPU shards: the decision (any machine) and the probe (GPUs only).

Blocks within a GPU's free memory less the reserve pass; a larger block is refused with
MemoryBudgetExceeded naming both numbers; one GPU per block; the probe reads the free
memory of each placement-group bundle's GPU. Byte counts are written here.
"""

from __future__ import annotations

import pytest
import torch

from memstore._internal.gpu_budget import GpuFree, check_blocks_fit, free_gpu_memory
from memstore.errors import MemoryBudgetExceeded

GIB = 1 << 30


def gpu(free_gib: float, node="10.0.0.7", gpu_id="0") -> GpuFree:
    return GpuFree(int(free_gib * GIB), 80 * GIB, node, gpu_id)


def test_blocks_within_free_memory_pass():
    check_blocks_fit([3 * GIB, 5 * GIB], [gpu(4.5), gpu(6)], reserve_bytes=GIB)
    check_blocks_fit([6 * GIB - 1], [gpu(6)], reserve_bytes=0)


def test_a_block_over_its_gpu_is_refused_with_both_numbers():
    # The first GPU has room, the second (on another node, partly used) has not.
    gpus = [gpu(40), gpu(10, node="10.0.0.9", gpu_id="3")]
    with pytest.raises(MemoryBudgetExceeded) as err:
        check_blocks_fit([12 * GIB, 12 * GIB], gpus, reserve_bytes=GIB)
    assert err.value.bytes_per_shard == 12 * GIB
    assert err.value.budget_bytes == 9 * GIB  # 10 GiB free less the 1 GiB reserve
    message = str(err.value)
    assert f"{12 * GIB:,}" in message and f"{9 * GIB:,}" in message
    assert "GPU 3 on node 10.0.0.9" in message and f"{10 * GIB:,} of {80 * GIB:,}" in message


def test_the_reserve_counts_against_the_block():
    with pytest.raises(MemoryBudgetExceeded) as err:
        check_blocks_fit([5 * GIB], [gpu(5.5)], reserve_bytes=GIB)
    assert err.value.budget_bytes == int(4.5 * GIB)
    with pytest.raises(MemoryBudgetExceeded) as err:
        check_blocks_fit([1], [gpu(0.5)], reserve_bytes=GIB)  # less free than the reserve
    assert err.value.budget_bytes == 0


def test_one_gpu_per_block():
    with pytest.raises(ValueError, match="one entry per GPU"):
        check_blocks_fit([GIB, GIB], [gpu(8)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="asks a real GPU for its free memory")
def test_probe_reads_the_free_memory_of_each_bundle_gpu():
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pg = placement_group([{"CPU": 1, "GPU": 1}], strategy="SPREAD")
        ray.get(pg.ready(), timeout=60)
        (answer,) = free_gpu_memory(ray, pg, 1, timeout_s=60)
        assert 0 < answer.free_bytes <= answer.total_bytes
        assert answer.total_bytes == torch.cuda.get_device_properties(0).total_memory
        remove_placement_group(pg)
    finally:
        ray.shutdown()
