"""Every selection method by name, built the same way for the CLI, the sweep and notebooks.

`value` is the method's one knob: SpecAttn's and the oracle's attention mass p (for
"specattn_history", both the draft's and the verifier's last attention's), or the baselines'
budget (fraction of the context read). Calibrations (the layer map, Double
Sparsity's channels) come from calibration token sequences, never from the evaluated text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import LayerMap, calibrate
from specattn_jax.model import Llama
from specattn_jax.selection import Selector, SpecAttnSelector
from specattn_jax.selection.baselines import (
    DoubleSparsity,
    OracleTopP,
    Quest,
    StreamingLLM,
)


def calibrate_double_sparsity(
    verifier: Llama, sequences: Iterable[np.ndarray], num_channels: int | None = None
) -> jax.Array:
    """i32[L, H_kv, r]: per layer and KV head, the r channels with the largest mean |q_c k_c|
    over the calibration tokens (and the query heads of the group). r defaults to D / 16."""
    sequences = [np.asarray(s, np.int32) for s in sequences]
    if not sequences:
        raise SpecAttnError("Double Sparsity needs calibration sequences to pick its channels")
    config = verifier.config
    num_channels = num_channels or max(config.head_dim // 16, 1)
    graphdef, state = nnx.split(verifier)

    @jax.jit
    def channel_importance(state, tokens):  # i32[1, T] -> f32[L, H_kv, D]
        model = nnx.merge(graphdef, state)
        _, cache, info = model(tokens, model.init_cache(1, tokens.shape[1]), return_queries=True)
        queries = info.queries[:, 0]  # [L, T, H, D]
        layers, num_tokens, num_heads, head_dim = queries.shape
        grouped = queries.reshape(layers, num_tokens, config.num_key_value_heads, -1, head_dim)
        keys = jnp.stack([k[0, :num_tokens] for k in cache.k])  # [L, T, H_kv, D]
        return jnp.abs(grouped * keys[:, :, :, None]).astype(jnp.float32).mean(axis=(1, 3))

    total = sum(np.asarray(channel_importance(state, s[None])) for s in sequences)
    return jnp.asarray(np.argsort(-total, axis=-1, kind="stable")[..., :num_channels], jnp.int32)


METHODS = (
    "dense",
    "specattn",
    "specattn_recent",
    "specattn_history",
    "oracle",
    "quest",
    "double_sparsity",
    "streaming_llm",
)
BUDGET_METHODS = ("quest", "double_sparsity", "streaming_llm")
# The methods guided by the draft's attention (through the layer map).
DRAFT_METHODS = ("specattn", "specattn_recent", "specattn_history")
# SpecAttn + always reading 4 sink tokens and the most recent 256 context tokens.
RECENT_SINKS, RECENT_WINDOW = 4, 256


@dataclasses.dataclass
class MethodFactory:
    """Builds selectors for one draft/verifier pair, calibrating what a method needs once.

    Attributes:
      draft, verifier: the models.
      calibration: token sequences for the layer map and Double Sparsity's channels.
      layer_map: a calibrated map (calibrated on `calibration` when None).
      granularity: tokens per block for SpecAttn, the oracle and StreamingLLM (Quest reads
        pages of 16; Double Sparsity reads tokens).
      dense_layers: leading verifier layers every method leaves dense.
      recent_window: context tokens "specattn_recent" always reads (besides its sinks).
      backend: kernel backend for the top-p search.
      progress: show a progress bar while calibrating.
    """

    draft: Llama
    verifier: Llama
    calibration: Sequence[np.ndarray]
    layer_map: LayerMap | None = None
    granularity: int = 1
    dense_layers: int = 2
    recent_window: int = RECENT_WINDOW
    backend: str = "auto"
    progress: bool = False
    _channels: object = None

    def get_layer_map(self) -> LayerMap:
        if self.layer_map is None:
            self.layer_map = calibrate(
                self.draft, self.verifier, self.calibration, progress=self.progress
            )
        self.layer_map.check_fits(self.draft, self.verifier)
        return self.layer_map

    def selector(self, method: str, value: float | None = None) -> Selector | None:
        """The selector of `method` at `value` (p or budget); None for "dense"."""
        if method not in METHODS:
            raise SpecAttnError(f"method {method!r} is not one of {METHODS}")
        if method == "dense":
            return None
        knob = "budget" if method in BUDGET_METHODS else "attn_p"
        if value is None or not 0 < value <= 1:
            raise SpecAttnError(f"{method} needs {knob} in (0, 1], got {value}")
        value = jnp.float32(value)
        common = dict(dense_layers=self.dense_layers)
        if method in DRAFT_METHODS:
            recent = method == "specattn_recent"
            return SpecAttnSelector(
                attn_p=value,
                mapping=self.get_layer_map().mapping,
                mix=self.get_layer_map().mix,
                granularity=self.granularity,
                sinks=RECENT_SINKS if recent else 0,
                recent=self.recent_window if recent else 0,
                backend=self.backend,
                history_p=value if method == "specattn_history" else None,
                **common,
            )
        if method == "oracle":
            return OracleTopP(
                attn_p=value, granularity=self.granularity, backend=self.backend, **common
            )
        if method == "quest":
            return Quest(budget=value, **common)
        if method == "streaming_llm":
            return StreamingLLM(budget=value, granularity=self.granularity, **common)
        if self._channels is None:
            self._channels = calibrate_double_sparsity(self.verifier, self.calibration)
        return DoubleSparsity(budget=value, channels=self._channels, **common)
