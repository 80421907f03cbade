"""KV selection: the selector interface, SpecAttn's draft-guided top-p, block lists."""

from specattn_jax.selection.base import SelectionInputs, Selector, sparse_layer_flags
from specattn_jax.selection.blocks import compact_blocks, num_blocks
from specattn_jax.selection.specattn import SpecAttnSelector, check_granularity

__all__ = [
    "SelectionInputs",
    "Selector",
    "SpecAttnSelector",
    "check_granularity",
    "compact_blocks",
    "num_blocks",
    "sparse_layer_flags",
]
