"""create_table, connect and load_table: the entry points of the distributed store."""

from __future__ import annotations

import logging
import math
import os

from . import checkpoint
from ._internal.data_channel import DEFAULT_MAX_BATCH, DEFAULT_MAX_PAIRS, channel_config
from ._internal.gpu_budget import check_blocks_fit, free_gpu_memory
from ._internal.shard_actor import ShardWorker
from ._internal.validation import check_dtype_name, check_positive_int
from .errors import InvalidArgument, ShardUnavailable, TableExists
from .grid import ShardGrid
from .optim import Adam, _Optimizer, optimizer_from_dict
from .table import (
    DEFAULT_TIMEOUT_S,
    NAMESPACE,
    Table,
    TableCatalog,
    catalog_name,
    check_budget,
    drop_table,
    find_table,
    raise_if_exists,
    remove_placement_group_of,
    shard_bytes,
    shard_name,
)

log = logging.getLogger(__name__)

__all__ = ["create_table", "connect", "load_table", "drop_table"]


def _attach():
    """The Ray of this process: the cluster it is attached to, else a local instance."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    return ray


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidArgument("name", "a non-empty string without '/'", name)
    return name


def _grid(rows: int, dim: int, shards, config: dict, budget: int | None) -> ShardGrid:
    if shards != "auto":
        return ShardGrid.make(rows, dim, shards)
    if budget is None:
        raise InvalidArgument("shards", "an int or (R, C); 'auto' needs max_shard_bytes", shards)
    whole = shard_bytes(config, ShardGrid.make(rows, dim, 1))
    count = max(1, math.ceil(whole / budget))
    while shard_bytes(config, ShardGrid.make(rows, dim, (count, 1))) > budget:
        count += 1
    return ShardGrid.make(rows, dim, (count, 1))


def create_table(
    name: str,
    rows: int,
    dim: int,
    *,
    shards=1,
    optimizer: _Optimizer | None = None,
    dtype: str = "float32",
    seed: int = 0,
    mode: str = "sync",
    max_staleness: int | None = None,
    pushes_per_step: int | None = None,
    step_on_push: bool = False,
    data_channel: str = "socket",
    data_bind: str | None = None,
    data_encrypt: bool | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    checkpoint_root: str | None = None,
    save_every: int | None = None,
    max_shard_bytes: int | None = None,
    max_restarts: int = 3,
    threads_per_shard: int = 1,
    cpus_per_shard: float | None = None,
    device: str = "auto",
    timeout_s: float | None = None,
    worker_cls=ShardWorker,
    restore_from: str | None = None,
    checkpoint_secret: str | None = None,
) -> Table:
    """Create a table of rows × dim values sharded over Ray actors; returns its handle.

    ``shards``: S, (R, C), or "auto" (enough row blocks for ``max_shard_bytes``).
    ``mode``: "sync" (gradients pend until ``step``) or "async" (applied on arrival,
    a push at most ``max_staleness`` steps behind the newest is accepted).
    ``data_channel``: "socket" (lookups and pushes over a TCP connection per shard,
    everything else over Ray) or "ray" (every call over Ray). The channel authenticates
    with a per-table secret; ``data_bind``: the IPv4 address shards listen on (default
    their node's IP). ``data_encrypt``: None (default) encrypts with CURVE wherever a shard
    listens on, or a handle connects to, an address that is not loopback, and uses PLAIN
    on loopback; True: CURVE everywhere; False: PLAIN everywhere (the secret and the data
    in clear; logged as a warning off loopback). With CURVE a handle accepts only the key
    each shard process makes for itself and publishes through Ray.
    ``max_batch`` / ``max_pairs``: most rows / (row, weight) pairs of one call per shard.
    ``pushes_per_step``: pushes that ``step`` waits for in sync mode. ``step_on_push`` (sync mode,
    needs ``pushes_per_step``): a shard applies step s within the call that brings its
    ``pushes_per_step``-th push of s, so a trainer needs no ``step`` round of its own; once a
    caller's pushes of s have returned, s is applied on every shard. Restarted shards reload the
    newest checkpoint under ``checkpoint_root``; ``save_every`` saves there every N steps.
    Checkpoints are signed and verified with the table's key, derived from
    ``checkpoint_secret`` (default: :func:`memstore.checkpoint.operator_secret`, the
    ``MEMSTORE_CHECKPOINT_SECRET`` variable or the operator's key file); a checkpoint
    that does not verify is never loaded. ``restore_from``: a checkpoint (of any
    table signed with the same secret) the shards start from when the root has none.
    ``threads_per_shard``: torch threads of a shard; ``cpus_per_shard``: the CPUs Ray
    reserves for it (default: threads_per_shard; a fraction lets more shards than cores
    share a small machine). ``device``: "auto" (GPU shards when the cluster has a GPU per
    shard), "cpu", or "cuda" (refused at once without a GPU per shard).
    """
    _check_name(name)
    check_positive_int("rows", rows)
    check_positive_int("dim", dim)
    check_dtype_name("dtype", dtype)
    optimizer = Adam() if optimizer is None else optimizer
    if not isinstance(optimizer, _Optimizer):
        raise InvalidArgument("optimizer", "a memstore optimizer", type(optimizer).__name__)
    if mode not in ("sync", "async"):
        raise InvalidArgument("mode", "'sync' or 'async'", mode)
    check_positive_int("threads_per_shard", threads_per_shard)
    if data_channel not in ("socket", "ray"):
        raise InvalidArgument("data_channel", "'socket' or 'ray'", data_channel)
    channel = channel_config(data_bind, data_encrypt, max_batch, max_pairs)
    if not isinstance(step_on_push, bool):
        raise InvalidArgument("step_on_push", "True or False", step_on_push)
    if step_on_push and (mode != "sync" or pushes_per_step is None):
        raise InvalidArgument(
            "step_on_push",
            "False unless mode='sync' and pushes_per_step is given",
            f"True with mode={mode!r}, pushes_per_step={pushes_per_step}",
        )
    for field, value in (
        ("max_staleness", max_staleness),
        ("pushes_per_step", pushes_per_step),
        ("save_every", save_every),
        ("max_shard_bytes", max_shard_bytes),
    ):
        if value is not None:
            check_positive_int(field, value, minimum=0 if field == "max_staleness" else 1)
    # Resolved on the driver: shards on other nodes and directories see the same place.
    if checkpoint_root is not None:
        checkpoint_root = checkpoint.resolve(checkpoint_root, "checkpoint_root")
    secret = checkpoint.operator_secret(checkpoint_secret)
    restore_key = None
    if restore_from is not None:
        restore_from = checkpoint.resolve(restore_from, "restore_from")
        # Verified here first: a forged or foreign checkpoint fails before any shard starts.
        restored = checkpoint.read_manifest(restore_from, secret=secret)
        restore_key = checkpoint.table_key(secret, restored["table"].get("name", ""))
    ray = _attach()
    raise_if_exists(name)
    config = {
        "name": name,
        "rows": rows,
        "dim": dim,
        "dtype": dtype,
        "seed": seed,
        "optimizer": optimizer.to_dict(),
        "mode": mode,
        "max_staleness": max_staleness,
        "pushes_per_step": pushes_per_step,
        "step_on_push": step_on_push,
        "data_channel": data_channel,
        "checkpoint_root": checkpoint_root,
        "save_every": save_every,
        "threads": threads_per_shard,
        "restore_from": restore_from,
        # Kept like the data secret: the catalog and the shards' own arguments, which a
        # restarted shard gets again; never the operator's secret, only this table's keys.
        "checkpoint_key": checkpoint.table_key(secret, name),
        "restore_key": restore_key,
        **channel,
    }
    grid = _grid(rows, dim, shards, config, max_shard_bytes)
    config["grid"] = grid.to_dict()
    check_budget(config, grid, max_shard_bytes)
    config["cpus"], config["device"] = _placement(
        ray.cluster_resources(), len(grid.blocks()), threads_per_shard, cpus_per_shard, device
    )
    gpus = config["device"] == "cuda"
    _claim_name(ray, config)
    try:
        shards_by_block = _spawn(ray, config, grid, worker_cls, max_restarts, gpus, timeout_s)
        table = Table(config, shards_by_block, timeout_s=timeout_s)
    except BaseException:
        _undo_create(ray, name, grid)  # nothing of a failed create stays, the name is free
        raise
    log.info("created table %s: %d x %d over a %s grid", name, rows, dim, grid.shape)
    return table


def _placement(
    resources: dict, shards: int, threads: int, cpus_per_shard, device: str
) -> tuple[float, str]:
    """(CPUs reserved per shard, device) for ``shards`` shards, refused at once when the
    cluster has too few CPUs or, for ``device="cuda"``, too few GPUs (one per shard),
    instead of waiting for resources that will not come."""
    if cpus_per_shard is None:
        cpus_per_shard = float(threads)
    if (
        isinstance(cpus_per_shard, bool)
        or not isinstance(cpus_per_shard, (int, float))
        or not math.isfinite(cpus_per_shard)
        or cpus_per_shard <= 0
    ):
        raise InvalidArgument(
            "cpus_per_shard", "None (threads_per_shard) or a number > 0", cpus_per_shard
        )
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if shards * cpus_per_shard > cpus:
        raise InvalidArgument(
            "shards",
            f"at most {cpus:g} CPUs in all ({shards} shards x "
            f"{cpus_per_shard:g} cpus_per_shard; a smaller cpus_per_shard "
            "shares cores)",
            shards,
        )
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidArgument("device", "'auto', 'cpu' or 'cuda'", device)
    if device == "cuda" and gpus < shards:
        raise InvalidArgument(
            "device",
            f"'cpu' or 'auto': 'cuda' needs one GPU per shard, "
            f"{shards} GPUs, and the cluster has {gpus:g}",
            device,
        )
    if device == "auto":
        device = "cuda" if gpus >= shards else "cpu"
    return float(cpus_per_shard), device


def _claim_name(ray, config: dict) -> None:
    """Create the table's catalog: the claim on its name. Ray registers a named actor
    atomically, so of concurrent creates of one name exactly one gets here; the others
    raise TableExists having placed nothing, and so remove nothing of the winner's.

    The catalog restarts without limit: losing its node must not orphan the shards.
    A restart rebuilds it from the config; the shards' copies refill published keys."""
    try:
        ray.remote(TableCatalog).options(
            name=catalog_name(config["name"]),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
        ).remote(config)
    except ValueError as e:  # ray.exceptions.ActorAlreadyExistsError
        raise TableExists(config["name"]) from e


def _undo_create(ray, name: str, grid: ShardGrid) -> None:
    """Kill whatever a failed create_table placed (catalog, shards) and free its
    placement group; by name, so that it works whichever step failed."""
    for actor_name in [catalog_name(name), *(shard_name(name, r, c) for r, c in grid.blocks())]:
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass  # never created
    remove_placement_group_of(name)


def _spawn(ray, config, grid: ShardGrid, worker_cls, max_restarts, gpus, timeout_s) -> dict:
    """A SPREAD placement group and one detached actor per block."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    name = config["name"]
    bundle = {"CPU": config["cpus"], **({"GPU": 1} if gpus else {})}
    pg = placement_group(
        [bundle] * len(grid.blocks()),
        strategy="SPREAD",
        name=f"memstore/{name}",
        lifetime="detached",
    )
    wait_s = timeout_s or DEFAULT_TIMEOUT_S
    try:
        ray.get(pg.ready(), timeout=wait_s)
    except ray.exceptions.GetTimeoutError as e:
        remove_placement_group(pg)
        raise ShardUnavailable(
            f"memstore/{name}",
            wait_s,
            f"the cluster has no room for "
            f"{len(grid.blocks())} shards of {bundle}; free resources or "
            "use fewer shards or a smaller cpus_per_shard",
        ) from e
    if gpus:  # each block against the free memory of the GPU its bundle landed on
        check_blocks_fit(
            [shard_bytes(config, grid)] * len(grid.blocks()),
            free_gpu_memory(ray, pg, len(grid.blocks()), wait_s),
        )
    actor_cls = ray.remote(worker_cls)
    shards = {}
    for i, (r, c) in enumerate(grid.blocks()):
        shards[(r, c)] = actor_cls.options(
            name=shard_name(name, r, c),
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=max_restarts,
            max_task_retries=0,
            num_cpus=config["cpus"],
            num_gpus=1 if gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
        ).remote(config, r, c)
    return shards


def connect(name: str, push_id: int = 0, timeout_s: float | None = None) -> Table:
    """A handle on an existing table from any driver attached to the same cluster."""
    _check_name(name)
    ray = _attach()
    config = find_table(name)
    grid = ShardGrid.from_dict(config["grid"])
    shards = {
        (r, c): ray.get_actor(shard_name(name, r, c), namespace=NAMESPACE) for r, c in grid.blocks()
    }
    return Table(config, shards, push_id=push_id, timeout_s=timeout_s)


def load_table(
    path: str, name: str, shards=1, checkpoint_secret: str | None = None, **options
) -> Table:
    """Create table ``name`` from the checkpoint at ``path``, on any grid, once its
    manifest verifies with the key of the table it names, derived from
    ``checkpoint_secret`` (default: :func:`memstore.checkpoint.operator_secret`). The new
    table signs its own checkpoints with the same secret."""
    path = checkpoint.resolve(path)  # on the driver, before any shard sees it
    secret = checkpoint.operator_secret(checkpoint_secret)
    manifest = checkpoint.read_manifest(path, secret=secret)
    t = manifest["table"]
    return create_table(
        name,
        t["rows"],
        t["dim"],
        shards=shards,
        optimizer=optimizer_from_dict(t["optimizer"]),
        dtype=t["dtype"],
        seed=t.get("seed", 0),
        restore_from=path,
        checkpoint_secret=secret,
        **options,
    )
