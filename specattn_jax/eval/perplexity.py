"""Decode-time perplexity: the paper's protocol for scoring sparse verification.

For each window of text (i32[W] ground-truth tokens): prefill the first `prefix` tokens
densely, then step through the rest exactly as generation would, but teacher-forced:

  1. the draft re-reads the last two ground-truth tokens and drafts `gamma` tokens of its own
     (greedily), reporting its attention over the context;
  2. the selector turns that (or, for query-driven baselines, the verifier's own queries;
     for a selector that reads it, the verifier's attention in the last verify) into the
     verifier's attention plan;
  3. the verifier runs on the next `gamma + 1` ground-truth tokens with that plan, and their
     log-likelihoods are scored;
  4. both caches advance by the `gamma + 1` ground-truth tokens (the draft catches up on the
     ones it did not draft correctly).

Perplexity is exp(mean NLL) over every scored token; the KV reduction is measured from the
entries the attention actually read. With p = 1 (or a full budget) the numbers equal the
dense run's exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specattn_jax import sharding
from specattn_jax.acceptance import GreedyAcceptance
from specattn_jax.errors import SpecAttnError
from specattn_jax.model import Llama
from specattn_jax.progress import progress_bar
from specattn_jax.selection import (
    Selector,
    check_granularity,
    sparse_layer_flags,
)
from specattn_jax.speculative import (
    Pair,
    draft_and_plan,
    empty_attention_record,
    kv_reduction,
    verifier_layers,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityProtocol:
    """Attributes:
    window: tokens per scored window (the cache size).
    prefix: tokens prefilled densely before scoring starts.
    gamma: tokens drafted per step; each step scores gamma + 1 tokens.
    batch_size: windows evaluated together.
    """

    window: int = 2048
    prefix: int = 1024
    gamma: int = 4
    batch_size: int = 4

    def __post_init__(self):
        if not 3 <= self.prefix < self.window:
            raise SpecAttnError(
                f"prefix={self.prefix} must be at least 3 and below window={self.window}"
            )
        if self.gamma < 1:
            raise SpecAttnError(f"gamma={self.gamma} must be >= 1")
        if self.num_steps < 1:
            raise SpecAttnError(
                f"window - prefix = {self.window - self.prefix} leaves no room for one step "
                f"of gamma + 1 = {self.gamma + 1} tokens"
            )

    @property
    def num_steps(self) -> int:
        return (self.window - self.prefix) // (self.gamma + 1)

    @property
    def scored_tokens(self) -> int:
        """Tokens scored per window."""
        return self.num_steps * (self.gamma + 1)


def make_windows(
    tokenizer, texts: Sequence[str], window: int, num_windows: int | None = None
) -> np.ndarray:
    """i32[N, window] consecutive, non-overlapping token windows of the texts, each text
    tokenized whole (with BOS); taken round-robin over the texts so a few windows already
    span several books."""
    per_text = []
    for text in texts:
        ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
        count = len(ids) // window
        per_text.append(ids[: count * window].reshape(count, window))
    rows = []
    for index in range(max((len(w) for w in per_text), default=0)):
        rows.extend(w[index] for w in per_text if index < len(w))
    if not rows:
        raise SpecAttnError(f"no text is long enough for one window of {window} tokens")
    windows = np.stack(rows)
    return windows[:num_windows] if num_windows else windows


@functools.partial(jax.jit, static_argnames=("graphdefs", "protocol", "backend", "verifier_attend"))
def _score_windows(graphdefs, params, windows, selector, protocol, backend, verifier_attend):
    """(f32[B, scored] NLL, f32[steps, L] KV read, f32[steps] KV dense) of windows i32[B, W]."""
    draft = nnx.merge(graphdefs.draft, params.draft)
    verifier = nnx.merge(graphdefs.verifier, params.verifier)
    batch, size = windows.shape
    gamma, prefix = protocol.gamma, protocol.prefix
    rule = GreedyAcceptance()
    _, verifier_cache, _ = verifier(
        windows[:, : prefix - 1], verifier.init_cache(batch, size), attend=verifier_attend
    )
    _, draft_cache, _ = draft(windows[:, : prefix - 2], draft.init_cache(batch, size))
    rows = jnp.ones((batch,), jnp.int32)
    attention_layers = verifier_layers(selector)
    # The verifier's attention in the last verify, in the layers the selector reads.
    attention_record = empty_attention_record(selector, batch, size)

    def step(carry, index):
        draft_cache, verifier_cache, attention_record = carry
        ell = prefix + index * (gamma + 1)  # ground-truth tokens known; the last is pending
        last_two = jax.lax.dynamic_slice_in_dim(windows, ell - 2, 2, axis=1)
        drafts, verifier_cache, plan = draft_and_plan(
            draft, verifier.config, selector, Pair(draft_cache, verifier_cache), last_two,
            rows * ell, rule, jax.random.key(0), gamma, verifier_attention=attention_record,
        )  # fmt: skip
        draft_cache = drafts.cache
        tokens = jax.lax.dynamic_slice_in_dim(windows, ell - 1, gamma + 2, axis=1)
        logits, verifier_cache, info = verifier(
            tokens[:, :-1], verifier_cache, plan=plan, return_attention=attention_layers,
            backend=backend, attend=verifier_attend,
        )  # fmt: skip
        if attention_layers:  # every row's input is ground truth: all count
            attention_record = info.attention.mean(axis=2)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        if gamma > 1:  # the draft catches up on the ground truth it did not draft
            draft_cache = draft_cache.with_lengths(rows * ell)
            _, draft_cache, _ = draft(tokens[:, 1:gamma], draft_cache, last_logits_only=True)
        read = info.kv_read.sum(axis=1).astype(jnp.float32)
        dense = info.kv_dense.sum().astype(jnp.float32)
        return (draft_cache, verifier_cache, attention_record), (nll, read, dense)

    _, (nll, kv_read, kv_dense) = jax.lax.scan(
        step, (draft_cache, verifier_cache, attention_record), jnp.arange(protocol.num_steps)
    )
    return nll.transpose(1, 0, 2).reshape(batch, -1), kv_read, kv_dense


def decode_time_perplexity(
    draft: Llama,
    verifier: Llama,
    windows: np.ndarray,
    protocol: PerplexityProtocol,
    selector: Selector | None = None,
    *,
    backend: str = "auto",
    mesh: Mesh | None = None,
    progress: bool = False,
    label: str = "perplexity",
) -> dict:
    """Perplexity and measured KV reduction of `selector` (None: dense) on i32[N, W] windows.
    `label` names the progress bar.

    With a `mesh`, the verifier runs tensor-parallel over "model" (its attention per device
    on its own KV heads), the draft replicated, the windows of a batch split over "data".

    Returns a dict: perplexity, nll (mean), tokens (scored), windows, kv_reduction,
    kv_reduction_per_layer.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] != protocol.window:
        raise SpecAttnError(f"windows must be [N, {protocol.window}], got {windows.shape}")
    if draft.config.vocab_size != verifier.config.vocab_size:
        raise SpecAttnError("draft and verifier vocabularies differ")
    if selector is not None:
        check_granularity(selector.granularity, protocol.window)
    batch_size = protocol.batch_size
    if mesh is not None:
        draft, verifier = sharding.shard_pair(draft, verifier, mesh, batch_size)
    draft_graphdef, draft_params = nnx.split(draft)
    verifier_graphdef, verifier_params = nnx.split(verifier)
    graphdefs = Pair(draft_graphdef, verifier_graphdef)
    params = Pair(draft_params, verifier_params)
    num_layers = verifier.config.num_hidden_layers
    nll_sum, count = 0.0, 0
    read_total = np.zeros(num_layers)
    dense_total = 0.0
    batches = range(0, len(windows), batch_size)
    for start in progress_bar(batches, desc=label, disable=not progress):
        batch = windows[start : start + batch_size]
        if len(batch) < batch_size:  # pad with copies (one compile); the copies are not scored
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
        real = min(batch_size, len(windows) - start)
        nll, kv_read, kv_dense = _score_windows(
            graphdefs, params, jnp.asarray(batch), selector, protocol, backend,
            sharding.attention_for(mesh),
        )  # fmt: skip
        nll = np.asarray(nll, np.float64)[:real]
        nll_sum += float(nll.sum())
        count += nll.size
        scale = real / batch_size  # copies read what their original read
        read_total += np.asarray(kv_read, np.float64).sum(0) * scale
        dense_total += float(np.asarray(kv_dense, np.float64).sum()) * scale
    dense_layers = num_layers if selector is None else selector.dense_layers
    reduction, per_layer, _ = kv_reduction(
        read_total[None], np.array([dense_total]), sparse_layer_flags(num_layers, dense_layers)
    )
    mean_nll = nll_sum / count
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": count,
        "windows": len(windows),
        "kv_reduction": reduction,
        "kv_reduction_per_layer": per_layer,
    }
