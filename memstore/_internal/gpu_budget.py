"""The memory check of GPU shards: does each block fit the GPU it lands on?

A GPU shard keeps its block (values and optimizer state) in the memory of one GPU,
which other processes may already be using. Before the shards start, a tiny Ray task
holding each placement-group bundle's GPU asks that GPU for its free memory
(``torch.cuda.mem_get_info``) on that bundle's node; a block that would not fit, after
a reserve for the shard's CUDA context and working buffers, is refused with both
numbers (:class:`~memstore.errors.MemoryBudgetExceeded`) and nothing is started.
"""

from __future__ import annotations

import dataclasses

from ..errors import MemoryBudgetExceeded

__all__ = ["GpuFree", "DEFAULT_RESERVE_BYTES", "check_blocks_fit", "free_gpu_memory"]

# The shard's own CUDA context and per-batch buffers: about 0.5 GiB of context on
# recent GPUs plus the lookups' and pushes' temporaries.
DEFAULT_RESERVE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class GpuFree:
    """Free and total bytes of the GPU a bundle holds, as its node reported them."""

    free_bytes: int
    total_bytes: int
    node: str
    gpu: str


def check_blocks_fit(
    need_bytes: list[int], gpus: list[GpuFree], reserve_bytes: int = DEFAULT_RESERVE_BYTES
) -> None:
    """Raise MemoryBudgetExceeded for the first block whose bytes exceed its GPU's free
    memory less ``reserve_bytes``; block i lands on ``gpus[i]``."""
    if len(need_bytes) != len(gpus):
        raise ValueError(
            f"need_bytes: expected one entry per GPU ({len(gpus)}), got {len(need_bytes)}"
        )
    for need, gpu in zip(need_bytes, gpus):
        allowed = max(0, gpu.free_bytes - reserve_bytes)
        if need > allowed:
            raise MemoryBudgetExceeded(
                need,
                allowed,
                f"GPU {gpu.gpu} on node {gpu.node} ({gpu.free_bytes:,} of {gpu.total_bytes:,} "
                f"bytes free, less {reserve_bytes:,} reserved for the shard's CUDA context)",
            )


def _probe() -> tuple[int, int, str, str]:
    """Runs on the bundle's node, holding its GPU: (free, total, node ip, GPU id)."""
    import ray
    import torch

    free, total = torch.cuda.mem_get_info()
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return int(free), int(total), ray.util.get_node_ip_address(), ",".join(map(str, ids))


def free_gpu_memory(ray, pg, bundles: int, timeout_s: float) -> list[GpuFree]:
    """Free memory of the GPU of each of the first ``bundles`` bundles of ``pg``.

    Each probe is a task with the bundle's one GPU, so it lands on the GPU the shard
    will get; ``max_calls=1`` ends its worker afterwards, so the CUDA context the
    probe opened does not stay on that GPU.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    probe = ray.remote(num_cpus=0, num_gpus=1, max_calls=1)(_probe)
    refs = [
        probe.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(bundles)
    ]
    return [GpuFree(*answer) for answer in ray.get(refs, timeout=timeout_s)]
