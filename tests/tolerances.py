"""Test tolerances, one table for the whole suite (STYLE.md item 7).

Exact results (greedy tokens, top-p thresholds and index lists, the exactness invariants) are
compared with equality, never with these.
"""

import jax.numpy as jnp
import numpy as np

# Kernel or model output against its float32 reference, by the dtype of the inputs.
TOLERANCES = {
    jnp.float32: dict(rtol=1e-5, atol=1e-5),
    jnp.bfloat16: dict(rtol=2e-2, atol=1e-2),
    jnp.float16: dict(rtol=2e-2, atol=1e-2),
}

# float32 logits of our model against Hugging Face transformers.
HF_LOGITS_RTOL = 1e-4
HF_LOGITS_ATOL = 1e-4


def tolerance(dtype) -> dict:
    """The TOLERANCES entry for an array dtype, e.g. `np.testing.assert_allclose(a, b,
    **tolerance(x.dtype))`."""
    return TOLERANCES[np.dtype(dtype).type]
