"""Memory layers in Hugging Face ``transformers`` models (the ``hf`` extra).

    from memstore import MemoryLayerArgs
    from memstore.hf import MemoryCallback, add_memory_layers, from_pretrained

    model = add_memory_layers(model, layers=[4], args=MemoryLayerArgs(dim=...))
    Trainer(model, args, train_dataset=..., callbacks=[MemoryCallback()]).train()
    model.save_pretrained("out")          # weights, config, and the value tables
    model = from_pretrained("out")

``import memstore`` does not import this module: transformers is optional.
"""

from .layers import MemoryMLP, add_memory_layers, decoder_blocks, memory_mlps
from .saving import from_pretrained
from .training import MemoryCallback

__all__ = [
    "MemoryCallback",
    "MemoryMLP",
    "add_memory_layers",
    "decoder_blocks",
    "from_pretrained",
    "memory_mlps",
]
