"""Trainer inside Ray Train: 2 workers on a 2-shard store table train as one process
does (same losses, same values); a store table saves beside the weights and loads
back; a table whose pushes_per_step does not fit the run is refused before step 1."""

import numpy as np
import pytest
import torch
import transformers

import memstore
from memstore import InvalidArgument
from memstore.hf import MemoryCallback, add_memory_layers, from_pretrained, memory_mlps
from tests.local_ray import local_ray

from .models import causal_lm_data, logged_losses, memory_args, tiny_model, tokens, training_args

ARGS = memory_args()
STEPS = 4


@pytest.fixture(scope="module")
def ray_local():
    # Ray Train's controller polls its workers once per health check (2 s by default).
    with local_ray(num_cpus=8, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}) as ray:
        yield ray


def _model(table=None):
    model = tiny_model("llama", seed=1)
    return add_memory_layers(model, [1], ARGS, mode="replace", table=table)


def _trainer(model, out_dir, batch: int, accumulate: int) -> transformers.Trainer:
    return transformers.Trainer(
        model,
        training_args(out_dir, batch=batch, steps=STEPS, accumulate=accumulate),
        train_dataset=causal_lm_data(32, seed=3),
        callbacks=[MemoryCallback()],
    )


def _train_worker(config):
    from ray.train.huggingface.transformers import prepare_trainer

    torch.set_num_threads(1)
    model = _model(memstore.connect(config["table"]))
    trainer = prepare_trainer(_trainer(model, config["out"], batch=2, accumulate=2))
    trainer.train()
    return logged_losses(trainer)


def _store_table(name: str, pushes: int):
    return memstore.create_table(
        name,
        ARGS.n_keys**2,
        ARGS.value_dim,
        shards=2,
        seed=ARGS.seed,  # the local table of the in-process run: seed + position 0
        optimizer=memstore.Adam(lr=ARGS.value_lr),
        step_on_push=True,
        pushes_per_step=pushes,
        cpus_per_shard=0.5,
    )


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """The in-process run, and the Ray Train run of 2 workers on a 2-shard table."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tmp = tmp_path_factory.mktemp("ray")
    local = _model()
    in_process = _trainer(local, tmp / "local", batch=8, accumulate=1)
    in_process.train()
    table = _store_table("hf-ray", pushes=2 * 2)  # 2 workers x 2 micro-batches x 1 layer
    try:
        result = TorchTrainer(
            _train_worker,
            train_loop_config={"table": "hf-ray", "out": str(tmp / "worker")},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="hf-ray", storage_path=str(tmp / "ray")),
        ).fit()
        yield local, logged_losses(in_process), table, result.return_value
    finally:
        table.drop()


def test_ray_train_workers_on_the_store_equal_one_process(trained):
    local, expected, table, losses = trained
    assert len(losses) == STEPS and losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    store_values = table.gather(torch.arange(table.rows))
    local_values = memory_mlps(local)[0][1].memory.table.base.values
    assert [shard["last_step"] for shard in table.stats()["shards"]] == [STEPS, STEPS]
    np.testing.assert_allclose(store_values.numpy(), local_values.numpy(), rtol=1e-5, atol=1e-6)


def test_a_store_table_saves_beside_the_weights_and_loads_back(trained, tmp_path):
    table = trained[2]
    model = _model(table).eval()  # values trained by the workers
    model.save_pretrained(tmp_path / "saved")
    local = from_pretrained(tmp_path / "saved")  # the values in a local table
    restored = memory_mlps(local)[0][1].memory.table.base
    assert torch.equal(restored.values, table.gather(torch.arange(table.rows)))
    assert restored.last_step == STEPS
    ids = tokens(2, seed=5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        # the store sums each row block's part of a bag: equal up to summation order
        torch.testing.assert_close(local(input_ids=ids).logits, logits, rtol=1e-6, atol=1e-6)
        again = memstore.load_table(str(tmp_path / "saved" / "memstore" / "table-0"), "hf-load")
        try:
            attached = from_pretrained(tmp_path / "saved", table=again)
            assert memory_mlps(attached)[0][1].memory.table.base is again
            torch.testing.assert_close(attached(input_ids=ids).logits, logits, rtol=1e-6, atol=1e-6)
        finally:
            again.drop()


def test_a_table_that_does_not_fit_the_run_is_refused_before_the_first_step(trained, tmp_path):
    table = trained[2]  # 4 pushes a step; one process without accumulation pushes 1
    before = table.fingerprints()
    with pytest.raises(InvalidArgument, match="pushes_per_step"):
        _trainer(_model(table), tmp_path, batch=8, accumulate=1).train()
    assert table.fingerprints() == before
