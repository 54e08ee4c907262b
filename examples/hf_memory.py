"""A Hugging Face Llama with a memory layer, trained with transformers.Trainer.

Two tiny Llamas (random initialisation, nothing downloaded) learn the same synthetic
facts (entity, attribute -> value) for the same steps on the same batches: one plain,
one with a memory layer beside the MLP of its last block (``memstore.hf``, values in a
local ShardTable). Every ``--eval-every`` steps both are scored on recall of every
fact; the script prints the two recalls at equal steps.

    python examples/hf_memory.py [--steps 600] [--eval-every 100]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built here, not downloaded

import torch  # noqa: E402
import transformers  # noqa: E402

from memstore import MemoryLayerArgs  # noqa: E402
from memstore.hf import MemoryCallback, add_memory_layers  # noqa: E402
from memstore.trainer.data import FactsCorpus, evaluate  # noqa: E402

IGNORE = -100  # label of the positions the loss skips


class Facts(torch.utils.data.Dataset):
    """Every fact as a causal-LM example: [entity, attribute, value], scored on the value."""

    def __init__(self, corpus: FactsCorpus):
        self.sequences = corpus.sequences()

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        ids = self.sequences[i]
        return {"input_ids": ids, "labels": torch.tensor([IGNORE, IGNORE, int(ids[2])])}


class Logits(torch.nn.Module):
    """The model as ``evaluate`` calls it: token ids -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


class RecallEvery(transformers.TrainerCallback):
    """Recall of every fact each ``every`` steps (and at step 0)."""

    def __init__(self, corpus: FactsCorpus, every: int):
        self.corpus, self.every = corpus, every
        self.recall: dict[int, float] = {}

    def _score(self, model, step: int) -> None:
        self.recall[step] = evaluate(Logits(model), self.corpus)["recall"]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == args.max_steps:
            self._score(model, state.global_step)


def llama(ns, vocab_size: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(ns.seed)  # both models start from the same dense weights
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=ns.dim,
        intermediate_size=2 * ns.dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8,
    )
    return transformers.LlamaForCausalLM(config)


def train(model, corpus: FactsCorpus, ns, out_dir: str, callbacks) -> dict[int, float]:
    recall = RecallEvery(corpus, ns.eval_every)
    args = transformers.TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=ns.batch_size,
        max_steps=ns.steps,
        learning_rate=ns.lr,
        warmup_steps=ns.steps // 20,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=ns.seed,
        dataloader_drop_last=True,
    )
    transformers.Trainer(
        model, args, train_dataset=Facts(corpus), callbacks=[recall, *callbacks]
    ).train()
    return recall.recall


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--attributes", type=int, default=8)
    parser.add_argument("--values", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-keys", type=int, default=64, help="the table has n_keys² rows")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--value-lr", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out-dir", default="runs/hf-memory")
    parser.add_argument("--seed", type=int, default=0)
    # The models are tiny: a second thread makes each matmul slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    transformers.set_seed(ns.seed)
    corpus = FactsCorpus(ns.entities, ns.attributes, ns.values, seed=ns.seed)
    plain = llama(ns, corpus.vocab_size)
    memory = add_memory_layers(
        llama(ns, corpus.vocab_size),
        layers=[1],
        args=MemoryLayerArgs(
            dim=ns.dim, heads=4, k=8, n_keys=ns.n_keys, key_dim=32, value_lr=ns.value_lr
        ),
        mode="parallel",
    )
    recall = {
        "plain": train(plain, corpus, ns, os.path.join(ns.out_dir, "plain"), []),
        "memory": train(memory, corpus, ns, os.path.join(ns.out_dir, "memory"), [MemoryCallback()]),
    }
    print(f"\nrecall of {corpus.n_facts} facts ({ns.values} values: chance {1 / ns.values:.3f})")
    print(f"{'step':>6} {'plain Llama':>12} {'with memory':>12}")
    for step in sorted(recall["plain"]):
        print(f"{step:>6} {recall['plain'][step]:>12.3f} {recall['memory'][step]:>12.3f}")
    return recall


if __name__ == "__main__":
    main()
