"""Pallas GPU kernels (Triton lowering) for SpecAttn, each with a plain-jnp reference.

Public ops:
  top_p_select / top_p_select_reference / top_p_exact_reference / top_p_select_dispatch
  sparse_verify_attention / sparse_verify_attention_reference / dense_verify_attention /
  sparse_verify_attention_dispatch / dense_block_list

Backend switch: every `*_dispatch` op takes backend="auto" | "pallas" | "reference";
"auto" runs the Pallas kernel when `default_backend()` is "pallas" (a CUDA GPU) and the jnp
reference elsewhere. This package imports nothing from `specattn_jax`.
"""

from pallas_kernels._common import (
    DEFAULT_MASK_VALUE as DEFAULT_MASK_VALUE,
    default_backend as default_backend,
    resolve_backend as resolve_backend,
)
from pallas_kernels.sparse_verify_attention import (
    BlockSizes as SparseVerifyBlockSizes,
    dense_block_list as dense_block_list,
    dense_verify_attention as dense_verify_attention,
    selection_mask as selection_mask,
    sparse_verify_attention as sparse_verify_attention,
    sparse_verify_attention_dispatch as sparse_verify_attention_dispatch,
    sparse_verify_attention_reference as sparse_verify_attention_reference,
)
from pallas_kernels.top_p_select import (
    FILL_INDEX as FILL_INDEX,
    BlockSizes as TopPBlockSizes,
    top_p_exact_reference as top_p_exact_reference,
    top_p_select as top_p_select,
    top_p_select_dispatch as top_p_select_dispatch,
    top_p_select_reference as top_p_select_reference,
)

__all__ = [
    "DEFAULT_MASK_VALUE",
    "FILL_INDEX",
    "SparseVerifyBlockSizes",
    "TopPBlockSizes",
    "default_backend",
    "dense_block_list",
    "dense_verify_attention",
    "resolve_backend",
    "selection_mask",
    "sparse_verify_attention",
    "sparse_verify_attention_dispatch",
    "sparse_verify_attention_reference",
    "top_p_exact_reference",
    "top_p_select",
    "top_p_select_dispatch",
    "top_p_select_reference",
]
