"""An independent float64 numpy Llama and SpecAttn, for the tests' references.

Nothing here runs the library's forward, cache, plans, selectors or kernels: the weights are
read off a `Llama` once, and every step is written out plainly. Attention takes explicit
boolean masks over cache positions, one per layer, so a sparse verify is "these positions,
in this layer" and nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specattn_jax.convert._params import params_of


def _f64(array) -> np.ndarray:
    return np.asarray(array, np.float64)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


@dataclasses.dataclass
class SequenceCache:
    """Keys and values of one sequence: per layer [S, H_kv, D], `length` of them valid."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    length: int = 0


@dataclasses.dataclass
class ForwardResult:
    logits: np.ndarray  # [T, V]
    attention: np.ndarray  # [L, T, S] head-mean attention probabilities
    reads: np.ndarray  # i[L] positions some query of the layer attended


class ReferenceLlama:
    """A Llama (RMSNorm, rotate-half RoPE without scaling, GQA, SwiGLU) in numpy float64."""

    def __init__(self, model):
        config = model.config
        if config.rope_scaling is not None or config.attention_bias or config.mlp_bias:
            raise NotImplementedError("the reference covers plain Llamas only")
        self.config = config
        # The HF-shaped parameters (q, k, v, gate and up apart), not the model's fused arrays.
        params = {path: _f64(value) for path, value in params_of(model).items()}
        self.embed = params[("embed_tokens",)]
        self.head = self.embed.T if config.tie_word_embeddings else params[("lm_head",)]
        self.final_norm = params[("norm", "weight")]
        names = dict(
            attn_norm=("input_layernorm", "weight"),
            q=("self_attn", "q_proj"),  # [E, H, D]
            k=("self_attn", "k_proj"),  # [E, H_kv, D]
            v=("self_attn", "v_proj"),
            o=("self_attn", "o_proj"),  # [H, D, E]
            mlp_norm=("post_attention_layernorm", "weight"),
            gate=("mlp", "gate_proj"),  # [E, F]
            up=("mlp", "up_proj"),
            down=("mlp", "down_proj"),  # [F, E]
        )
        self.layers = [
            {name: params[("layers", i, *path)] for name, path in names.items()}
            for i in range(config.num_hidden_layers)
        ]
        dim = config.head_dim
        self.inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2) / dim)

    def new_cache(self, size: int) -> SequenceCache:
        shape = (size, self.config.num_key_value_heads, self.config.head_dim)
        return SequenceCache(
            k=[np.zeros(shape) for _ in self.layers], v=[np.zeros(shape) for _ in self.layers]
        )

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:  # [T, N, D]
        angles = positions[:, None] * self.inv_freq[None, :]
        cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
        sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def causal_masks(self, start: int, num_new: int, size: int) -> list[np.ndarray]:
        """Dense causal masks for every layer: query t sees positions <= start + t."""
        mask = np.arange(size)[None, :] <= start + np.arange(num_new)[:, None]
        return [mask] * len(self.layers)

    def forward(
        self, tokens, cache: SequenceCache, masks: list[np.ndarray] | None = None
    ) -> ForwardResult:
        """Appends `tokens` (T) to `cache` and runs them; `masks[l]` bool[T, S] says which
        positions query t of layer l reads (default: causal). Positions it reads must hold
        keys written by this or an earlier forward."""
        tokens = np.asarray(tokens)
        start, num_new = cache.length, len(tokens)
        size = cache.k[0].shape[0]
        masks = masks or self.causal_masks(start, num_new, size)
        positions = np.arange(start, start + num_new, dtype=np.float64)
        config = self.config
        group = config.num_attention_heads // config.num_key_value_heads
        x = self.embed[tokens]
        attention, reads = [], []
        for layer, cache_k, cache_v, mask in zip(self.layers, cache.k, cache.v, masks, strict=True):
            h = _rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
            q = self._rope(np.einsum("te,ehd->thd", h, layer["q"]), positions)
            cache_k[start : start + num_new] = self._rope(
                np.einsum("te,ehd->thd", h, layer["k"]), positions
            )
            cache_v[start : start + num_new] = np.einsum("te,ehd->thd", h, layer["v"])
            keys = np.repeat(cache_k, group, axis=1)  # [S, H, D]
            values = np.repeat(cache_v, group, axis=1)
            scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(config.head_dim)
            scores = np.where(mask[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            x = x + np.einsum("thd,hde->te", np.einsum("hts,shd->thd", probs, values), layer["o"])
            h = _rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
            x = x + (_silu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]
            attention.append(probs.mean(0))
            reads.append(int(mask.any(0).sum()))
        cache.length = start + num_new
        logits = _rms_norm(x, self.final_norm, config.rms_norm_eps) @ self.head
        return ForwardResult(logits, np.stack(attention), np.array(reads))


def top_p_positions(weights: np.ndarray, p: float, context: int) -> np.ndarray:
    """bool[S]: the fewest largest weights among the first `context` whose mass reaches `p`
    of theirs, with every weight tied to the smallest kept one (by sorting; f32 weights)."""
    weights = np.asarray(weights, np.float32)
    keep = np.zeros(weights.shape, bool)
    if context == 0:
        return keep
    if p >= 1:
        keep[:context] = True
        return keep
    valid = weights[:context]
    ordered = np.sort(valid)[::-1].astype(np.float64)
    mass = np.cumsum(ordered)
    threshold = ordered[np.argmax(mass >= p * mass[-1])]
    keep[:context] = valid >= threshold
    return keep


def block_positions(selected: np.ndarray, context: int, granularity: int) -> np.ndarray:
    """bool[S]: every context position of a block holding a selected position."""
    blocks = np.unique(np.flatnonzero(selected) // granularity)
    positions = np.arange(selected.shape[0])
    return np.isin(positions // granularity, blocks) & (positions < context)


@dataclasses.dataclass
class SpecAttnRun:
    tokens: list[int]
    verifier_reads: np.ndarray  # i[L_v] positions each verifier layer read, over the steps
    draft_reads: int  # positions the draft's layers read while drafting, over the steps
    steps: int  # speculative steps (prefill excluded)
    accepted: int  # drafted tokens the verifier kept, over the steps


def specattn_greedy(
    draft: ReferenceLlama,
    verifier: ReferenceLlama,
    prompt: list[int],
    *,
    mapping: tuple[int, ...],
    attn_p: float,
    granularity: int,
    dense_layers: int,
    gamma: int,
    max_new_tokens: int,
    cache_size: int,
    history_p: float | None = None,
    mix: np.ndarray | None = None,
) -> SpecAttnRun:
    """Greedy SpecAttn for one sequence, step by step.

    Each step re-prefills the draft from scratch, drafts `gamma` tokens and keeps its
    attention rows; every sparse verifier layer j reads the context positions of the blocks
    holding the union of the top-p sets of draft layer mapping[j]'s rows (with a `mix`
    [L_v, L_d], of the rows sum_i mix[j, i] * (draft layer i's rows); with `history_p`,
    and the top-p set of layer j's attention in the last verify, averaged over the rows
    whose tokens were accepted), plus the new tokens causally; greedy acceptance; the
    verifier's cache is cut back to the accepted tokens (its entries are those of the
    forward that fed each token)."""
    verifier_cache = verifier.new_cache(cache_size)
    history = None  # [L_v, S] the last verify's attention
    sequence = list(prompt) + [int(np.argmax(verifier.forward(prompt, verifier_cache).logits[-1]))]
    verifier_reads = np.zeros(len(verifier.layers), np.int64)
    draft_reads = steps = total_accepted = 0
    while len(sequence) - len(prompt) < max_new_tokens:
        context = len(sequence) - 1  # the verifier's cache holds all but the pending token
        draft_cache = draft.new_cache(cache_size)
        draft.forward(sequence[:-2], draft_cache)
        result = draft.forward(sequence[-2:], draft_cache)
        rows, drafted = [result.attention[:, 1]], [int(np.argmax(result.logits[1]))]
        draft_reads += result.reads.sum()
        while len(drafted) < gamma:
            result = draft.forward(drafted[-1:], draft_cache)
            rows.append(result.attention[:, 0])
            drafted.append(int(np.argmax(result.logits[0])))
            draft_reads += result.reads.sum()
        rows = np.stack(rows)  # [gamma, L_d, S]
        masks = verifier.causal_masks(context, gamma + 1, cache_size)
        for layer in range(dense_layers, len(verifier.layers)):
            guides = (
                rows[:, mapping[layer]] if mix is None else rows.transpose(0, 2, 1) @ mix[layer]
            )
            union = np.any([top_p_positions(row, attn_p, context) for row in guides], 0)
            if history_p is not None and history is not None:
                union |= top_p_positions(history[layer], history_p, context)
            selected = block_positions(union, context, granularity)
            masks[layer] = selected[None, :] | (masks[layer] & (np.arange(cache_size) >= context))
        verifier_cache.length = context
        result = verifier.forward([sequence[-1], *drafted], verifier_cache, masks)
        verifier_reads += result.reads
        greedy = np.argmax(result.logits, axis=-1)
        accepted = 0
        while accepted < gamma and drafted[accepted] == greedy[accepted]:
            accepted += 1
        history = result.attention[:, : accepted + 1].mean(axis=1)
        sequence += drafted[:accepted] + [int(greedy[accepted])]
        steps, total_accepted = steps + 1, total_accepted + accepted
    return SpecAttnRun(
        sequence[len(prompt) : len(prompt) + max_new_tokens], verifier_reads, int(draft_reads),
        steps, total_accepted,
    )  # fmt: skip
