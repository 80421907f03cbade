"""Pallas GPU kernels (Triton lowering) for SpecAttn, each with a plain-jnp reference.

Public ops:
  top_p_select / top_p_select_reference / top_p_exact_reference / top_p_select_dispatch
  sparse_verify_attention / sparse_verify_attention_reference / dense_verify_attention /
  sparse_verify_attention_dispatch / dense_block_list / use_verify_kernel
  scatter_rows (a row-batched scatter that XLA partitions over rows without gathers),
  compact_blocks (a block mask to a compacted block list), GRANULARITIES, FILL_INDEX
  pallas_kernels.cache_write (a module, not re-exported): a step's new keys and values
    into the KV cache, one in-place launch for both; the model's write on a GPU
  pallas_kernels.decode_matmul (a module, not re-exported): a step's projections with the
    RMSNorm, residual add and SwiGLU fused in, and its reference; opt-in, measured slower
    than XLA (see the module and `specattn_jax.model.MATMUL_MODES`)

Backend switch: every `*_dispatch` op takes backend="auto" | "pallas" | "reference";
"auto" runs the Pallas kernel when `default_backend()` is "pallas" (a CUDA GPU) and the jnp
reference elsewhere. This package imports nothing from `specattn_jax`.
"""

from pallas_kernels._common import (
    DEFAULT_MASK_VALUE as DEFAULT_MASK_VALUE,
)
from pallas_kernels._common import (
    FILL_INDEX as FILL_INDEX,
)
from pallas_kernels._common import (
    GRANULARITIES as GRANULARITIES,
)
from pallas_kernels._common import (
    compact_blocks as compact_blocks,
)
from pallas_kernels._common import (
    default_backend as default_backend,
)
from pallas_kernels._common import (
    resolve_backend as resolve_backend,
)
from pallas_kernels._common import (
    scatter_rows as scatter_rows,
)
from pallas_kernels.sparse_verify_attention import (
    BlockSizes as SparseVerifyBlockSizes,
)
from pallas_kernels.sparse_verify_attention import (
    dense_block_list as dense_block_list,
)
from pallas_kernels.sparse_verify_attention import (
    dense_verify_attention as dense_verify_attention,
)
from pallas_kernels.sparse_verify_attention import (
    reads_in_order as reads_in_order,
)
from pallas_kernels.sparse_verify_attention import (
    selection_mask as selection_mask,
)
from pallas_kernels.sparse_verify_attention import (
    sparse_verify_attention as sparse_verify_attention,
)
from pallas_kernels.sparse_verify_attention import (
    sparse_verify_attention_dispatch as sparse_verify_attention_dispatch,
)
from pallas_kernels.sparse_verify_attention import (
    sparse_verify_attention_reference as sparse_verify_attention_reference,
)
from pallas_kernels.sparse_verify_attention import (
    use_kernel as use_verify_kernel,
)
from pallas_kernels.top_p_select import (
    BlockSizes as TopPBlockSizes,
)
from pallas_kernels.top_p_select import (
    top_p_exact_reference as top_p_exact_reference,
)
from pallas_kernels.top_p_select import (
    top_p_select as top_p_select,
)
from pallas_kernels.top_p_select import (
    top_p_select_dispatch as top_p_select_dispatch,
)
from pallas_kernels.top_p_select import (
    top_p_select_reference as top_p_select_reference,
)

__all__ = [
    "DEFAULT_MASK_VALUE",
    "FILL_INDEX",
    "GRANULARITIES",
    "SparseVerifyBlockSizes",
    "TopPBlockSizes",
    "compact_blocks",
    "default_backend",
    "dense_block_list",
    "dense_verify_attention",
    "reads_in_order",
    "resolve_backend",
    "scatter_rows",
    "selection_mask",
    "sparse_verify_attention",
    "sparse_verify_attention_dispatch",
    "sparse_verify_attention_reference",
    "top_p_exact_reference",
    "top_p_select",
    "top_p_select_dispatch",
    "top_p_select_reference",
    "use_verify_kernel",
]
