"""EngramLayer against plain references written here: the hash in Python ints, the
primes against sympy, the layer against nn.Embedding per head + the gate + nn.Conv1d,
its gradients against torch autograd of that reference."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn

import memstore
from memstore import EngramArgs, EngramLayer, InvalidArgument
from memstore.engram import engram_primes, is_prime

B, T, DIM = 3, 9, 41
ARGS = dict(dim=DIM, orders=[2, 3], heads=2, rows=13, head_dim=5, seed=7)
PAD = 2**31 - 1
M64 = (1 << 64) - 1


# ---- the independent references ----------------------------------------------------


def reference_multipliers(seed: int, heads: int, max_order: int) -> list[list[int]]:
    """splitmix64 from its published constants; top 31 bits of each output, made odd."""
    state, out = seed, []
    for _ in range(heads):
        row = []
        for _ in range(max_order):
            state = (state + 0x9E3779B97F4A7C15) % 2**64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
            z ^= z >> 31
            row.append((z >> 33) | 1)
        out.append(row)
    return out


def reference_rows(tokens: list[list[int]], args: EngramArgs, primes: list[int]) -> list:
    """Per token, per head: offset + (xor_k x_{t-k}·m_k) mod p, one token at a time."""
    heads = [n for n in args.orders for _ in range(args.heads)]
    mult = reference_multipliers(args.seed, len(heads), max(args.orders))
    out = []
    for seq in tokens:
        per_token = []
        for t in range(len(seq)):
            per_head, offset = [], 0
            for h, n in enumerate(heads):
                mix = 0
                for k in range(n):
                    x = seq[t - k] if t - k >= 0 else PAD
                    mix ^= x * mult[h][k]
                per_head.append(offset + mix % primes[h])
                offset += primes[h]
            per_token.append(per_head)
        out.append(per_token)
    return out


class ReferenceEngram(nn.Module):
    """The layer written plainly: an nn.Embedding per head, the gate, nn.Conv1d."""

    def __init__(self, layer: EngramLayer):
        super().__init__()
        a = layer.args
        self.dim = a.dim
        values = layer.table.values
        self.embeddings = nn.ModuleList(
            nn.Embedding.from_pretrained(values[o : o + p].clone(), freeze=False)
            for o, p in zip(layer.offsets, layer.primes)
        )
        self.key = nn.Linear(a.memory_dim, a.dim, bias=False)
        self.value = nn.Linear(a.memory_dim, a.dim, bias=False)
        self.norms = nn.ModuleList(nn.RMSNorm(a.dim, eps=a.norm_eps) for _ in range(3))
        dilation = max(a.orders)
        self.conv = nn.Conv1d(
            a.dim, a.dim, a.kernel_size, groups=a.dim, dilation=dilation, bias=False,
            padding=(a.kernel_size - 1) * dilation,
        )  # fmt: skip
        with torch.no_grad():
            self.key.weight.copy_(layer.key.weight)
            self.value.weight.copy_(layer.value.weight)
            self.conv.weight.copy_(layer.conv.weight)
            for mine, theirs in zip(
                self.norms, (layer.query_norm, layer.key_norm, layer.conv_norm)
            ):
                mine.weight.copy_(theirs.weight)

    def forward(self, x, rows, offsets):
        """rows (B, T, heads) global rows, offsets: each head's first row."""
        e = torch.cat([emb(rows[..., h] - offsets[h]) for h, emb in enumerate(self.embeddings)], -1)
        k, v = self.key(e), self.value(e)
        q_norm, k_norm, c_norm = self.norms
        alpha = torch.sigmoid((q_norm(x) * k_norm(k)).sum(-1, keepdim=True) / self.dim**0.5)
        gated = alpha * v
        conv = self.conv(c_norm(gated).transpose(1, 2))[..., : x.shape[1]]
        return F.silu(conv.transpose(1, 2)) + gated


def make_layer(optimizer=None, **overrides) -> EngramLayer:
    torch.manual_seed(0)
    args = EngramArgs(**{**ARGS, **overrides})
    rows = sum(engram_primes(args.rows, args.n_heads))
    table = memstore.ShardTable(rows, args.head_dim, optimizer=optimizer, seed=3)
    layer = EngramLayer(args, table=table)
    with torch.no_grad():  # norms away from 1, so that copying them matters
        for norm in (layer.query_norm, layer.key_norm, layer.conv_norm):
            norm.weight.uniform_(0.5, 1.5)
        layer.conv.weight.normal_()  # zero at init: made nonzero, so that the test sees it
    return layer


def batch(seed: int = 1, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    return tokens, torch.randn(B, T, DIM, generator=g)


# ---- hash and primes ---------------------------------------------------------------


def test_hash_matches_the_per_token_reference():
    layer = make_layer()
    tokens, _ = batch()
    tokens[0, :4] = torch.tensor([0, 255, 0, 255])  # extremes of the byte range
    expected = reference_rows(tokens.tolist(), layer.args, layer.primes)
    assert layer.hash(tokens).tolist() == expected
    wide = torch.tensor([[PAD - 1, 5, PAD - 1, 0, 1]])  # the largest id: products fit int64
    assert layer.hash(wide).tolist() == reference_rows(wide.tolist(), layer.args, layer.primes)


def test_hash_is_seeded_and_each_head_stays_in_its_rows():
    layer, other = make_layer(), make_layer(seed=8)
    tokens, _ = batch()
    rows = layer.hash(tokens)
    assert not torch.equal(rows, other.hash(tokens))
    for h, (start, p) in enumerate(zip(layer.offsets, layer.primes)):
        assert bool(((rows[..., h] >= start) & (rows[..., h] < start + p)).all())


def test_hash_is_the_same_in_another_process():
    layer = make_layer()
    tokens, _ = batch()
    code = (
        "import json, sys, torch\n"
        "from memstore import EngramArgs, EngramLayer\n"
        "a = json.loads(sys.argv[1])\n"
        "layer = EngramLayer(EngramArgs(**a['args']))\n"
        "print(json.dumps(layer.hash(torch.tensor(a['tokens'])).tolist()))\n"
    )
    payload = json.dumps({"args": ARGS, "tokens": tokens.tolist()})
    out = subprocess.run(
        [sys.executable, "-c", code, payload], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == layer.hash(tokens).tolist()


def test_primes_are_distinct_primes_from_the_size_asked():
    for rows, count in ((13, 4), (1, 3), (65521, 6), (1000, 2)):
        primes = engram_primes(rows, count)
        assert len(set(primes)) == count and all(sympy.isprime(p) for p in primes)
        assert primes[0] == sympy.nextprime(rows - 1)
        assert all(b == sympy.nextprime(a) for a, b in zip(primes, primes[1:]))
    assert [n for n in range(200) if is_prime(n)] == list(sympy.primerange(0, 200))
    assert is_prime(2**61 - 1) and not is_prime(3215031751)  # a strong pseudoprime to 2,3,5,7


# ---- forward and gradients against the reference -----------------------------------


def test_forward_matches_the_reference():
    layer = make_layer()
    tokens, x = batch()
    reference = ReferenceEngram(layer)
    expected = reference(x, layer.hash(tokens), layer.offsets)
    torch.testing.assert_close(layer(x, tokens), expected, rtol=1e-5, atol=1e-5)
    # the values looked up apart (a prefetch) give the same output
    rows = layer.rows(tokens)
    y = layer.table.lookup(rows.idx, rows.w)
    torch.testing.assert_close(layer(x, rows=rows, y=y), expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_autograd_of_the_reference():
    layer = make_layer(optimizer=memstore.SGD(lr=1.0))  # values -= grad: the pushed gradient
    tokens, x = batch(vocab=6)  # few ids: rows repeat within and across sequences
    reference = ReferenceEngram(layer)
    x_ref, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(5))
    (reference(x_ref, layer.hash(tokens), layer.offsets) * g).sum().backward()
    before = layer.table.values.clone()
    layer.step, layer.push_id = 1, 4
    (layer(x_mine, tokens) * g).sum().backward()
    assert layer.table.pushes(1) == [4]
    layer.table.step(1)
    pushed = before - layer.table.values
    expected = torch.cat([emb.weight.grad for emb in reference.embeddings])
    torch.testing.assert_close(pushed, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_mine.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    pairs = [
        (layer.key, reference.key),
        (layer.value, reference.value),
        (layer.conv, reference.conv),
        (layer.query_norm, reference.norms[0]),
        (layer.key_norm, reference.norms[1]),
        (layer.conv_norm, reference.norms[2]),
    ]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)


class NoDwTable:
    """A table whose backward answers no dw: the layer must not need one."""

    def __init__(self, table):
        self.table, self.rows, self.dim = table, table.rows, table.dim
        self.pushes = []

    def lookup(self, idx, w):
        return self.table.lookup(idx, w)

    def backward(self, idx, w, dy, step=None, push_id=0, lr=None):
        self.pushes.append((idx.clone(), w.clone(), dy.clone(), step, push_id, lr))
        return None

    def step(self, step=None, lr=None):
        return self.table.step(step, lr)


def test_backward_pushes_one_slot_per_row_and_needs_no_dw():
    base = make_layer()
    table = NoDwTable(base.table)
    layer = EngramLayer(base.args, table=table)
    tokens, x = batch(vocab=6)
    layer.step, layer.push_id, layer.value_lr = 2, 1, 0.5
    layer(x.requires_grad_(), tokens).square().sum().backward()
    ((idx, w, dy, step, push_id, lr),) = table.pushes
    assert (step, push_id, lr) == (2, 1, 0.5)
    assert idx.shape == (idx.shape[0], 1) and torch.equal(w, torch.ones_like(w))
    assert idx.flatten().tolist() == sorted(set(layer.hash(tokens).flatten().tolist()))
    assert dy.shape == (idx.shape[0], layer.args.head_dim) and x.grad is not None


class AsyncTable(NoDwTable):
    """A table with the store's async calls, answered on a thread of its own; its
    lookups fail with ``error`` when one is set."""

    def __init__(self, table, error: Exception | None = None):
        super().__init__(table)
        self.error = error
        self.pool = ThreadPoolExecutor(1)
        self.async_pushes = []

    def lookup(self, idx, w):
        if self.error is not None:
            raise self.error
        return super().lookup(idx, w)

    def lookup_async(self, idx, w):
        return self.pool.submit(self.lookup, idx.clone(), w.clone())

    def backward_async(self, idx, w, dy, step=None, push_id=0, lr=None, need_dw=True):
        self.async_pushes.append(need_dw)
        return self.pool.submit(self.backward, idx, w, dy.clone(), step, push_id, lr)


def test_a_prefetched_forward_equals_the_forward_and_pushes_without_waiting():
    base = make_layer()
    table = AsyncTable(base.table)
    layer = EngramLayer(base.args, table=table)
    layer.load_state_dict(base.state_dict())
    tokens, x = batch(vocab=6)
    fetch = layer.prefetch(tokens)
    assert torch.equal(fetch.rows.idx, layer.rows(tokens).idx)
    torch.testing.assert_close(layer(x, fetch=fetch), base(x, tokens), rtol=0, atol=0)
    layer.async_push, layer.step = True, 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xa, fetch=layer.prefetch(tokens)).square().sum().backward()
    blocking = EngramLayer(base.args, table=NoDwTable(base.table))
    blocking.load_state_dict(base.state_dict())
    blocking.step = 1
    blocking(xb, tokens).square().sum().backward()
    (pushed,) = layer.take_pushes()
    assert pushed.result() is None and layer.pushes == [] and table.async_pushes == [False]
    ((idx, _, dy, step, _, _),) = table.pushes
    ((want_idx, _, want_dy, _, _, _),) = blocking.table.pushes
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(dy, want_dy, rtol=0, atol=0)
    rows = base.rows(tokens)
    assert step == 1 and torch.equal(idx, rows.idx) and torch.equal(idx, want_idx)
    with pytest.raises(InvalidArgument) as e:
        layer(x, rows=rows, fetch=layer.prefetch(tokens))
    assert e.value.field == "fetch"


class FailingTable(NoDwTable):
    """A table without async calls whose lookups fail."""

    error = memstore.ShardUnavailable("t/shard-0-0", 1.0)

    def lookup(self, idx, w):
        raise self.error


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_failed_prefetch_raises_in_the_forward_as_the_lookup_would(asynchronous):
    base = make_layer()
    error = FailingTable.error
    table = AsyncTable(base.table, error) if asynchronous else FailingTable(base.table)
    layer = EngramLayer(base.args, table=table)
    tokens, x = batch()
    fetch = layer.prefetch(tokens)  # issued without error
    with pytest.raises(memstore.ShardUnavailable) as prefetched:
        layer(x, fetch=fetch)
    with pytest.raises(memstore.ShardUnavailable) as blocking:
        layer(x, tokens)
    assert prefetched.value is error and blocking.value is error


def test_training_on_a_local_table_lowers_the_loss():
    """Next token = a fixed function of the last two: what a bigram memory can hold."""
    torch.manual_seed(0)
    args = EngramArgs(dim=16, orders=[2], heads=2, rows=97, head_dim=8, value_lr=3e-2)
    layer = EngramLayer(args)
    head = nn.Linear(16, 8)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    rule = torch.randint(0, 8, (8, 8), generator=g)
    losses = []
    for step in range(1, 41):
        tokens = torch.randint(0, 8, (8, 12), generator=g)
        target = rule[tokens[:, 1:], tokens[:, :-1]]  # (B, T-1): from x_t and x_{t-1}
        x = torch.zeros(8, 12, 16)
        layer.step = step
        logits = head(layer(x, tokens))[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.table.step(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# ---- validation --------------------------------------------------------------------


def test_bad_input_is_refused_by_field():
    layer = make_layer()
    tokens, x = batch()
    negative = tokens.clone()
    negative[1, 2] = -1
    cases = [
        (dict(x=x, tokens=tokens.float()), "tokens"),
        (dict(x=x, tokens=negative), "tokens"),
        (dict(x=x, tokens=torch.full((B, T), PAD)), "tokens"),
        (dict(x=x, tokens=tokens[0]), "tokens"),
        (dict(x=x[:, :-1], tokens=tokens), "x"),
        (dict(x=x[..., :-1], tokens=tokens), "x"),
        (dict(x=x), "tokens"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgument) as e:
            layer(**kwargs)
        assert e.value.field == field
    rows = layer.rows(tokens)
    with pytest.raises(InvalidArgument) as e:
        layer(x, rows=rows, y=torch.zeros(rows.idx.shape[0] + 1, layer.args.head_dim))
    assert e.value.field == "y"
    assert layer.table.pending_steps() == []
    with pytest.raises(InvalidArgument) as e:
        EngramLayer(layer.args, table=memstore.ShardTable(10, 5))
    assert e.value.field == "table"


@pytest.mark.parametrize(
    "field,value",
    [("orders", [2, 2]), ("orders", []), ("orders", [0]), ("heads", 0), ("rows", 2**31),
     ("head_dim", 1.5), ("seed", -1), ("value_lr", 0)],
)  # fmt: skip
def test_bad_args_are_refused(field, value):
    with pytest.raises(InvalidArgument) as e:
        EngramArgs(**{**ARGS, field: value})
    assert e.value.field == field


def test_args_from_dict_sorts_orders():
    args = EngramArgs.from_dict({"dim": 8, "orders": [3, 2]})
    assert args.orders == [2, 3] and args.n_heads == 4 and args.memory_dim == 128
    with pytest.raises(InvalidArgument):
        EngramArgs.from_dict({"dim": 8, "order": [2]})
