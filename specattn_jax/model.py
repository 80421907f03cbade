"""Llama in Flax NNX: RMSNorm, RoPE (HF's rotate-half convention, optional llama3 scaling),
GQA/MQA/MHA attention over a preallocated KV cache, SwiGLU MLP.

One forward serves prefill, decode (T = 1) and multi-token verify (T = gamma + 1), and,
without a cache, training and scoring:

    logits, cache, info = model(tokens, cache)
    logits, _, _ = model(tokens)  # causal over the tokens alone

Each attention layer projects and rotates its queries and keys, writes the keys and values to
its cache (`LayerCache.write`), and hands (queries, cache layer, positions, what to read) to
one attention function (`attention.attend`); what a sparse layer reads arrives as data in the
`AttentionPlan`. The model knows nothing of meshes: a sharded run passes
`attend=sharding.HeadParallel(mesh)`.

Under `jax.jit`, pass `(graphdef, state)` rather than the module, so the weights are
arguments and not constants baked into the program (the pattern of Flax's gemma sampler):

    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnames="cache")
    def step(state, tokens, cache):
        model = nnx.merge(graphdef, state)
        return model(tokens, cache)

`forward()` below is that function, ready to use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import resolve_backend
from pallas_kernels.cache_write import supports as cache_write_supports
from pallas_kernels.decode_matmul import decode_matmul
from pallas_kernels.decode_matmul import supports as decode_matmul_supports
from specattn_jax import attention as attention_lib
from specattn_jax.attention import (
    DENSE,
    Attend,
    AttentionOutput,
    AttentionPlan,
    ForwardInfo,
    SelfRead,
    attend,
)
from specattn_jax.cache import KVCache, LayerCache
from specattn_jax.config import LlamaConfig

# How a step over a cache of at most 16 tokens (`decode_matmul.MAX_ROWS`) multiplies, by
# `Llama.matmul_mode`: "xla" (the default), op by op; "fused", the fused
# `pallas_kernels.decode_matmul` kernels on a CUDA GPU for bf16/f16 weights; "interpret",
# those kernels in Pallas interpret mode (tests on CPU). The fused kernels are not the
# default: on an H100 they made a TinyLlama draft phase at 32K 1.14x and a Llama-2-7B decode
# step at 4K 1.16x slower (`benchmarks/bench_step_loop.py --matmul-mode`), their fewer
# launches outweighed by matmuls below XLA's (`benchmarks/bench_decode_matmul.py`).
MATMUL_MODES = ("xla", "fused", "interpret")

_INIT_STD = 0.02
_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


# XLA's GPU compiler turns a vector-matrix product whose operands hold fewer elements than
# this into a multiply and a reduce (its `DotStrengthReduction` pass).
_XLA_VECTOR_DOT_LIMIT = 10_000_000


def linear(equation: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, weight)` for activations x [B, T, ...] and a weight.

    A single row (B = T = 1, one decode token) times a weight under XLA's limit is multiplied
    as two copies of itself: as a multiply and a reduce, the draft's 2048-wide projections ran
    at half the speed of XLA's matmul on an H200 (`benchmarks/profile_step.py`).
    """
    if x.shape[0] * x.shape[1] != 1 or x.size + weight.size >= _XLA_VECTOR_DOT_LIMIT:
        return jnp.einsum(equation, x, weight)
    return jnp.einsum(equation, jnp.concatenate([x, x], axis=1), weight)[:, :1]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = _INIT_STD) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., E] -> [..., E]
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:  # [..., E]
    """`weight * (x * rsqrt(mean(x^2) + eps))`, in f32, rounded to x's dtype before the
    weight multiplies it."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """A layer's projections as [K, N] matmuls: "qkv" (fused q, k, v), "o", "gate_up" (N is
    F, for each of gate and up) and "down"."""
    embed, ffn = config.hidden_size, config.intermediate_size
    heads_width = config.num_attention_heads * config.head_dim
    qkv_width = heads_width + 2 * config.num_key_value_heads * config.head_dim
    return {
        "qkv": (embed, qkv_width),
        "o": (heads_width, embed),
        "gate_up": (embed, ffn),
        "down": (ffn, embed),
    }


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """f32[D // 2] RoPE inverse frequencies, with llama3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(
    x: jax.Array,  # [B, T, N, D]
    positions: jax.Array,  # i32[B, T]
    inv_freq: jax.Array,  # f32[D // 2]
) -> jax.Array:
    """Rotary embedding, rotating the two halves of each head (HF's `rotate_half`)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D // 2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], axis=-1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([freqs, freqs], axis=-1))[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What every layer of one forward shares.

    Attributes:
      positions: i32[B, T] the new tokens' positions.
      context_lengths: i32[B] positions before them (0 without a cache).
      inv_freq: f32[D // 2] RoPE inverse frequencies.
      plan: the sparse plan, or None (every layer dense).
      self_read: the `SelfRead` of a forward without a cache, else None.
      attend: the attention function (`attention.attend`, or a wrapper such as
        `sharding.HeadParallel`).
      backend: "auto", "pallas" or "reference" for the kernels.
      summary_layers: the layers that report head-mean attention probabilities.
      matmul_kernel: `decode_matmul` (the RMSNorms, residual adds and SwiGLU fused into the
        four projections) where this forward runs it, else None (XLA, op by op).
      write_kernel: whether the cache write is `pallas_kernels.cache_write` (one launch for
        keys and values) rather than XLA's scatters.
    """

    positions: jax.Array
    context_lengths: jax.Array
    inv_freq: jax.Array
    plan: AttentionPlan | None
    self_read: SelfRead | None
    attend: Attend
    backend: str
    summary_layers: tuple[int, ...]
    matmul_kernel: Callable | None = None
    write_kernel: bool = False


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What a layer reports besides its output.

    Attributes:
      cache: the layer's cache with this forward's keys and values (None without a cache).
      attention: its `AttentionOutput` (positions read, optional head-mean probabilities).
      queries: [B, T, H, D] its RoPE'd queries.
      keys: [B, T, H_kv, D] this forward's RoPE'd keys.
    """

    cache: LayerCache | None
    attention: AttentionOutput
    queries: jax.Array
    keys: jax.Array


class Attention(nnx.Module):
    """Grouped-query self-attention.

    The query, key and value projections are one array, `qkv_proj` [E, H_kv, G + 2, D]: for
    each KV head, its G = H / H_kv query heads, then its key and its value. One matmul makes
    all three (at decode, one weight read instead of three launches), and a mesh that splits
    the KV heads splits it with them. Checkpoints keep them apart (`convert._params`).
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        embed, heads, kv_heads, dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        slots = heads // kv_heads + 2
        self.qkv_proj = _param(rngs, (embed, kv_heads, slots, dim), dtype)
        self.o_proj = _param(rngs, (heads, dim, embed), dtype)
        if config.attention_bias:
            self.qkv_bias = nnx.Param(jnp.zeros((kv_heads, slots, dim), dtype))
            self.o_bias = nnx.Param(jnp.zeros((embed,), dtype))
        self.use_bias = config.attention_bias

    def qkv(
        self, x: jax.Array, norm: RMSNorm, matmul_kernel: Callable | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, H, D], keys and values [B, T, H_kv, D] of `norm(x)` for the
        residual stream x [B, T, E] (no RoPE)."""
        if matmul_kernel is not None:
            qkv = matmul_kernel(x, self.qkv_proj[...], norm_weight=norm.weight[...], eps=norm.eps)
        else:
            qkv = linear("bte,eksd->btksd", norm(x), self.qkv_proj[...])
        if self.use_bias:
            qkv = qkv + self.qkv_bias[...]
        batch, seq, kv_heads, slots, dim = qkv.shape
        q = qkv[:, :, :, :-2].reshape(batch, seq, kv_heads * (slots - 2), dim)
        return q, qkv[:, :, :, -2], qkv[:, :, :, -1]

    def __call__(
        self,
        x: jax.Array,  # [B, T, E] the residual stream
        layer_index: int,
        cache: LayerCache | None,  # [B, S, H_kv, D] each
        inputs: LayerInputs,
        norm: RMSNorm,
    ) -> tuple[jax.Array, LayerResult]:
        """`norm`, projections and RoPE, the cache write, then `inputs.attend` over what the
        plan says this layer reads, and the output projection added to x. Returns the
        residual stream [B, T, E] and the `LayerResult`."""
        with jax.named_scope("qkv"):
            q, k, v = self.qkv(x, norm, inputs.matmul_kernel)
        with jax.named_scope("rope"):
            q = apply_rope(q, inputs.positions, inputs.inv_freq)
            k = apply_rope(k, inputs.positions, inputs.inv_freq)
        if cache is None:
            keys, read = LayerCache(k, v), inputs.self_read
        else:
            with jax.named_scope("cache_update"):
                cache = keys = cache.write(inputs.positions, k, v, kernel=inputs.write_kernel)
            read = DENSE
            if inputs.plan is not None:
                with jax.named_scope("select"):
                    read = inputs.plan.read(layer_index, q, keys, inputs.context_lengths)
        with jax.named_scope("attention"):
            attention = inputs.attend(
                q,
                keys,
                inputs.positions,
                inputs.context_lengths,
                read,
                backend=inputs.backend,
                return_summary=layer_index in inputs.summary_layers,
            )
        heads_out = attention.out.astype(x.dtype)  # [B, T, H, D]
        if inputs.matmul_kernel is not None:
            batch, seq = x.shape[:2]
            out = inputs.matmul_kernel(
                heads_out.reshape(batch, seq, -1), self.o_proj[...].reshape(-1, x.shape[-1]),
                residual=x, epilogue="residual",
            )  # fmt: skip
        else:
            out = linear("bthd,hde->bte", heads_out, self.o_proj[...])
            if self.use_bias:
                out = out + self.o_bias[...]
            out = x + out
        return out, LayerResult(cache, attention, q, k)


class MLP(nnx.Module):
    """SwiGLU feed-forward added to the residual stream: x + down(silu(gate(h)) * up(h)) for
    h = norm(x), the gate and up projections one array `gate_up_proj` [E, 2, F] (one
    matmul)."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        embed, ffn = config.hidden_size, config.intermediate_size
        self.gate_up_proj = _param(rngs, (embed, 2, ffn), dtype)
        self.down_proj = _param(rngs, (ffn, embed), dtype)
        if config.mlp_bias:
            self.gate_up_bias = nnx.Param(jnp.zeros((2, ffn), dtype))
            self.down_bias = nnx.Param(jnp.zeros((embed,), dtype))
        self.use_bias = config.mlp_bias

    def __call__(
        self, x: jax.Array, norm: RMSNorm, matmul_kernel: Callable | None
    ) -> jax.Array:  # [B, T, E] -> [B, T, E]
        if matmul_kernel is not None:
            hidden = matmul_kernel(
                x, self.gate_up_proj[...], norm_weight=norm.weight[...], eps=norm.eps,
                epilogue="swiglu",
            )  # fmt: skip
            return matmul_kernel(hidden, self.down_proj[...], residual=x, epilogue="residual")
        gate_up = linear("bte,euf->btuf", norm(x), self.gate_up_proj[...])
        if self.use_bias:
            gate_up = gate_up + self.gate_up_bias[...]
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        out = linear("btf,fe->bte", hidden, self.down_proj[...])
        return x + (out + self.down_bias[...] if self.use_bias else out)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, layer_index: int, cache: LayerCache | None, inputs: LayerInputs
    ) -> tuple[jax.Array, LayerResult]:  # x: [B, T, E]
        x, result = self.self_attn(x, layer_index, cache, inputs, self.input_layernorm)
        x = self.mlp(x, self.post_attention_layernorm, inputs.matmul_kernel)
        return x, result


class Llama(nnx.Module):
    """A Llama causal language model (`LlamaForCausalLM`'s architecture).

    `matmul_mode` (one of MATMUL_MODES; static, part of the graph definition) says how
    steps of at most 16 tokens (`decode_matmul.MAX_ROWS`) multiply.
    """

    def __init__(
        self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
        matmul_mode: str = "xla",
    ):  # fmt: skip
        if matmul_mode not in MATMUL_MODES:
            raise ValueError(f"{matmul_mode=} must be one of {MATMUL_MODES}")
        self.config = config
        self.matmul_mode = matmul_mode
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), dtype)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dtype)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens[...].dtype

    def matmul_kernel(
        self, rows: int, has_cache: bool, backend: str, attend: Attend
    ) -> Callable | None:
        """`decode_matmul` where a forward of `rows` tokens runs its projections fused, else
        None: steps over a cache of at most 16 rows (`decode_matmul.MAX_ROWS`), no biases
        (the kernel has none), and no mesh splitting the heads (XLA partitions its own
        matmuls, not a Pallas call)."""
        config = self.config
        if (
            self.matmul_mode == "xla"
            or not has_cache
            or config.attention_bias
            or config.mlp_bias
            or attend is not attention_lib.attend
            or not all(
                decode_matmul_supports(rows, k, n) for k, n in projection_shapes(config).values()
            )
        ):
            return None
        if self.matmul_mode == "interpret":
            return functools.partial(decode_matmul, interpret=True)
        on_gpu = resolve_backend(backend) == "pallas"
        return decode_matmul if on_gpu and self.dtype in _HALF_DTYPES else None

    def write_kernel(
        self, tokens: int, cache: KVCache | None, backend: str, attend: Attend
    ) -> bool:
        """Whether a forward of `tokens` per row writes its cache with the
        `pallas_kernels.cache_write` kernel: a step (at most `cache_write.MAX_NEW` = 16
        tokens, its `supports`) on the kernel backend (a CUDA GPU), with no mesh (XLA
        partitions its own scatters, not a Pallas call)."""
        return (
            cache is not None
            and attend is attention_lib.attend
            and resolve_backend(backend) == "pallas"
            and cache_write_supports(tokens, cache.max_len, self.config.head_dim)
        )

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache in the model's dtype."""
        return KVCache.init(self.config, batch_size, max_len, self.dtype)

    def __call__(
        self,
        tokens: jax.Array,  # i32[B, T]
        cache: KVCache | None = None,
        *,
        num_tokens: jax.Array | None = None,  # i32[B]
        plan: AttentionPlan | None = None,
        return_attention: bool | tuple[int, ...] = False,
        return_queries: bool = False,
        return_keys: bool = False,
        last_logits_only: bool = False,
        backend: str = "auto",
        attend: Attend = attend,
        implementation: str | None = None,
    ) -> tuple[jax.Array, KVCache | None, ForwardInfo]:
        """Runs T new tokens per sequence through the model, appending them to the cache.

        Args:
          tokens: i32[B, T] new tokens; row b's first `num_tokens[b]` are real, the rest
            padding (their cache entries land past the new length and are never read).
          cache: the KV cache; token t of row b goes to position `cache.lengths[b] + t`.
            None: a causal forward over the tokens alone, at positions 0..T-1 (training and
            scoring; attention by `jax.nn.dot_product_attention`).
          num_tokens: i32[B] real tokens per row (default: all T).
          plan: per-layer sparse selection for verify; None attends densely everywhere.
          return_attention: also return the head-mean attention probabilities: True for every
            layer, or a tuple of the layers wanted (only those compute them).
          return_queries: also return every layer's RoPE'd queries (for calibrations).
          return_keys: also return every layer's RoPE'd keys of the new tokens.
          last_logits_only: return logits only at each row's last real token.
          backend: "auto", "pallas" or "reference" for the attention kernels.
          attend: the attention function (default `attention.attend`); a mesh's
            `sharding.HeadParallel` runs it per device on its own KV heads.
          implementation: without a cache, `jax.nn.dot_product_attention`'s implementation
            (None: XLA's choice, "xla", "cudnn").

        Returns:
          logits: f32[B, T, V] (or f32[B, 1, V] with `last_logits_only`).
          cache: the cache with the new entries and `lengths + num_tokens` (None without one).
          info: `ForwardInfo`: the head-mean attention probabilities f32[L', B, T, S] over
            cache positions of the layers `return_attention` names (a sparse layer's are zero
            where it did not read), and the KV entries each layer read.
        """
        batch, seq = tokens.shape
        if num_tokens is None:
            num_tokens = jnp.full((batch,), seq, jnp.int32)
        if cache is None and plan is not None:
            raise ValueError("a sparse plan needs a KV cache to read from")
        num_layers = self.config.num_hidden_layers
        if return_attention is True:
            summary_layers = tuple(range(num_layers))
        else:
            summary_layers = tuple(return_attention or ())
        if not all(0 <= layer < num_layers for layer in summary_layers):
            raise ValueError(f"{return_attention=} names a layer outside 0..{num_layers - 1}")
        context_lengths = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
        positions = context_lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
        inputs = LayerInputs(
            positions=positions,
            context_lengths=context_lengths,
            inv_freq=rope_inverse_frequencies(self.config),
            plan=plan,
            self_read=SelfRead(implementation) if cache is None else None,
            attend=attend,
            backend=backend,
            summary_layers=summary_layers,
            matmul_kernel=self.matmul_kernel(batch * seq, cache is not None, backend, attend),
            write_kernel=self.write_kernel(seq, cache, backend, attend),
        )
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        results = []
        for layer_index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(layer_index)
            x, result = layer(x, layer_index, layer_cache, inputs)
            results.append(result)
        if last_logits_only:
            x = jnp.take_along_axis(x, (num_tokens - 1)[:, None, None], axis=1)
        x = self.norm(x)
        head = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)
        if cache is not None:
            new_lengths = context_lengths + num_tokens.astype(jnp.int32)
            cache = KVCache.from_layers([r.cache for r in results], new_lengths)
        info = ForwardInfo(
            attention=jnp.stack([results[layer].attention.summary for layer in summary_layers])
            if summary_layers
            else None,
            kv_read=jnp.stack([r.attention.kv_read for r in results]),
            kv_dense=context_lengths + seq,
            queries=jnp.stack([r.queries for r in results]) if return_queries else None,
            keys=jnp.stack([r.keys for r in results]) if return_keys else None,
        )
        return logits, cache, info

    def prefill(
        self,
        tokens: jax.Array,  # i32[B, T] right-padded prompts
        cache: KVCache,
        *,
        num_tokens: jax.Array | None = None,  # i32[B]
        chunk_size: int | None = None,
        backend: str = "auto",
        attend: Attend = attend,
    ) -> tuple[jax.Array, KVCache]:
        """Appends prompts to the cache, `chunk_size` tokens per forward (None: all at once).

        Each chunk is one forward over the next `chunk_size` tokens of every row (a row whose
        prompt has ended adds none), reading the cache blockwise (`attention.prefill_attention`),
        so memory grows with the chunk, not the prompt. The chunks run in a `lax.scan`: one
        compiled forward whatever the prompt length. Chunked and whole prefill give the same
        cache and logits up to float rounding.

        Returns the logits f32[B, V] at each row's last prompt token, and the cache.
        """
        batch, length = tokens.shape
        if num_tokens is None:
            num_tokens = jnp.full((batch,), length, jnp.int32)
        if chunk_size is None or chunk_size >= length:
            logits, cache, _ = self(
                tokens, cache, num_tokens=num_tokens, last_logits_only=True,
                backend=backend, attend=attend,
            )  # fmt: skip
            return logits[:, 0], cache
        if chunk_size < 1:
            raise ValueError(f"{chunk_size=} must be at least 1")
        num_chunks = -(-length // chunk_size)
        tokens = jnp.pad(tokens, ((0, 0), (0, num_chunks * chunk_size - length)))
        chunks = tokens.reshape(batch, num_chunks, chunk_size).transpose(1, 0, 2)
        starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

        def one_chunk(carry, chunk):
            cache, last_logits = carry
            chunk_tokens, start = chunk
            in_chunk = jnp.clip(num_tokens - start, 0, chunk_size)
            logits, cache, _ = self(
                chunk_tokens, cache, num_tokens=in_chunk, last_logits_only=True,
                backend=backend, attend=attend,
            )  # fmt: skip
            # A row whose prompt ended in an earlier chunk keeps its logits.
            last_logits = jnp.where((in_chunk > 0)[:, None], logits[:, 0], last_logits)
            return (cache, last_logits), None

        logits_init = jnp.zeros((batch, self.config.vocab_size), jnp.float32)
        (cache, logits), _ = jax.lax.scan(one_chunk, (cache, logits_init), (chunks, starts))
        return logits, cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "return_attention", "last_logits_only", "backend", "attend"),
    donate_argnames=("cache",),
)
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,  # i32[B, T]
    cache: KVCache,
    num_tokens: jax.Array | None = None,  # i32[B]
    plan: AttentionPlan | None = None,
    *,
    return_attention: bool = False,
    last_logits_only: bool = False,
    backend: str = "auto",
    attend: Attend = attend,
):
    """Jitted `Llama.__call__` on a split model; the cache is donated (updated in place)."""
    model = nnx.merge(graphdef, state)
    return model(
        tokens,
        cache,
        num_tokens=num_tokens,
        plan=plan,
        return_attention=return_attention,
        last_logits_only=last_logits_only,
        backend=backend,
        attend=attend,
    )


def count_params(model: Llama) -> int:
    """Number of parameters (the tied LM head counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
