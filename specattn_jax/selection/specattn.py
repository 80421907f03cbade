"""SpecAttn's selector: the draft's attention, mapped layer to layer, picks the KV entries.

For every verifier layer j past the first `dense_layers`, the draft layer f(j) of the layer
map supplies its head-mean attention rows of the gamma drafting queries; each row keeps its
top-p set (the smallest set with at least `attn_p` of the row's context mass, found by the
sorting-free threshold search), and the block list is the union over the gamma rows (the
paper's rule; `aggregate="mean"` averages the rows first and selects once).

Beyond the paper, `history_p` adds the verifier's own view: in each sparse layer, the top-p
set (mass `history_p`) of that layer's attention in the previous verify forward, over what it
read then, joins the draft's set. Attention moves slowly from one step to the next, and the
verifier's rows rank the context as the verifier does, which the draft's only approximate.

With a layer mix (`LayerMap.mix`, calibrated by `choose="mix"`), each sparse verifier layer
selects from its own weighted mix of the draft layers' rows instead of one draft layer's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from specattn_jax.attention import AttentionPlan
from specattn_jax.errors import SpecAttnError
from specattn_jax.selection.base import SelectionInputs, sparse_layer_flags
from specattn_jax.selection.blocks import add_forced_blocks, blocks_to_mask, forced_blocks

AGGREGATES = ("union", "mean")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecAttnSelector:
    """Attributes:
    attn_p: f32[] attention mass to keep per row, in (0, 1] (an array: no recompiles).
    mapping: verifier layer -> draft layer (static).
    granularity: tokens per block read (static).
    dense_layers: leading verifier layers that stay dense (static).
    aggregate: "union" of per-query selections, or "mean" of the rows then one (static).
    sinks: leading positions always read (static).
    recent: most recent context positions always read (static).
    backend: "auto", "pallas" or "reference" for the top-p kernel (static).
    history_p: f32[] mass of the verifier's previous attention kept per sparse layer, in
      (0, 1]; None reads none of it (the paper's SpecAttn).
    mix: L_v x L_d weights: sparse verifier layer j selects from the mix of the draft
      layers' rows (static); None selects from draft layer mapping[j]'s.
    """

    attn_p: jax.Array
    mapping: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    granularity: int = dataclasses.field(default=1, metadata=dict(static=True))
    dense_layers: int = dataclasses.field(default=2, metadata=dict(static=True))
    aggregate: str = dataclasses.field(default="union", metadata=dict(static=True))
    sinks: int = dataclasses.field(default=0, metadata=dict(static=True))
    recent: int = dataclasses.field(default=0, metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))
    history_p: jax.Array | None = None
    mix: tuple[tuple[float, ...], ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )

    @property
    def verifier_layers(self) -> tuple[int, ...]:
        """The sparse verifier layers, when the previous verify's attention is read."""
        if self.history_p is None:
            return ()
        sparse_layers = sparse_layer_flags(len(self.mapping), self.dense_layers)
        return tuple(layer for layer, sparse in enumerate(sparse_layers) if sparse)

    @property
    def draft_layers(self) -> tuple[int, ...]:
        """The draft layers the layer map assigns to a sparse verifier layer (with a mix,
        those it weighs in some sparse layer)."""
        sparse_layers = sparse_layer_flags(len(self.mapping), self.dense_layers)
        if self.mix is not None:
            rows = [row for row, sparse in zip(self.mix, sparse_layers, strict=True) if sparse]
            return tuple(i for i in range(len(self.mix[0])) if any(row[i] for row in rows))
        pairs = zip(self.mapping, sparse_layers, strict=True)
        return tuple(sorted({draft_layer for draft_layer, sparse in pairs if sparse}))

    def plan(self, inputs: SelectionInputs) -> AttentionPlan | None:
        sparse_layers = sparse_layer_flags(len(self.mapping), self.dense_layers)
        if not any(sparse_layers):
            return None
        weights, group_of_layer = self._guides(inputs.draft_attention, sparse_layers)
        if self.aggregate == "mean":
            weights = weights.mean(axis=2, keepdims=True)
        block_indices, block_counts = self._top_p_blocks(weights, self.attn_p, inputs)
        if self.sinks or self.recent:
            forced = forced_blocks(
                inputs.context_lengths,
                block_indices.shape[-1],
                self.granularity,
                sinks=self.sinks,
                recent=self.recent,
            )[:, None]  # [B, 1, N]
            block_indices, block_counts = add_forced_blocks(block_indices, block_counts, forced)
        block_indices = block_indices[:, group_of_layer]  # [B, L, N]
        block_counts = block_counts[:, group_of_layer]  # [B, L]
        if self.history_p is not None:
            history = self._history_blocks(inputs, block_indices.shape[-1])
            block_indices, block_counts = add_forced_blocks(block_indices, block_counts, history)
        return AttentionPlan(
            block_indices=block_indices.transpose(1, 0, 2),  # [L, B, N]
            block_counts=block_counts.T,  # [L, B]
            granularity=self.granularity,
            sparse_layers=sparse_layers,
        )

    def _guides(
        self, draft_attention: jax.Array, sparse_layers: tuple[bool, ...]
    ) -> tuple[jax.Array, jax.Array]:
        """The rows each group of verifier layers selects from, f32[B, R, A, S], and each
        verifier layer's group, i32[L] (0 for dense layers): one group per draft layer used,
        or with a mix one per sparse layer, holding its mix of the draft layers' rows.
        draft_attention: f32[A, U, B, S], the rows of the draft layers `draft_layers`."""
        used = self.draft_layers
        rows = draft_attention.transpose(2, 1, 0, 3)  # [B, U, A, S]
        if self.mix is None:
            return rows, jnp.array([used.index(f) if f in used else 0 for f in self.mapping])
        sparse = [layer for layer, is_sparse in enumerate(sparse_layers) if is_sparse]
        weights = jnp.asarray(np.asarray(self.mix)[np.ix_(sparse, used)], rows.dtype)  # [R, U]
        group = [sparse.index(layer) if layer in sparse else 0 for layer in range(len(self.mix))]
        return jnp.einsum("ru,buas->bras", weights, rows), jnp.array(group)

    def _top_p_blocks(
        self, weights: jax.Array, p: jax.Array, inputs: SelectionInputs
    ) -> tuple[jax.Array, jax.Array]:
        """The block list (i32[B, R, N], i32[B, R]) of the top-p union over the A rows of each
        of R groups of weights f32[B, R, A, S]."""
        batch, groups, num_rows, size = weights.shape
        _, block_indices, block_counts = pallas_kernels.top_p_select_dispatch(
            weights.reshape(batch * groups, num_rows, size),
            jnp.broadcast_to(jnp.asarray(p, jnp.float32), (batch * groups,)),
            jnp.repeat(inputs.context_lengths, groups),
            granularity=self.granularity,
            backend=self.backend,
        )
        return block_indices.reshape(batch, groups, -1), block_counts.reshape(batch, groups)

    def _history_blocks(self, inputs: SelectionInputs, num: int) -> jax.Array:
        """bool[B, L, N]: per verifier layer, the top-p blocks (mass `history_p`) of its
        previous attention; none in dense layers, or before the first verify."""
        history = inputs.verifier_attention.transpose(1, 0, 2)  # [B, V, S]
        block_indices, block_counts = self._top_p_blocks(
            history[:, :, None], self.history_p, inputs
        )
        block_counts = jnp.where(history.sum(-1) > 0, block_counts, 0)
        selected = blocks_to_mask(block_indices, block_counts, num)  # [B, V, N]
        batch, num_layers = selected.shape[0], len(self.mapping)
        per_layer = jnp.zeros((batch, num_layers, num), bool)
        return per_layer.at[:, jnp.array(self.verifier_layers)].set(selected)


def check_granularity(granularity: int, cache_size: int) -> None:
    """Raises unless `granularity` is a supported block size dividing the cache size."""
    if granularity not in pallas_kernels.GRANULARITIES:
        supported = ", ".join(map(str, pallas_kernels.GRANULARITIES))
        raise SpecAttnError(f"granularity={granularity} must be one of {supported}")
    if cache_size % granularity:
        raise SpecAttnError(
            f"granularity={granularity} does not divide the cache size {cache_size}; "
            f"use a cache size that is a multiple of it"
        )
