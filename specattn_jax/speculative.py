"""Speculative decoding as one pure, jit-compiled step: `spec_step(state) -> state`.

Each step, for every sequence of the batch:
  1. the draft proposes `gamma` tokens (a `lax.scan` of one-token draft forwards, its KV
     cache updated in place), reporting its attention over the context as it goes;
  2. the verifier runs once on the `gamma + 1` new positions (the pending token and the
     drafts), attending densely or as the selector's plan says (SpecAttn);
  3. the acceptance rule keeps a prefix of the drafts and supplies the next token;
  4. both caches roll back to the accepted length (setting `lengths`).

SpecAttn is the selector of `SpecConfig(attn_p=...)`: the draft's attention of step 1
picks, through the layer map, the KV blocks each sparse verifier layer reads in step 2.
Baselines plug in as other selectors (`SpecConfig(selector=...)`).

Without a draft the same step is autoregressive decoding: no drafts (gamma = 0), one
verifier forward on the pending token, and the acceptance rule picks the next token from it.
One `while_loop` driver (`_generate`), one streaming iterator (`generate_stream`) and one
statistics builder (`spec_stats`) serve both.

Positions: a sequence of `seq_len` tokens (prompt + generated) has its last token *pending*:
in neither cache yet. At a step's start the verifier cache holds `seq_len - 1` entries and
the draft cache `seq_len - 2`; the draft's first forward re-feeds the two last tokens, which
rewrites one entry with identical values when the previous step rejected a draft, and fills
the missing one when it accepted them all. So every step has the same shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specattn_jax import sharding
from specattn_jax.acceptance import AcceptanceRule, acceptance_for
from specattn_jax.attention import Attend, AttentionPlan, attend
from specattn_jax.cache import KVCache
from specattn_jax.config import LlamaConfig, stop_token_ids
from specattn_jax.decoding import (
    DecodeProgress,
    GenerationResult,
    check_fits_cache,
    pad_prompts,
    run_to_completion,
    stream,
)
from specattn_jax.errors import IncompatibleModelsError, SpecAttnError
from specattn_jax.layer_map import LayerMap, calibrate
from specattn_jax.model import Llama
from specattn_jax.sampling import Greedy, Sampler, mark_seen, seen_before_each
from specattn_jax.selection import (
    SelectionInputs,
    Selector,
    SpecAttnSelector,
    check_granularity,
    sparse_layer_flags,
)
from specattn_jax.selection.specattn import AGGREGATES
from specattn_jax.stopping import (
    StopSequences,
    check_stop_strings,
    cut_at_stop,
    stop_index,
    stop_token_sequences,
)

# A layer map calibrated on the prompts uses at most this many leading tokens of each:
# calibration holds every layer's attention over its tokens, f32[L, T, T].
CALIBRATION_TOKENS = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecConfig:
    """Settings of speculative decoding and of SpecAttn's sparse verification.

    Attributes:
      gamma: tokens drafted per step (>= 1).
      attn_p: SpecAttn's attention mass kept per row, in (0, 1]; None verifies densely.
        (Not nucleus sampling's `top_p`, which belongs to the sampler.)
      granularity: tokens per KV block read: 1, 16, 32 or 64; must divide the cache size.
      dense_layers: leading verifier layers that always read densely.
      aggregate: "union" of the gamma per-query selections (the paper's rule) or "mean" of
        the gamma attention rows, then one selection.
      sinks: leading positions every sparse layer reads.
      recent: most recent context positions every sparse layer reads.
      history_p: beyond the paper, each sparse layer also reads the top-p set (this mass) of
        its own attention in the last verify (`SpecAttnSelector.history_p`); None: not.
      layer_map: the calibrated verifier -> draft layer map; None calibrates on the prompts
        (their first `CALIBRATION_TOKENS` tokens each).
      selector: another selection method (a baseline); overrides attn_p.
      backend: "auto" (Pallas kernels on GPU, references elsewhere), "pallas", "reference".
    """

    gamma: int = 4
    attn_p: float | None = None
    granularity: int = 1
    dense_layers: int = 2
    aggregate: str = "union"
    sinks: int = 0
    recent: int = 0
    history_p: float | None = None
    layer_map: LayerMap | None = None
    selector: Selector | None = None
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.gamma, int) or self.gamma < 1:
            raise SpecAttnError(f"gamma={self.gamma} must be an integer >= 1")
        for name in ("attn_p", "history_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise SpecAttnError(f"{name}={value} must be in (0, 1]")
        if self.history_p is not None and self.attn_p is None:
            raise SpecAttnError("history_p adds to SpecAttn's selection: set attn_p too")
        if self.aggregate not in AGGREGATES:
            raise SpecAttnError(f"aggregate={self.aggregate!r} must be one of {AGGREGATES}")
        if min(self.dense_layers, self.sinks, self.recent) < 0:
            raise SpecAttnError(
                f"dense_layers={self.dense_layers}, sinks={self.sinks} and "
                f"recent={self.recent} must be >= 0"
            )
        if self.backend not in ("auto", "pallas", "reference"):
            raise SpecAttnError(f"backend={self.backend!r} must be auto, pallas or reference")

    @property
    def sparse(self) -> bool:
        return self.selector is not None or self.attn_p is not None

    def build_selector(
        self, draft: Llama, verifier: Llama, calibration_prompts: Sequence[Sequence[int]]
    ) -> tuple[Selector | None, str]:
        """The selector of this config for a model pair, and where its layer map came from.

        Validates the layer map against the models (and calibrates one on the prompts when
        none is given).
        """
        if self.selector is not None:
            return self.selector, "baseline selector"
        if self.attn_p is None:
            return None, "dense"
        num_layers = verifier.config.num_hidden_layers
        if self.dense_layers > num_layers:
            raise SpecAttnError(
                f"dense_layers={self.dense_layers} exceeds the verifier's {num_layers} layers"
            )
        layer_map, origin = self.layer_map, "given"
        if layer_map is None:
            usable = [p[:CALIBRATION_TOKENS] for p in calibration_prompts if len(p) >= 2]
            if not usable:
                raise SpecAttnError(
                    "no layer map given and no prompt of 2+ tokens to calibrate one on"
                )
            layer_map = calibrate(draft, verifier, usable, source="prompts")
            origin = "calibrated on the prompts"
        layer_map.check_fits(draft, verifier)
        selector = SpecAttnSelector(
            attn_p=jnp.float32(self.attn_p),
            mapping=layer_map.mapping,
            mix=layer_map.mix,
            granularity=self.granularity,
            dense_layers=self.dense_layers,
            aggregate=self.aggregate,
            sinks=self.sinks,
            recent=self.recent,
            backend=self.backend,
            history_p=None if self.history_p is None else jnp.float32(self.history_p),
        )
        return selector, origin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pair:
    """A (draft, verifier) pair of anything: parameters, caches. `draft` is None when
    decoding autoregressively."""

    draft: Any
    verifier: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """Everything a decoding step reads and writes.

    Attributes:
      progress: generated tokens, budgets, done flags.
      caches: the draft's (None without a draft) and the verifier's KV caches.
      seq_lengths: i32[B] prompt + generated tokens; the last one is pending.
      last_two: i32[B, 2] the tokens at positions seq_len - 2 and seq_len - 1.
      key: PRNG key; the prefill uses `fold_in(key, 0)`, step `i` `fold_in(key, i + 1)`.
      step: i32[] steps taken.
      accepted: i32[B] draft tokens kept.
      kv_log: f32[N_steps, L_v + 2, B] per step and sequence (zero while it is done): the
        cache positions each verifier layer's attention read, the positions a dense layer
        would have read, and the positions the draft's attention read over its layers and
        forwards. One buffer, so a step logs with one update; kept per sequence, so a batch
        split over devices logs without communication. `kv_read`, `kv_dense` and
        `draft_kv_read` are its sums over the sequences; `active_steps` counts the steps
        that logged a row (a dense layer reads at least the new token, so never zero).
      seen: bool[B, V] the tokens each sequence holds (prompt and generated, the pending one
        included), for the sampler's repetition penalty; None without one.
      verifier_attention: f32[V, B, S] the last verify's attention in the selector's
        `verifier_layers` (`SelectionInputs.verifier_attention`); None when it reads none.
    """

    progress: DecodeProgress
    caches: Pair
    seq_lengths: jax.Array  # i32[B]
    last_two: jax.Array  # i32[B, 2]
    key: jax.Array
    step: jax.Array  # i32[]
    accepted: jax.Array  # i32[B]
    kv_log: jax.Array  # f32[N_steps, L_v + 2, B]
    seen: jax.Array | None = None  # bool[B, V]
    verifier_attention: jax.Array | None = None  # f32[V, B, S]

    @property
    def kv_read(self) -> jax.Array:  # f32[N_steps, L_v]
        return self.kv_log[:, :-2].sum(-1)

    @property
    def kv_dense(self) -> jax.Array:  # f32[N_steps]
        return self.kv_log[:, -2].sum(-1)

    @property
    def draft_kv_read(self) -> jax.Array:  # f32[N_steps]
        return self.kv_log[:, -1].sum(-1)

    @property
    def active_steps(self) -> jax.Array:  # i32[B] steps taken while the sequence was active
        return jnp.sum(self.kv_log[:, -2] > 0, axis=0, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The static half of a decoder: hashable, a static argument of the jitted loop.

    Attributes:
      draft: the draft's graph definition, or None (autoregressive decoding).
      verifier: the verifier's graph definition.
      gamma: tokens drafted per step (0 without a draft).
      stop_sequences: token sequences that end a sequence: each EOS id alone, and the stop
        strings the tokenizer encodes exactly (`stopping.stop_token_sequences`).
      backend: "auto", "pallas" or "reference" for the kernels.
      verifier_attend: the verifier's attention function (`sharding.attention_for(mesh)`).
      prefill_chunk: prompt tokens per prefill forward (None: the whole prompt at once).
    """

    draft: nnx.GraphDef | None
    verifier: nnx.GraphDef
    gamma: int
    stop_sequences: StopSequences
    backend: str
    verifier_attend: Attend = attend
    prefill_chunk: int | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Drafts:
    """What the draft proposes in one speculative step.

    Attributes:
      tokens: i32[B, gamma] drafted tokens.
      logits: f32[B, gamma, V] the draft's logits that produced them (repetition penalty
        applied).
      attention: f32[gamma, U, B, S] the head-mean attention of each drafting query over the
        cache in the U draft layers asked for, or None when none were.
      cache: the draft's cache, lengths advanced by gamma + 1 (None without a draft).
      kv_read: i32[B] cache positions the draft's attention read, over its layers and
        forwards.
    """

    tokens: jax.Array
    logits: jax.Array
    attention: jax.Array | None
    cache: KVCache | None
    kv_read: jax.Array

    @classmethod
    def none(cls, batch: int, vocab_size: int) -> Drafts:
        """No drafts (autoregressive decoding): the verifier alone picks the next token."""
        return cls(
            tokens=jnp.zeros((batch, 0), jnp.int32),
            logits=jnp.zeros((batch, 0, vocab_size), jnp.float32),
            attention=None,
            cache=None,
            kv_read=jnp.zeros((batch,), jnp.int32),
        )


def draft_tokens(
    draft: Llama,
    cache: KVCache,
    last_two: jax.Array,  # i32[B, 2]
    rule: AcceptanceRule,
    key: jax.Array,
    gamma: int,
    attention_layers: tuple[int, ...] = (),
    seen: jax.Array | None = None,  # bool[B, V]
) -> Drafts:
    """Proposes `gamma` tokens per sequence.

    `cache.lengths` must be the position of `last_two[:, 0]`. The first forward feeds both
    tokens (T = 2), the next gamma - 1 one drafted token each; the attention rows are those
    of the gamma queries that produced a draft, in the draft layers `attention_layers` (only
    those compute them). With a repetition penalty, `seen` holds the tokens of each sequence
    so far; each draft is drawn from logits penalized for them and the drafts before it.
    """
    penalize = rule.sampler.penalize
    logits, cache, info = draft(last_two, cache, return_attention=attention_layers)
    first_logits = penalize(logits[:, 1], seen)
    first = rule.sample(first_logits, jax.random.fold_in(key, 0))

    def one_token(carry, index):
        token, cache, seen = carry
        logits, cache, info = draft(token[:, None], cache, return_attention=attention_layers)
        logits = penalize(logits[:, 0], seen)
        next_token = rule.sample(logits, jax.random.fold_in(key, index))
        attention = info.attention[:, :, 0] if attention_layers else None
        carry = (next_token, cache, mark_seen(seen, next_token))
        return carry, (token, logits, attention, info.kv_read.sum(0))

    (last, cache, _), (tokens, step_logits, step_attention, step_reads) = jax.lax.scan(
        one_token, (first, cache, mark_seen(seen, first)), jnp.arange(1, gamma)
    )
    # scan collected the inputs of steps 1..gamma-1: d_1..d_{gamma-1}; d_gamma is `last`.
    tokens = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    all_logits = jnp.concatenate([first_logits[:, None], step_logits.transpose(1, 0, 2)], axis=1)
    all_attention = None
    if attention_layers:
        all_attention = jnp.concatenate([info.attention[None, :, :, 1], step_attention], axis=0)
    kv_read = info.kv_read.sum(0) + step_reads.sum(0)
    return Drafts(tokens, all_logits, all_attention, cache, kv_read)


def draft_and_plan(
    draft: Llama | None,
    verifier_config: LlamaConfig,
    selector: Selector | None,
    caches: Pair,
    last_two: jax.Array,  # i32[B, 2]
    seq_lengths: jax.Array,  # i32[B]
    rule: AcceptanceRule,
    key: jax.Array,
    gamma: int,
    seen: jax.Array | None = None,  # bool[B, V]
    verifier_attention: jax.Array | None = None,  # f32[V, B, S]
) -> tuple[Drafts, KVCache, AttentionPlan | None]:
    """The first half of a step for sequences of `seq_lengths` tokens whose last two are
    `last_two` (the last one pending), holding the tokens `seen` (for a repetition penalty):
    the drafts (none without a draft), the verifier's cache rolled back to the context
    before the pending token, and the selector's plan for the verify (None: dense), made
    from the drafts' attention and the last verify's `verifier_attention`."""
    verifier_cache = caches.verifier.with_lengths(seq_lengths - 1)
    if draft is None:
        return Drafts.none(len(seq_lengths), verifier_config.vocab_size), verifier_cache, None
    with jax.named_scope("draft"):
        draft_cache = caches.draft.with_lengths(seq_lengths - 2)
        layers = () if selector is None else selector.draft_layers
        drafts = draft_tokens(draft, draft_cache, last_two, rule, key, gamma, layers, seen)
    if selector is None:
        return drafts, verifier_cache, None
    with jax.named_scope("select"):
        plan = selector.plan(
            SelectionInputs(
                context_lengths=verifier_cache.lengths,
                draft_attention=drafts.attention,
                num_layers=verifier_config.num_hidden_layers,
                cache_size=verifier_cache.max_len,
                verifier_attention=verifier_attention,
            )
        )
    return drafts, verifier_cache, plan


def _merge(decoder: Decoder, params: Pair) -> tuple[Llama | None, Llama]:
    draft = None if decoder.draft is None else nnx.merge(decoder.draft, params.draft)
    return draft, nnx.merge(decoder.verifier, params.verifier)


def spec_step(
    decoder: Decoder,
    params: Pair,
    rule: AcceptanceRule,
    selector: Selector | None,
    state: SpecState,
) -> SpecState:
    """One decoding step for every sequence (see the module docstring); without a draft,
    one verifier forward on the pending token, which picks the next."""
    draft, verifier = _merge(decoder, params)
    gamma = decoder.gamma
    active = ~state.progress.done
    step_key = jax.random.fold_in(state.key, state.step + 1)
    draft_key, accept_key = jax.random.split(step_key)

    drafts, verifier_cache, plan = draft_and_plan(
        draft, verifier.config, selector, state.caches, state.last_two, state.seq_lengths,
        rule, draft_key, gamma, state.seen, state.verifier_attention,
    )  # fmt: skip
    drafted = drafts.tokens
    with jax.named_scope("verify"):
        verify_tokens = jnp.concatenate([state.last_two[:, 1:], drafted], axis=1)
        verifier_logits, verifier_cache, info = verifier(
            verify_tokens,
            verifier_cache,
            plan=plan,
            return_attention=verifier_layers(selector),
            backend=decoder.backend,
            attend=decoder.verifier_attend,
        )
    with jax.named_scope("accept"):
        # Position i predicts the token after drafts 0..i-1: it has seen those too.
        verifier_logits = rule.sampler.penalize(
            verifier_logits, seen_before_each(state.seen, drafted)
        )
        num_accepted, next_token = rule.accept(drafted, drafts.logits, verifier_logits, accept_key)
        offsets = jnp.arange(gamma + 1)[None, :]
        padded_drafts = jnp.pad(drafted, ((0, 0), (0, 1)))
        new_tokens = jnp.where(offsets == num_accepted[:, None], next_token[:, None], padded_drafts)
        progress, taken = state.progress.append(
            new_tokens, num_accepted + 1, decoder.stop_sequences
        )
        seq_lengths = state.seq_lengths + taken
        history = jnp.concatenate([state.last_two, new_tokens], axis=1)
        last_two = jnp.take_along_axis(history, taken[:, None] + jnp.arange(2)[None, :], axis=1)
        seen = mark_seen(state.seen, new_tokens, offsets < taken[:, None])
        verifier_attention = None
        if verifier_layers(selector):  # the mean over the rows whose inputs were accepted
            rows = (offsets <= num_accepted[:, None]).astype(jnp.float32)  # [B, gamma + 1]
            weights = rows / rows.sum(axis=1, keepdims=True)
            verifier_attention = jnp.einsum("vbts,bt->vbs", info.attention, weights)
    reads = jnp.concatenate([info.kv_read, info.kv_dense[None], drafts.kv_read[None]])
    step_reads = jnp.where(active, reads.astype(jnp.float32), 0.0)  # [L_v + 2, B]
    draft_cache = None if drafts.cache is None else drafts.cache.with_lengths(seq_lengths - 2)
    return SpecState(
        progress=progress,
        caches=Pair(draft_cache, verifier_cache.with_lengths(seq_lengths - 1)),
        seq_lengths=seq_lengths,
        last_two=last_two,
        key=state.key,
        step=state.step + 1,
        accepted=state.accepted + jnp.where(active, num_accepted, 0),
        kv_log=jax.lax.dynamic_update_index_in_dim(state.kv_log, step_reads, state.step, 0),
        seen=seen,
        verifier_attention=verifier_attention,
    )


def verifier_layers(selector: Selector | None) -> tuple[int, ...]:
    """The verifier layers whose attention `selector` reads from the last verify."""
    return () if selector is None else selector.verifier_layers


def empty_attention_record(
    selector: Selector | None, batch: int, cache_size: int
) -> jax.Array | None:
    """f32[V, B, S] zeros, the record of the verifier's attention before any verify, in the
    V layers `selector` reads; None when it reads none."""
    layers = verifier_layers(selector)
    return jnp.zeros((len(layers), batch, cache_size), jnp.float32) if layers else None


def with_attention_record(state: SpecState, selector: Selector | None) -> SpecState:
    """A prefilled `state` with an empty record of the verifier's attention when `selector`
    reads one."""
    cache = state.caches.verifier
    record = empty_attention_record(selector, len(cache.lengths), cache.max_len)
    return state if record is None else dataclasses.replace(state, verifier_attention=record)


def prefill(
    decoder: Decoder,
    params: Pair,
    tokens: jax.Array,  # i32[B, T] right-padded prompts
    lengths: jax.Array,  # i32[B]
    caches: Pair,
    rule: AcceptanceRule,
    key: jax.Array,
    budgets: jax.Array,  # i32[B]
    max_new: int,
) -> SpecState:
    """Prefills both caches with the prompts and picks each sequence's first new token."""
    draft, verifier = _merge(decoder, params)
    chunked = functools.partial(
        Llama.prefill, num_tokens=lengths, chunk_size=decoder.prefill_chunk,
        backend=decoder.backend,
    )  # fmt: skip
    with jax.named_scope("prefill"):
        logits, verifier_cache = chunked(
            verifier, tokens, caches.verifier, attend=decoder.verifier_attend
        )
        draft_cache = None
        if draft is not None:
            _, draft_cache = chunked(draft, tokens, caches.draft)
    seen = None
    if rule.sampler.tracks_seen:
        prompt_mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        seen = jnp.zeros((len(lengths), logits.shape[-1]), bool)
        seen = mark_seen(seen, tokens, prompt_mask)
    first = rule.sample(rule.sampler.penalize(logits, seen), jax.random.fold_in(key, 0))
    progress, taken = DecodeProgress.init(budgets, max_new).append(
        first[:, None], jnp.ones_like(lengths), decoder.stop_sequences
    )
    last_prompt_token = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    num_layers = verifier.config.num_hidden_layers
    return SpecState(
        progress=progress,
        caches=Pair(draft_cache, verifier_cache),
        seq_lengths=lengths + taken,
        last_two=jnp.stack([last_prompt_token, first], axis=1),
        key=key,
        step=jnp.int32(0),
        accepted=jnp.zeros_like(lengths),
        kv_log=jnp.zeros((max_new, num_layers + 2, len(lengths)), jnp.float32),
        seen=mark_seen(seen, first),
    )


def decode_loop(
    decoder: Decoder, params: Pair, rule: AcceptanceRule, selector: Selector | None,
    state: SpecState, max_new: int,
) -> SpecState:  # fmt: skip
    """Every step from a prefilled `state`, in one `lax.while_loop` until all are done."""
    step = functools.partial(spec_step, decoder, params, rule, selector)
    return run_to_completion(step, with_attention_record(state, selector), max_steps=max_new)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new"), donate_argnames=("caches",))
def _generate(decoder, params, tokens, lengths, caches, rule, key, budgets, max_new, selector):
    """The prefill and every step in one program."""
    state = prefill(decoder, params, tokens, lengths, caches, rule, key, budgets, max_new)
    return decode_loop(decoder, params, rule, selector, state, max_new)


_jit_prefill = jax.jit(prefill, static_argnames=("decoder", "max_new"), donate_argnames=("caches",))
_jit_step = jax.jit(spec_step, static_argnames=("decoder",), donate_argnames=("state",))
_jit_decode_loop = jax.jit(
    decode_loop, static_argnames=("decoder", "max_new"), donate_argnames=("state",)
)


def check_compatible(draft: Llama, verifier: Llama, draft_tokenizer=None, verifier_tokenizer=None):
    """Raises `IncompatibleModelsError` unless draft and verifier share a vocabulary."""
    if draft.config.vocab_size != verifier.config.vocab_size:
        raise IncompatibleModelsError(
            f"the draft's vocabulary has {draft.config.vocab_size} tokens and the verifier's "
            f"{verifier.config.vocab_size}: speculative decoding needs one shared tokenizer"
        )
    if draft_tokenizer is not None and verifier_tokenizer is not None:
        if draft_tokenizer.get_vocab() != verifier_tokenizer.get_vocab():
            raise IncompatibleModelsError(
                "the draft and verifier tokenizers map tokens to different ids: "
                "speculative decoding needs one shared tokenizer"
            )


@dataclasses.dataclass(frozen=True)
class _Run:
    """One `generate` call, set up: the jitted functions' arguments and the stats context."""

    decoder: Decoder
    params: Pair
    tokens: jax.Array  # i32[B, T]
    lengths: jax.Array  # i32[B]
    caches: Pair
    rule: AcceptanceRule
    key: jax.Array
    budgets: jax.Array  # i32[B]
    selector: Selector | None
    max_new: int
    stats_context: dict

    @property
    def prefill_args(self) -> tuple:
        """`prefill`'s arguments, in order."""
        return (
            self.decoder, self.params, self.tokens, self.lengths, self.caches, self.rule,
            self.key, self.budgets, self.max_new,
        )  # fmt: skip


def _setup(
    draft, verifier, prompts, config, max_new_tokens, cache_size, key, eos_id, sampler, mesh,
    prefill_chunk=None, stop_sequences=(),
) -> _Run:  # fmt: skip
    """Checks the inputs, builds the selector, places models and caches (on `mesh`)."""
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise SpecAttnError(f"prefill_chunk={prefill_chunk!r} must be a positive integer")
    if isinstance(eos_id, str) and eos_id != "config":
        raise SpecAttnError(f"eos_id={eos_id!r}: give token ids, None, or 'config'")
    tokens, lengths = pad_prompts(prompts)
    gamma = config.gamma if draft is not None else 0
    lookahead = gamma + 1 if draft is not None else 0
    if draft is not None:
        check_compatible(draft, verifier)
    # The compiled loop is sized for a power of two of new tokens (its output buffer, its
    # step log and the default cache); each sequence's own budget is a traced value, so a
    # notebook that changes `max_new_tokens` reuses the compiled program within a bucket.
    max_new_bucket = max(16, 1 << max(0, max_new_tokens - 1).bit_length())
    eos_ids = verifier.config.eos_token_ids if eos_id == "config" else stop_token_ids(eos_id)
    if cache_size is None:
        needed = tokens.shape[1] + max_new_bucket + lookahead
        cache_size = -(-needed // 64) * 64  # a multiple of every granularity
    check_fits_cache(lengths, max_new_tokens, cache_size, lookahead=lookahead)
    selector, layer_map_origin = None, "dense"
    if draft is not None:
        if config.sparse:
            check_granularity(config.granularity, cache_size)
        selector, layer_map_origin = config.build_selector(draft, verifier, prompts)
    batch = len(prompts)
    if mesh is not None:
        draft, verifier = sharding.shard_pair(draft, verifier, mesh, batch)
    verifier_graphdef, verifier_params = nnx.split(verifier)
    draft_graphdef, draft_params = nnx.split(draft) if draft is not None else (None, None)
    caches = Pair(
        None if draft is None else sharding.init_cache(draft, batch, cache_size, mesh, False),
        sharding.init_cache(verifier, batch, cache_size, mesh),
    )
    num_layers = verifier.config.num_hidden_layers
    # The selector's own dense layers (a baseline brings its own), not the config's.
    sparse_layers = sparse_layer_flags(
        num_layers, selector.dense_layers if selector is not None else num_layers
    )
    return _Run(
        decoder=Decoder(
            draft=draft_graphdef,
            verifier=verifier_graphdef,
            gamma=gamma,
            stop_sequences=tuple((token,) for token in eos_ids) + stop_sequences,
            backend=config.backend,
            verifier_attend=sharding.attention_for(mesh),
            prefill_chunk=prefill_chunk,
        ),
        params=Pair(draft_params, verifier_params),
        tokens=sharding.put_batch(mesh, tokens),
        lengths=sharding.put_batch(mesh, lengths),
        caches=caches,
        rule=acceptance_for(sampler or Greedy()),
        key=jax.random.key(0) if key is None else key,
        budgets=jnp.full((batch,), max_new_tokens, jnp.int32),
        selector=selector,
        max_new=max_new_bucket,
        stats_context={
            "gamma": gamma,
            "layer_map": layer_map_origin,
            "sparse_layers": sparse_layers,
            "entry_bytes": (
                0 if draft is None else kv_entry_bytes(draft),
                kv_entry_bytes(verifier),
            ),
        },
    )


def generate(
    draft: Llama | None,
    verifier: Llama,
    prompts: Sequence[Sequence[int]],
    config: SpecConfig | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampler: Sampler | None = None,
    eos_id: int | Sequence[int] | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
    prefill_chunk: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
) -> GenerationResult:
    """Speculative decoding of a batch of prompts, entirely on device.

    Prefills both models, then runs `spec_step` in a `lax.while_loop` until every sequence
    produced EOS or `max_new_tokens`. With `draft=None` the same loop decodes
    autoregressively: each step is one verifier forward on the pending token.

    Args:
      draft: the draft model (sharing the verifier's vocabulary), or None.
      verifier: the target model.
      prompts: B token-id lists, ragged lengths allowed.
      config: `SpecConfig` (gamma, SpecAttn's settings); ignored without a draft but for
        `backend`.
      max_new_tokens: budget per sequence.
      key: PRNG key (sampling only); default `jax.random.key(0)`.
      sampler: `Greedy()` (default) or `Sampling(temperature=, top_k=, top_p=, min_p=)`,
        either with a `repetition_penalty` (`make_sampler` builds one from plain values).
      eos_id: stop token, or several (a sequence stops at the first of any; speculative
        acceptance stops at the first one accepted); "config" takes the verifier config's
        (`generation_config.json`'s where the checkpoint has one), None never stops early.
      cache_size: KV positions per sequence (default: padded prompt + budget + gamma + 1,
        rounded up to a multiple of 64).
      mesh: a ("data", "model") `Mesh` (`sharding.make_mesh`): the verifier runs
        tensor-parallel over "model" with its KV cache split by KV head, the draft
        replicated, the batch split over "data". None runs on the default device.
      prefill_chunk: prompt tokens per prefill forward (`Llama.prefill`); None prefills
        each prompt in one forward. Chunks bound prefill memory by the chunk, not the prompt.
      stop_strings: texts that end a sequence (with `tokenizer`). Inside the jitted loop a
        stop string is matched as the tokens it encodes to alone, where those decode back to
        exactly it; after the loop each sequence is also cut on the host after the token
        that completes its first stop string, however it was tokenized (`stopping`).
      tokenizer: the verifier's tokenizer (needed for `stop_strings`).

    Returns:
      `GenerationResult`: tokens per prompt, and stats (`spec_stats`: steps, tokens, drafted,
      accepted, acceptance_rate, tokens_per_step, the KV reduction and the KV bill).
    """
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    run = _setup(
        draft, verifier, prompts, config or SpecConfig(), max_new_tokens, cache_size, key,
        eos_id, sampler, mesh, prefill_chunk, stop_token_sequences(tokenizer, stop_strings),
    )  # fmt: skip
    state = _generate(*run.prefill_args, run.selector)
    result = GenerationResult.from_progress(state.progress, spec_stats(state, **run.stats_context))
    tokens = [cut_at_stop(tokenizer, row, stop_strings) for row in result.tokens]
    return dataclasses.replace(result, tokens=tokens)


def generate_stream(
    draft: Llama | None,
    verifier: Llama,
    prompts: Sequence[Sequence[int]],
    config: SpecConfig | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampler: Sampler | None = None,
    eos_id: int | Sequence[int] | None | str = "config",
    cache_size: int | None = None,
    mesh: Mesh | None = None,
    prefill_chunk: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
) -> Iterator[tuple[list[list[int]], dict]]:
    """Like `generate`, driven from the host: yields (tokens accepted per sequence, running
    stats) after the prefill and after every step, for streaming output. Stop strings are
    checked on the host after every step (as well as in the loop, as `generate`'s): a
    sequence yields nothing after the token that completes one, and the stream ends when
    every sequence has stopped."""
    stop_strings = check_stop_strings(stop_strings, tokenizer)
    run = _setup(
        draft, verifier, prompts, config or SpecConfig(), max_new_tokens, cache_size, key,
        eos_id, sampler, mesh, prefill_chunk, stop_token_sequences(tokenizer, stop_strings),
    )  # fmt: skip
    state = with_attention_record(_jit_prefill(*run.prefill_args), run.selector)
    step = functools.partial(_jit_step, run.decoder, run.params, run.rule, run.selector)
    so_far: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for new_tokens, stepped in stream(step, state, max_steps=max_new_tokens):
        for row, tokens in enumerate(new_tokens):
            if stopped[row]:
                new_tokens[row] = []
                continue
            text_tokens = so_far[row] + tokens
            end = stop_index(tokenizer, text_tokens, stop_strings)
            if end is not None:
                new_tokens[row] = text_tokens[len(so_far[row]) : end]
                stopped[row] = True
            so_far[row] += new_tokens[row]
        yield new_tokens, spec_stats(stepped, **run.stats_context)
        if all(stopped):
            return


def kv_reduction(
    kv_read: np.ndarray, kv_dense: np.ndarray, sparse_layers: Sequence[bool]
) -> tuple[float, list[float], list[float]]:
    """Measured KV reduction: 1 - entries read / entries dense attention would read.

    Args:
      kv_read: f[N, L] entries each layer read per step (summed over sequences).
      kv_dense: f[N] entries a dense layer would read per step.
      sparse_layers: per layer, whether it was sparse.
    Returns:
      (overall reduction over the sparse layers and steps, per layer (0 for dense layers),
      per step over the sparse layers). Ratios of sums, so long contexts weigh more.
    """
    sparse = np.asarray(sparse_layers, bool)
    steps = kv_dense > 0
    kv_read, kv_dense = np.asarray(kv_read)[steps], np.asarray(kv_dense)[steps]
    if not sparse.any() or not len(kv_dense):
        return 0.0, [0.0] * len(sparse), [0.0] * len(kv_dense)
    per_layer = np.where(sparse, 1 - kv_read.sum(0) / kv_dense.sum(), 0.0)
    per_step = 1 - kv_read[:, sparse].sum(1) / (kv_dense * sparse.sum())
    overall = 1 - kv_read[:, sparse].sum() / (kv_dense.sum() * sparse.sum())
    return float(overall), per_layer.tolist(), per_step.tolist()


def kv_entry_bytes(model: Llama) -> int:
    """Bytes one cache position costs to read in one layer: its key and value, all KV heads."""
    config = model.config
    return 2 * config.num_key_value_heads * config.head_dim * jnp.dtype(model.dtype).itemsize


def kv_bill(
    kv_read: np.ndarray,  # f[N, L_v]
    kv_dense: np.ndarray,  # f[N]
    draft_kv_read: np.ndarray,  # f[N]
    sparse_layers: Sequence[bool],
    entry_bytes: tuple[int, int],
) -> dict:
    """Every KV read of a run, in cache positions x layers summed over steps and sequences,
    and in bytes (`entry_bytes`: per position and layer, (draft, verifier)).

    Keys: kv_read_sparse_layers, kv_dense_sparse_layers (what those layers would have read
    densely), kv_read_dense_layers (the verifier's always-dense layers), kv_read_draft (all
    draft layers and forwards), kv_bytes_verifier, kv_bytes_verifier_if_dense, kv_bytes_draft,
    and kv_reduction_verifier (over all verifier layers)."""
    sparse = np.asarray(sparse_layers, bool)
    per_layer = np.asarray(kv_read, np.float64).sum(0)
    dense_total = float(np.asarray(kv_dense, np.float64).sum())
    draft_bytes, verifier_bytes = entry_bytes
    read, if_dense = per_layer.sum(), dense_total * len(per_layer)
    draft_read = float(np.asarray(draft_kv_read, np.float64).sum())
    return {
        "kv_read_sparse_layers": int(per_layer[sparse].sum()),
        "kv_dense_sparse_layers": int(dense_total * sparse.sum()),
        "kv_read_dense_layers": int(per_layer[~sparse].sum()),
        "kv_read_draft": int(draft_read),
        "kv_bytes_verifier": int(read * verifier_bytes),
        "kv_bytes_verifier_if_dense": int(if_dense * verifier_bytes),
        "kv_bytes_draft": int(draft_read * draft_bytes),
        "kv_reduction_verifier": float(1 - read / if_dense) if if_dense else 0.0,
    }


def spec_stats(
    state: SpecState,
    gamma: int,
    layer_map: str = "",
    sparse_layers: Sequence[bool] = (),
    entry_bytes: tuple[int, int] = (0, 0),
) -> dict:
    """Statistics of a run of `gamma` drafts per step: steps, tokens, drafted/accepted,
    acceptance rate, tokens/step, the measured KV reduction of the sparse layers (overall,
    per layer, per step), and the whole KV bill (`kv_bill`: dense layers and the draft
    included)."""
    kv_read, kv_dense = np.asarray(state.kv_read), np.asarray(state.kv_dense)
    reduction, per_layer, per_step = kv_reduction(kv_read, kv_dense, sparse_layers)
    tokens = int(np.sum(np.asarray(state.progress.num_generated)))
    active_steps = int(np.sum(np.asarray(state.active_steps)))
    drafted = gamma * active_steps  # gamma per step while active
    accepted = int(np.sum(np.asarray(state.accepted)))
    return {
        "steps": int(state.step),
        "tokens": tokens,
        "drafted": drafted,
        "accepted": accepted,
        # None without a draft (autoregressive): there is nothing to accept.
        "acceptance_rate": None if gamma == 0 else accepted / drafted if drafted else 0.0,
        "tokens_per_step": (tokens - len(state.seq_lengths)) / active_steps
        if active_steps
        else 0.0,
        "kv_reduction": reduction,
        "kv_reduction_per_layer": per_layer,
        "kv_reduction_per_step": per_step,
        **kv_bill(kv_read, kv_dense, np.asarray(state.draft_kv_read), sparse_layers, entry_bytes),
        "layer_map": layer_map,
    }
