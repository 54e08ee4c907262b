"""Tiny random models of each supported family, built here (no downloads), a plain
torch reference of the memory layer, and token data for them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests downloads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from memstore import MemoryLayerArgs  # noqa: E402

VOCAB, WIDTH = 64, 32

_COMMON = {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 64}
_ATTENTION = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, **_ATTENTION),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, **_ATTENTION),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, **_ATTENTION, head_dim=8),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, **_ATTENTION),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, **_ATTENTION, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=WIDTH,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())


def memory_args(**overrides) -> MemoryLayerArgs:
    """A memory of 64 rows, 2 heads reading 4 rows each."""
    fields = {"dim": WIDTH, "heads": 2, "k": 4, "n_keys": 8, "key_dim": 16, "value_lr": 1e-2}
    return MemoryLayerArgs(**{**fields, **overrides})


def tokens(n: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def causal_lm_data(n: int, length: int = 8, seed: int = 0) -> list[dict]:
    """n sequences for a Trainer: every position a target."""
    return [{"input_ids": s, "labels": s} for s in tokens(n, length, seed)]


def reference_memory(x, query, keys, values, args: MemoryLayerArgs, gate=None, out=None):
    """The memory layer in plain torch: brute-force product-key top-k over all n² rows."""
    half = args.key_dim // 2
    q = (x.reshape(-1, args.dim) @ query.T).view(-1, args.heads, 2, half)
    if args.qk_norm:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + torch.finfo(q.dtype).eps)
        keys = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + torch.finfo(keys.dtype).eps)
    first = torch.einsum("nhd,hkd->nhk", q[:, :, 0], keys[:, 0])
    second = torch.einsum("nhd,hkd->nhk", q[:, :, 1], keys[:, 1])
    every = (first[..., :, None] + second[..., None, :]).flatten(2)  # row i·n + j
    scores, rows = every.topk(args.k, dim=-1)
    weights = torch.softmax(scores, dim=-1)
    y = (weights[..., None] * values[rows]).sum(dim=(1, 2))
    if gate is not None:
        y = y * F.silu(x.reshape(-1, args.dim) @ gate.T)
    if out is not None:
        y = y @ out.T
    return y.reshape(*x.shape[:-1], -1)


def training_args(out_dir, batch: int, steps: int, accumulate: int = 1, **overrides):
    """Trainer arguments of the tests: batches in data order, a loss logged every step."""
    fields = {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulate,
        "max_steps": steps,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "train_sampling_strategy": "sequential",
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(**{**fields, **overrides})


def logged_losses(trainer: transformers.Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
