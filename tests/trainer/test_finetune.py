"""trainer.finetune: a run starts from a pretraining run's checkpoint and trains only
what its method trains. Every check compares with what the checkpoint holds; the rows
a sparse_memory step may change are computed here in plain torch from the accesses
recorded at the tables' backward, not from the store's statistics."""

from pathlib import Path

import pytest
import torch

import memstore
from memstore import InvalidArgument
from memstore import checkpoint as store_checkpoint
from memstore.trainer import checkpoint
from memstore.trainer.loop import LocalRun
from memstore.trainer.train import train

from .helpers import config

PRETRAIN_STEPS = 6
TOP_T = 5
TABLE = "memory"


class Accesses:
    """Records, per step, the row ids every push to a ShardTable read (one per slot),
    and those with a nonzero gradient: a row read only where the loss does not reach
    (the masked entity position of a fact) is counted but has nothing to learn."""

    def __init__(self):
        self.by_step: dict[int, list[torch.Tensor]] = {}
        self.learning: dict[int, set[int]] = {}

    def wrap(self, backward):
        def recording(table, idx, w, dy, step=None, **kwargs):
            self.by_step.setdefault(step, []).append(idx.detach().reshape(-1).clone())
            grads = torch.zeros(table.rows, dy.shape[1], dtype=torch.float64)
            grads.index_add_(
                0,
                idx.reshape(-1),
                (w[..., None] * dy[:, None, :]).reshape(-1, dy.shape[1]).double(),
            )
            live = torch.nonzero(grads.abs().sum(1) > 0).reshape(-1).tolist()
            self.learning.setdefault(step, set()).update(live)
            return backward(table, idx, w, dy, step=step, **kwargs)

        return recording


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny run of PRETRAIN_STEPS steps whose checkpoint keeps its statistics as the
    snapshot "pretrain"; the rows each of its steps read."""
    root = tmp_path_factory.mktemp("pretrain")
    args = config(
        "tiny",
        root,
        f"steps={PRETRAIN_STEPS}",
        f"checkpoint_every={PRETRAIN_STEPS}",
        "eval_every=0",
        "stats_snapshot=pretrain",
    )
    accesses = Accesses()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memstore.ShardTable, "backward", accesses.wrap(memstore.ShardTable.backward))
        train(args)
    folder = checkpoint.step_dir(args.run_dir, PRETRAIN_STEPS)
    state, stores = checkpoint.read(folder)
    sd = store_checkpoint.load_block(stores["tables"][TABLE], memstore.ShardTable(64, 32).spec)
    return {
        "run_dir": args.run_dir,
        "model": state["model"],
        "values": sd["values"],
        "accesses": accesses.by_step,
    }


def finetune_run(pretrained, tmp_path, method: str, *extra: str) -> LocalRun:
    args = config(
        "tiny",
        tmp_path,
        "lr=1e-2",
        "warmup=0",
        "checkpoint_every=0",
        f"finetune.method={method}",
        f"finetune.from={pretrained['run_dir']}",
        *extra,
    )
    run = LocalRun(args, Path(args.run_dir))
    return run


def take_steps(run: LocalRun, steps: int = 2) -> None:
    for step in range(1, steps + 1):
        run.replica.train_step(step)
        run.step_tables(step)


def dense_state(run: LocalRun) -> dict:
    return {k: v.detach().clone() for k, v in run.replica.model.state_dict().items()}


def values(run: LocalRun) -> torch.Tensor:
    return run.tables[TABLE].values.detach().clone()


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return set(torch.nonzero((before != after).any(dim=1)).reshape(-1).tolist())


def test_a_run_starts_from_the_checkpoint(pretrained, tmp_path):
    run = finetune_run(pretrained, tmp_path, "full")
    for k, v in pretrained["model"].items():
        assert torch.equal(run.replica.model.state_dict()[k], v), k
    assert torch.equal(values(run), pretrained["values"])
    table = run.tables[TABLE]
    assert table.last_step == 0 and table.updates == 0
    assert all(not s.any() for s in table.state.values())  # a fresh optimizer
    assert table.row_stats(background="pretrain")["steps"] == PRETRAIN_STEPS


@pytest.mark.parametrize("method", ["memory", "sparse_memory"])
def test_memory_methods_leave_every_dense_parameter_as_it_was(pretrained, tmp_path, method):
    extra = [f"finetune.top_t={TOP_T}", "finetune.background=pretrain"]
    run = finetune_run(pretrained, tmp_path, method, *(extra if method == "sparse_memory" else []))
    take_steps(run)
    after = dense_state(run)
    assert after.keys() == pretrained["model"].keys()
    for k, v in pretrained["model"].items():
        assert torch.equal(after[k], v), k  # bit for bit
    assert changed_rows(pretrained["values"], values(run))  # the values did learn


def tfidf_top_rows(pretrained, step_rows: list[torch.Tensor], top_t: int) -> set[int]:
    """The top_t rows of one step by tf · log((N + 1) / (df + 1)), ties by row id: tf
    the step's slots reading the row, df the pretraining steps that read it, N those
    steps; every count from the recorded accesses."""
    tf = torch.bincount(torch.cat(step_rows), minlength=64).double()
    df = torch.zeros(64, dtype=torch.float64)
    for rows in pretrained["accesses"].values():
        df[torch.unique(torch.cat(rows))] += 1
    n = len(pretrained["accesses"])
    assert n == PRETRAIN_STEPS
    scores = tf * torch.log(torch.tensor(n + 1.0)) - tf * torch.log(df + 1)
    read = [r for r in range(64) if tf[r] > 0]
    best = sorted(read, key=lambda r: (-round(float(scores[r]), 9), r))
    return set(best[:top_t])


def test_sparse_memory_changes_only_the_top_t_rows_by_tfidf(pretrained, tmp_path):
    run = finetune_run(
        pretrained,
        tmp_path,
        "sparse_memory",
        f"finetune.top_t={TOP_T}",
        "finetune.background=pretrain",
    )
    # The counts since the checkpoint start from zero: against them (no background)
    # every score would be 0 and the lowest row ids would win.
    run.tables[TABLE].reset_stats()
    accesses = Accesses()
    for step in (1, 2):
        before = values(run)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memstore.ShardTable, "backward", accesses.wrap(memstore.ShardTable.backward))
            run.replica.train_step(step)
        run.step_tables(step)
        expected = tfidf_top_rows(pretrained, accesses.by_step[step], TOP_T)
        assert len(expected) == TOP_T
        assert changed_rows(before, values(run)) == expected & accesses.learning[step], step
        assert expected & accesses.learning[step]  # not vacuous


def test_memory_changes_every_row_a_step_reads(pretrained, tmp_path):
    run = finetune_run(pretrained, tmp_path, "memory")
    accesses = Accesses()
    before = values(run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memstore.ShardTable, "backward", accesses.wrap(memstore.ShardTable.backward))
        run.replica.train_step(1)
    run.step_tables(1)
    read = set(torch.cat(accesses.by_step[1]).tolist())
    assert len(read & accesses.learning[1]) > TOP_T
    assert changed_rows(before, values(run)) == read & accesses.learning[1]


def test_lora_trains_only_its_adapters(pretrained, tmp_path):
    pytest.importorskip("peft")
    run = finetune_run(pretrained, tmp_path, "lora", "finetune.lora_rank=2")
    take_steps(run)
    after = dense_state(run)
    adapters = {k for k in after if ".lora_" in k}
    # One adapter pair per attention and FFN projection of both layers (the memory
    # layer of layer 1 replaces its FFN): qkv, proj on 2 layers, w1, w2, w3 on 1.
    assert len(adapters) == 2 * (2 * 2 + 3)
    for k, v in after.items():
        if k in adapters:
            continue
        base = k.replace(".base_layer.", ".")
        assert torch.equal(v, pretrained["model"][base]), k  # base weights bit for bit
    trained = [k for k in adapters if "lora_B" in k]
    assert all(after[k].abs().sum() > 0 for k in trained)  # B starts at zero
    assert torch.equal(values(run), pretrained["values"])  # the values are frozen
    assert run.tables[TABLE].row_stats()["steps"] == PRETRAIN_STEPS + 2  # still counted


def test_full_changes_every_parameter_and_the_values(pretrained, tmp_path):
    run = finetune_run(pretrained, tmp_path, "full")
    take_steps(run)
    after = dense_state(run)
    for k, v in pretrained["model"].items():
        assert not torch.equal(after[k], v), k
    assert changed_rows(pretrained["values"], values(run))


def test_a_checkpoint_of_another_model_or_without_the_background_is_refused(pretrained, tmp_path):
    with pytest.raises(InvalidArgument, match="finetune.from.*model differing in \\['dim'"):
        finetune_run(pretrained, tmp_path, "memory", "model.dim=16")
    with pytest.raises(InvalidArgument, match="finetune.background"):
        finetune_run(
            pretrained, tmp_path, "sparse_memory", "finetune.top_t=2", "finetune.background=other"
        )
    with pytest.raises(InvalidArgument, match="finetune.from"):
        finetune_run({"run_dir": str(tmp_path / "nothing")}, tmp_path, "memory")


def test_a_finetuning_run_trains_and_resumes(pretrained, tmp_path):
    """Through trainer.train: a sparse_memory run writes checkpoints of its own and
    resumes from them, not from finetune.from."""
    args = config(
        "tiny",
        tmp_path,
        "steps=4",
        "checkpoint_every=2",
        "eval_every=0",
        "finetune.method=sparse_memory",
        "finetune.top_t=3",
        "finetune.background=pretrain",
        f"finetune.from={pretrained['run_dir']}",
    )
    whole = train(args)
    again = train(args, stop_after=2, overwrite=True)
    assert again["stopped"]
    resumed = train(args, resume=True)
    assert resumed["start"] == 2
    assert resumed["losses"][-1] == pytest.approx(whole["losses"][-1], rel=1e-5)


def _pushes(step: int, rows: int = 64, dim: int = 8):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, rows, (12, 4), generator=g)
    return idx, torch.rand(12, 4, generator=g) + 0.1, torch.randn(12, dim, generator=g)


def test_store_tables_take_the_finetuning_steps_as_local_ones_do():
    """finetune.table_step on a store Table of 2 row blocks changes the same rows as on
    one in-process ShardTable fed the same pushes: sparse_memory's top-t against the
    background, lora none."""
    from memstore.optim import SGD
    from memstore.trainer import finetune
    from memstore.trainer.config import FinetuneArgs
    from tests.local_ray import local_ray

    sparse = FinetuneArgs(method="sparse_memory", from_="x", top_t=6, background="pre")
    lora = FinetuneArgs(method="lora", from_="x")
    with local_ray(num_cpus=4):
        store = memstore.create_table(
            "finetune-store", 64, 8, shards=2, optimizer=SGD(lr=0.1), cpus_per_shard=0.5
        )
        try:
            local = memstore.ShardTable(64, 8, optimizer=SGD(lr=0.1))
            for table in (store, local):
                for step in (1, 2, 3):
                    table.backward(*_pushes(step), step=step)
                    table.step(step)
                table.snapshot_stats("pre")
            changed = {}
            for name, table in (("store", store), ("local", local)):
                before = torch.as_tensor(table.gather(torch.arange(64)))
                table.backward(*_pushes(4), step=4)
                finetune.table_step(table, 4, sparse)
                middle = torch.as_tensor(table.gather(torch.arange(64)))
                table.backward(*_pushes(5), step=5)
                finetune.table_step(table, 5, lora)
                after = torch.as_tensor(table.gather(torch.arange(64)))
                changed[name] = changed_rows(before, middle)
                assert torch.equal(middle, after), name  # lora: the values are frozen
            assert changed["store"] == changed["local"]
            assert len(changed["local"]) == 6
        finally:
            store.drop()
