"""trainer.replica: one rank's step against a plain computation, and the schedules.

A step's loss is the masked mean over the global batch and its update clipped AdamW,
against a float64 AdamW written here (norm, clipping, update), and its state
round-trips; the lr warms up and decays to min_lr, the values' lr follows it scaled or
stays constant, against values computed by hand; a peer's own value group steps at the
value lr.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from memstore import InvalidArgument
from memstore.trainer.config import TrainArgs
from memstore.trainer.replica import Replica, lr_at, value_lr_at

from .helpers import config


def test_schedule_warms_up_then_decays_to_min_lr():
    args = TrainArgs(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(args, s) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)


def test_value_lr_follows_the_dense_schedule_scaled_or_stays_constant():
    args = TrainArgs(steps=100, warmup=10, lr=1.0, min_lr=0.1, value_lr=0.5)
    for step in (1, 10, 50, 100):
        assert value_lr_at(args, step) == pytest.approx(0.5 * lr_at(args, step))
    const = TrainArgs(steps=100, warmup=10, value_lr=0.5, value_schedule="constant")
    assert {value_lr_at(const, s) for s in (1, 50, 100)} == {0.5}
    with pytest.raises(InvalidArgument, match="value_schedule"):
        TrainArgs(value_schedule="linear")


def _masked_mean_loss(model, batch):
    logits = model(batch.inputs)
    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    mask = batch.mask.flatten().to(nll.dtype)
    return (nll * mask).sum() / mask.sum()


def _clipped_adamw64(params, grads, *, lr, clip, weight_decay, betas=(0.9, 0.95), eps=1e-8):
    """One AdamW step (step 1, fresh state) after clipping the gradients to global norm
    ``clip``, in float64: (the gradient norm, the clipped gradients, the new params)."""
    grads = [g.double() for g in grads]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = min(1.0, clip / (norm + 1e-6))
    clipped = [g * scale for g in grads]
    b1, b2 = betas
    new = []
    for p, g in zip(params, clipped, strict=True):
        m_hat = (1 - b1) * g / (1 - b1)  # first moment after one step, bias-corrected
        v_hat = (1 - b2) * g * g / (1 - b2)
        new.append(p.double() * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps))
    return norm, clipped, new


def test_a_step_is_the_masked_mean_loss_clipped_adamw_and_the_state_round_trips(tmp_path):
    # A clip far below the gradient norm: the clipped gradients are of the order of
    # AdamW's eps, so the first step's update depends on the clipping, not on signs only.
    args = config("tiny", tmp_path, "grad_clip=1.0e-5", "weight_decay=0.1")
    replica = Replica(args)
    reference = Replica(args)
    batch = replica.data.global_batch(1)
    before = [p.detach().clone() for p in replica.params]
    reference.model.set_step(1, value_lr=value_lr_at(args, 1))
    loss = _masked_mean_loss(reference.model, batch)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in reference.params]
    out = replica.train_step(1)
    assert out["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert out["tokens"] == batch.inputs.numel() and out["lr"] == lr_at(args, 1)
    norm, clipped, expected = _clipped_adamw64(
        before, grads, lr=lr_at(args, 1), clip=1e-5, weight_decay=0.1
    )
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 100 * 1e-5
    for p, g, want in zip(replica.params, clipped, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7)
    state = replica.state()
    again = Replica(args)
    again.load(state)
    for name, value in again.model.state_dict().items():
        torch.testing.assert_close(value, state["model"][name], rtol=0, atol=0)


def test_a_peer_with_its_own_value_group_steps_its_values_at_the_value_lr(tmp_path):
    args = config(
        "tiny",
        tmp_path,
        "model.pkm_peer=true",
        "model.memory_plus=false",
        "model.pkm_value_group=true",
        "value_schedule=constant",
        "value_lr=0.05",
    )
    replica = Replica(args)
    (values,) = replica.model.peer_values()
    groups = replica.opt.param_groups
    assert [len(g["params"]) for g in groups] == [len(replica.params) - 1, 1]
    assert groups[1]["params"][0] is values and groups[1]["weight_decay"] == 0.0
    assert all(p is not values for p in replica.clipped)
    replica.train_step(1)
    assert groups[1]["lr"] == 0.05 and groups[0]["lr"] == lr_at(args, 1)
