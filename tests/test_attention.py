"""The attention layer's one function: which path each read takes, and that every path
computes causal attention over what it is told to read (against a float64 numpy reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specattn_jax.attention import (
    DENSE,
    MAX_KERNEL_TOKENS,
    BlockRead,
    SelfRead,
    attend,
    attention_path,
    blockwise_attention,
    prefill_attention,
)
from specattn_jax.cache import LayerCache

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 16


@pytest.mark.parametrize(
    "read, backend, num_new, head_dim, summary, path",
    [
        (BlockRead(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32)), "pallas", 5, 64,
         False, "sparse"),
        (BlockRead(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32)), "reference", 5, 64,
         True, "sparse"),
        (SelfRead(), "auto", 64, 64, False, "self"),
        (SelfRead("xla"), "pallas", 8, 64, True, "xla"),  # only XLA reports probabilities
        (DENSE, "pallas", 5, 64, False, "kernel"),
        (DENSE, "pallas", MAX_KERNEL_TOKENS, 128, False, "kernel"),
        (DENSE, "pallas", MAX_KERNEL_TOKENS + 1, 64, False, "prefill"),
        (DENSE, "reference", 512, 64, False, "prefill"),
        (DENSE, "reference", 512, 64, True, "xla"),  # probabilities asked for: XLA's
        (DENSE, "auto", 5, 24, False, "xla"),  # a head dim the kernel does not take
        (DENSE, "pallas", 5, 64, True, "kernel"),  # the kernel writes the probabilities too
        (DENSE, "auto", 5, 24, True, "xla"),
        (DENSE, "pallas", MAX_KERNEL_TOKENS + 1, 64, True, "xla"),
        (DENSE, "reference", 5, 64, False, "xla"),
    ],
)  # fmt: skip
def test_each_read_takes_its_path(read, backend, num_new, head_dim, summary, path):
    assert attention_path(read, backend, num_new, head_dim, summary) == path


def _reference_probabilities(q, k, visible):
    """float64 GQA attention probabilities [B, H, T, S]; visible: bool[B, T, S]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def _reference(q, k, v, visible):
    """float64 GQA attention; visible: bool[B, T, S]."""
    v = np.asarray(v, np.float64)
    v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bhts,bshd->bthd", _reference_probabilities(q, k, visible), v)


def _inputs(num_new, cache_size, context, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (BATCH, num_new, HEADS, DIM), jnp.float32)
    full = (BATCH, cache_size, KV_HEADS, DIM)
    cache = LayerCache(jax.random.normal(keys[1], full), jax.random.normal(keys[2], full))
    new_k = jax.random.normal(keys[3], (BATCH, num_new, KV_HEADS, DIM))
    new_v = jax.random.normal(keys[4], (BATCH, num_new, KV_HEADS, DIM))
    context_lengths = jnp.asarray(context, jnp.int32)
    positions = context_lengths[:, None] + jnp.arange(num_new)[None, :]
    return q, cache.write(positions, new_k, new_v), positions, context_lengths, (new_k, new_v)


def test_self_read_is_causal_attention_over_the_forward_tokens():
    num_new = 7
    q, _, positions, zeros, (k, v) = _inputs(num_new, 16, [0, 0])
    result = attend(q, LayerCache(k, v), positions, zeros, SelfRead())
    visible = np.tril(np.ones((num_new, num_new), bool))[None].repeat(BATCH, 0)
    np.testing.assert_allclose(result.out, _reference(q, k, v, visible), rtol=2e-5, atol=2e-5)
    assert result.kv_read.tolist() == [num_new] * BATCH
    assert result.summary is None


@pytest.mark.parametrize("summary", [False, True])
def test_dense_read_sees_every_position_up_to_its_own(summary):
    context, num_new, size = [5, 11], 3, 32
    q, cache, positions, lengths, _ = _inputs(num_new, size, context, seed=1)
    result = attend(
        q, cache, positions, lengths, DENSE, backend="reference", return_summary=summary
    )
    visible = np.arange(size)[None, None, :] <= np.asarray(positions)[:, :, None]
    np.testing.assert_allclose(
        result.out, _reference(q, cache.k, cache.v, visible), rtol=2e-5, atol=2e-5
    )
    assert result.kv_read.tolist() == [c + num_new for c in context]
    if summary:
        assert result.summary.shape == (BATCH, num_new, size)
        np.testing.assert_allclose(result.summary.sum(-1), 1.0, rtol=1e-5)
        assert not np.asarray(result.summary)[~visible].any()


def test_block_read_sees_its_blocks_and_the_new_tokens_only():
    context, num_new, size, granularity = [40, 24], 3, 64, 16
    q, cache, positions, lengths, _ = _inputs(num_new, size, context, seed=2)
    indices = jnp.array([[2, 0], [1, 0]], jnp.int32)  # row 0: block 2; row 1: block 1
    read = BlockRead(indices, jnp.array([1, 1], jnp.int32), granularity)
    result = attend(q, cache, positions, lengths, read, backend="reference", return_summary=True)
    key_positions = np.arange(size)
    chosen = [
        (key_positions >= 32) & (key_positions < 40),
        (key_positions >= 16) & (key_positions < 24),
    ]
    new = key_positions[None, None, :] >= np.asarray(lengths)[:, None, None]
    causal = key_positions[None, None, :] <= np.asarray(positions)[:, :, None]
    visible = (np.stack(chosen)[:, None, :] | new) & causal
    np.testing.assert_allclose(
        result.out, _reference(q, cache.k, cache.v, visible), rtol=2e-5, atol=2e-5
    )
    assert result.kv_read.tolist() == [8 + num_new, 8 + num_new]
    # The head-mean probabilities over what was read, zero elsewhere.
    np.testing.assert_allclose(
        result.summary, _reference_probabilities(q, cache.k, visible).mean(1), atol=1e-6
    )


@pytest.mark.parametrize(
    "num_new, cache_size, context, block_q, block_k",
    [
        (40, 64, [0, 0], 16, 16),  # a first chunk, blocks dividing everything
        (40, 100, [0, 0], 16, 32),  # the cache not a multiple of block_k: the last is shifted
        (33, 300, [250, 7], 8, 64),  # ragged contexts (later chunks), T not a multiple
        (20, 90, [3, 70], 64, 128),  # blocks larger than T and than the cache
    ],
)  # fmt: skip
def test_blockwise_attention_is_causal_attention_over_the_cache(
    num_new, cache_size, context, block_q, block_k
):
    q, cache, positions, lengths, _ = _inputs(num_new, cache_size, context, seed=3)
    out, reads = blockwise_attention(q, cache.k, cache.v, lengths, block_q=block_q, block_k=block_k)
    visible = np.arange(cache_size)[None, None, :] <= np.asarray(positions)[:, :, None]
    np.testing.assert_allclose(out, _reference(q, cache.k, cache.v, visible), rtol=2e-5, atol=2e-5)
    assert reads.tolist() == [c + num_new for c in context]


def test_blockwise_attention_reads_no_key_past_the_last_query():
    """Keys past every query's position never reach the output: NaN there changes nothing."""
    num_new, size, context = 21, 128, [10, 30]  # the last query block has padding
    q, cache, positions, lengths, _ = _inputs(num_new, size, context, seed=4)
    past = np.arange(size)[None, :, None, None] > np.asarray(positions)[:, -1:, None, None]
    poisoned = LayerCache(jnp.where(past, jnp.nan, cache.k), jnp.where(past, jnp.nan, cache.v))
    out, _ = blockwise_attention(q, poisoned.k, poisoned.v, lengths, block_q=8, block_k=16)
    assert np.isfinite(np.asarray(out)).all()
    expected, _ = blockwise_attention(q, cache.k, cache.v, lengths, block_q=8, block_k=16)
    np.testing.assert_array_equal(out, expected)


def test_prefill_read_matches_the_whole_cache_xla_path():
    """A dense read of many tokens ("prefill") equals the XLA path over the whole cache."""
    num_new, size, context = MAX_KERNEL_TOKENS + 9, 96, [0, 37]
    q, cache, positions, lengths, _ = _inputs(num_new, size, context, seed=5)
    blockwise = attend(q, cache, positions, lengths, DENSE, backend="reference")
    whole = attend(q, cache, positions, lengths, DENSE, backend="reference", return_summary=True)
    np.testing.assert_allclose(blockwise.out, whole.out, rtol=2e-5, atol=2e-5)
    assert blockwise.kv_read.tolist() == whole.kv_read.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("context", [[0, 0], [0, 40]], ids=["first-chunk", "later-chunk"])
def test_prefill_attention_on_gpu_matches_blockwise_in_bf16(context):
    """On a GPU in bf16, a first chunk takes cuDNN; both branches match the blockwise path."""
    keys = jax.random.split(jax.random.key(6), 3)
    batch, num_new, size, heads, kv_heads, dim = 2, 384, 512, 8, 2, 128
    q = jax.random.normal(keys[0], (batch, num_new, heads, dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, size, kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, size, kv_heads, dim), jnp.bfloat16)
    lengths = jnp.asarray(context, jnp.int32)
    out, _ = jax.jit(prefill_attention)(q, k, v, lengths)
    expected, _ = blockwise_attention(q, k, v, lengths, block_q=128, block_k=128)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2, rtol=2e-2
    )
