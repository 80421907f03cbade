"""sparse_verify_attention (Pallas) against its jnp reference, and the reference against an
independent float64 gather formulation."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from tests.kernels.base import KernelTestBase
from tests.tolerances import tolerance

# The module (the package re-exports a function of the same name).
svmod = importlib.import_module("pallas_kernels.sparse_verify_attention")


@dataclasses.dataclass(frozen=True)
class Case:
    num_queries: int  # T
    heads: str  # "H/H_kv" of the model the case stands for
    head_dim: int
    granularity: int
    dtype: str

    def __str__(self):
        return (
            f"T={self.num_queries}_heads={self.heads}_D={self.head_dim}"
            f"_g={self.granularity}_{self.dtype}"
        )


# Every T, head layout, D, granularity and dtype appears at least once.
CASES = [
    Case(1, "32/8", 64, 1, "float32"),
    Case(5, "32/8", 128, 16, "bfloat16"),
    Case(9, "32/32", 64, 32, "float32"),
    Case(16, "8/1", 64, 64, "float32"),
    Case(5, "32/32", 128, 1, "bfloat16"),
    Case(16, "32/8", 64, 16, "float32"),
    Case(5, "8/1", 128, 32, "float16"),
    Case(9, "24/8", 64, 64, "float32"),
    Case(1, "8/1", 128, 16, "bfloat16"),
]


def make_qkv(key, batch, num_queries, num_heads, num_kv_heads, head_dim, seq_len, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, num_queries, num_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, seq_len, num_kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, seq_len, num_kv_heads, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def causal_attention(q, k, v, lengths):
    """Query t of row b over positions s <= lengths[b] + t, by XLA in float32: dense verify
    attention built another way."""
    num_queries, num_heads = q.shape[1:3]
    group = num_heads // k.shape[2]
    positions = jnp.arange(k.shape[1])
    query_positions = lengths[:, None] + jnp.arange(num_queries)[None, :]
    mask = positions[None, None, :] <= query_positions[:, :, None]  # [B, T, S]
    return jax.nn.dot_product_attention(
        q.astype(jnp.float32),
        jnp.repeat(k, group, axis=2).astype(jnp.float32),
        jnp.repeat(v, group, axis=2).astype(jnp.float32),
        mask=mask[:, None],
        implementation="xla",
    )


def make_selection(key, context_lengths, counts_wanted, seq_len, granularity, junk_tail=True):
    """Shuffled distinct block ids inside each row's context, then junk after the count.

    counts_wanted[b]: number of ids, or -1 for every context block.
    """
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    num_blocks = -(-seq_len // granularity)
    indices = rng.integers(-3, num_blocks + 3, size=(len(context_lengths), num_blocks))
    counts = []
    for b, (length, wanted) in enumerate(zip(context_lengths, counts_wanted, strict=True)):
        context_blocks = -(-int(length) // granularity)
        count = context_blocks if wanted < 0 else min(wanted, context_blocks)
        indices[b, :count] = rng.permutation(context_blocks)[:count]
        if not junk_tail:
            indices[b, count:] = 0
        counts.append(count)
    return jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32)


def readable_positions(indices, counts, lengths, num_queries, seq_len, granularity):
    """bool[B, S] numpy: the positions a selection lets some query read, from the explicit
    set of each listed block's context positions, plus the new tokens."""
    readable = np.zeros((len(lengths), seq_len), bool)
    for b, length in enumerate(np.asarray(lengths)):
        for block in np.asarray(indices[b, : int(counts[b])]):
            start = max(int(block) * granularity, 0)
            readable[b, start : min((int(block) + 1) * granularity, int(length))] = True
        readable[b, length : length + num_queries] = True
    return readable


def gather_attention_f64(q, k, v, indices, counts, lengths, granularity, sm_scale=None):
    """Float64 numpy: softmax over the explicit list of positions each query reads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for b in range(batch):
        length = int(lengths[b])
        context = set()
        for block in np.asarray(indices[b, : int(counts[b])]):
            context.update(
                s for s in range(block * granularity, (block + 1) * granularity) if 0 <= s < length
            )
        for t in range(num_queries):
            positions = np.array(sorted(context) + [length + u for u in range(t + 1)])
            for h in range(num_heads):
                logits = k[b, positions, h // group] @ q[b, t, h] * sm_scale
                probs = np.exp(logits - logits.max())
                out[b, t, h] = probs @ v[b, positions, h // group] / probs.sum()
    return out


class SparseVerifyAttentionCases(KernelTestBase):
    """Shapes scale with the mode: heads as in the named model on GPU, scaled down (ratio
    kept) in interpret mode."""

    def heads(self, name):
        num_heads, num_kv_heads = map(int, name.split("/"))
        if self.INTERPRET:
            group = num_heads // num_kv_heads
            num_kv_heads = min(num_kv_heads, 2 if group > 1 else 4)
            num_heads = num_kv_heads * group
        return num_heads, num_kv_heads

    def seq_len(self):
        return 320 if self.INTERPRET else 32768

    def ragged_lengths(self, num_queries):
        """Context lengths that divide no block, one full row; counts 0, 1, partial, all."""
        seq_len = self.seq_len()
        lengths = [1, 3, 250 if self.INTERPRET else 20001, seq_len - num_queries]
        return jnp.asarray(lengths, jnp.int32), [0, 1, 5 if self.INTERPRET else 100, -1]

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, case):
        num_heads, num_kv_heads = self.heads(case.heads)
        lengths, wanted = self.ragged_lengths(case.num_queries)
        k_inputs, k_select = jax.random.split(jax.random.key(0))
        q, k, v = make_qkv(
            k_inputs,
            len(wanted),
            case.num_queries,
            num_heads,
            num_kv_heads,
            case.head_dim,
            self.seq_len(),
            case.dtype,
        )
        indices, counts = make_selection(
            k_select, lengths, wanted, self.seq_len(), case.granularity
        )
        out = pk.sparse_verify_attention(
            q,
            k,
            v,
            indices,
            counts,
            lengths,
            granularity=case.granularity,
            interpret=self.INTERPRET,
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        assert bool(jnp.isfinite(out).all())
        expected = pk.sparse_verify_attention_reference(
            q, k, v, indices, counts, lengths, granularity=case.granularity
        )
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(expected, np.float32), **tolerance(q.dtype)
        )

    @pytest.mark.parametrize("granularity", [16, 64])
    def test_dense_verify_is_causal_attention(self, granularity):
        num_heads, num_kv_heads = self.heads("32/8")
        num_queries = 5
        seq_len = self.seq_len()
        lengths = jnp.asarray([0, 7, seq_len // 2 + 3, seq_len - num_queries], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(1), 4, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.float32
        )
        out = pk.dense_verify_attention(
            q, k, v, lengths, granularity=granularity, interpret=self.INTERPRET
        )
        assert bool(jnp.isfinite(out).all())
        np.testing.assert_allclose(
            out, causal_attention(q, k, v, lengths), **tolerance(jnp.float32)
        )

    @pytest.mark.parametrize("granularity", [16, 64])
    def test_dense_read_in_order_stops_at_the_context(self, granularity):
        """The dense read (`contiguous`: rows in order, no id lookups) never loads a row past
        each sequence's context and new tokens (NaN there), counts what it loads, and equals
        the same block list read through its ids."""
        num_heads, num_kv_heads = self.heads("32/8")
        num_queries, seq_len = 5, self.seq_len()
        lengths = jnp.asarray([0, 7, seq_len // 2 + 3, seq_len - num_queries], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(3), 4, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.bfloat16
        )
        live = jnp.arange(seq_len)[None, :] < (lengths + num_queries)[:, None]
        k_nan = jnp.where(live[:, :, None, None], k, jnp.nan)
        v_nan = jnp.where(live[:, :, None, None], v, jnp.nan)
        indices, counts = pk.dense_block_list(lengths, seq_len, granularity)
        run = functools.partial(
            pk.sparse_verify_attention, granularity=granularity, return_reads=True,
            interpret=self.INTERPRET,
        )  # fmt: skip
        out, reads = run(q, k_nan, v_nan, indices, counts, lengths, contiguous=True)
        looked_up, _ = run(q, k, v, indices, counts, lengths, contiguous=False)
        assert bool(jnp.isfinite(out).all())
        np.testing.assert_array_equal(
            np.asarray(out, np.float32), np.asarray(looked_up, np.float32)
        )
        expected = np.broadcast_to((lengths + num_queries)[:, None], (4, num_kv_heads))
        np.testing.assert_array_equal(np.asarray(reads), expected)

    def test_selection_past_the_context_is_ignored(self):
        """Blocks beyond the context (including the new tokens' block) select nothing, and
        new tokens are counted once."""
        num_heads, num_kv_heads = self.heads("32/8")
        seq_len, granularity, num_queries = self.seq_len(), 16, 9
        lengths = jnp.asarray([100, 33], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(2), 2, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.float32
        )
        num_blocks = seq_len // granularity
        indices = jnp.tile(jnp.arange(num_blocks, dtype=jnp.int32)[::-1], (2, 1))
        counts = jnp.full((2,), num_blocks, jnp.int32)
        out = pk.sparse_verify_attention(
            q, k, v, indices, counts, lengths, granularity=granularity, interpret=self.INTERPRET
        )
        dense = pk.dense_verify_attention(
            q, k, v, lengths, granularity=granularity, interpret=self.INTERPRET
        )
        np.testing.assert_allclose(out, dense, **tolerance(jnp.float32))

    @pytest.mark.parametrize("granularity", [1, 16])
    def test_unselected_entries_are_never_loaded_and_loads_are_counted(self, granularity):
        """NaN in every K and V row the selection leaves out (junk ids after each count
        included): the output is finite and bit-identical to the clean run's, and the rows
        the kernel counts as loaded are exactly the selected context plus the new tokens."""
        num_heads, num_kv_heads = self.heads("32/8")
        num_queries, seq_len = 5, self.seq_len()
        lengths, wanted = self.ragged_lengths(num_queries)
        k_inputs, k_select = jax.random.split(jax.random.key(10 + granularity))
        q, k, v = make_qkv(
            k_inputs, 4, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.bfloat16
        )
        indices, counts = make_selection(k_select, lengths, wanted, seq_len, granularity)
        readable = readable_positions(indices, counts, lengths, num_queries, seq_len, granularity)
        keep = jnp.asarray(readable)[:, :, None, None]
        k_nan, v_nan = jnp.where(keep, k, jnp.nan), jnp.where(keep, v, jnp.nan)
        run = functools.partial(
            pk.sparse_verify_attention,
            granularity=granularity,
            return_reads=True,
            interpret=self.INTERPRET,
        )
        clean, clean_reads = run(q, k, v, indices, counts, lengths)
        out, reads = run(q, k_nan, v_nan, indices, counts, lengths)
        assert bool(jnp.isfinite(out).all())
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(clean, np.float32))
        expected = np.broadcast_to(readable.sum(-1)[:, None], (4, num_kv_heads))
        np.testing.assert_array_equal(np.asarray(reads), expected)
        np.testing.assert_array_equal(np.asarray(clean_reads), expected)
        # Not vacuous: a dense read of the same cache meets the NaN.
        dense = pk.dense_verify_attention(q, k_nan, v_nan, lengths, interpret=self.INTERPRET)
        assert not bool(jnp.isfinite(dense).all())

    @pytest.mark.parametrize(
        "num_queries, dtype, dense", [(1, "bfloat16", True), (2, "float32", True),
                                      (5, "float32", False)]
    )  # fmt: skip
    def test_summary_is_head_mean_probabilities_over_what_was_read(self, num_queries, dtype, dense):
        """The kernel's summary equals the head-mean of softmax probabilities computed
        independently (float64, over the explicit positions read), sums to 1 per row, is zero
        elsewhere, and stays finite with NaN in every row not read; dense, through the read
        in order that the model's dense layers use."""
        num_heads, num_kv_heads = self.heads("32/8")
        seq_len, granularity = self.seq_len(), 16
        lengths, wanted = self.ragged_lengths(num_queries)
        if dense:
            wanted = [-1] * len(wanted)
        k_inputs, k_select = jax.random.split(jax.random.key(20 + num_queries))
        q, k, v = make_qkv(
            k_inputs, 4, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.dtype(dtype)
        )
        indices, counts = make_selection(k_select, lengths, wanted, seq_len, granularity)
        read = readable_positions(indices, counts, lengths, num_queries, seq_len, granularity)
        keep = jnp.asarray(read)[:, :, None, None]
        k_nan, v_nan = jnp.where(keep, k, jnp.nan), jnp.where(keep, v, jnp.nan)
        if dense:  # the model's dense read: in order (grouped heads), no block list
            out, summary = pk.dense_verify_attention(
                q, k_nan, v_nan, lengths, granularity=granularity, return_summary=True,
                interpret=self.INTERPRET,
            )  # fmt: skip
        else:
            out, summary = pk.sparse_verify_attention(
                q, k_nan, v_nan, indices, counts, lengths, granularity=granularity,
                return_summary=True, interpret=self.INTERPRET,
            )  # fmt: skip
        assert summary.shape == (4, num_queries, seq_len) and summary.dtype == jnp.float32
        assert bool(jnp.isfinite(summary).all()) and bool(jnp.isfinite(out).all())
        # Independent: float64 probabilities over each query's own positions.
        group = num_heads // num_kv_heads
        q64 = np.asarray(q, np.float64).reshape(4, num_queries, num_kv_heads, group, 64)
        k64 = np.asarray(k, np.float64)
        logits = np.einsum("btkgd,bskd->bkgts", q64, k64, optimize=True) / 8.0
        causal = np.arange(seq_len)[None, None, :] <= (
            np.asarray(lengths)[:, None, None] + np.arange(num_queries)[None, :, None]
        )
        visible = read[:, None, :] & causal  # [B, T, S]
        logits = np.where(visible[:, None, None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        expected = (probs / probs.sum(-1, keepdims=True)).mean(axis=(1, 2))
        np.testing.assert_allclose(summary, expected, atol=2e-3 if dtype == "bfloat16" else 1e-5)
        np.testing.assert_allclose(summary.sum(-1), 1.0, rtol=1e-4)
        assert not np.asarray(summary)[~visible].any()
        reference = pk.sparse_verify_attention_reference(
            q, k, v, indices, counts, lengths, granularity=granularity, return_summary=True
        )[1]
        np.testing.assert_allclose(summary, reference, atol=2e-3 if dtype == "bfloat16" else 1e-5)

    @pytest.mark.parametrize("num_splits", [1, 3])
    def test_split_counts_agree(self, num_splits):
        num_heads, num_kv_heads = self.heads("32/8")
        lengths, wanted = self.ragged_lengths(5)
        q, k, v = make_qkv(
            jax.random.key(3), 4, 5, num_heads, num_kv_heads, 64, self.seq_len(), jnp.float32
        )
        indices, counts = make_selection(jax.random.key(4), lengths, wanted, self.seq_len(), 1)
        out, reads = pk.sparse_verify_attention(
            q,
            k,
            v,
            indices,
            counts,
            lengths,
            granularity=1,
            block_sizes=pk.SparseVerifyBlockSizes(block_k=16, num_splits=num_splits),
            return_reads=True,
            interpret=self.INTERPRET,
        )
        assert bool(jnp.isfinite(out).all())
        expected = pk.sparse_verify_attention_reference(
            q, k, v, indices, counts, lengths, granularity=1
        )
        np.testing.assert_allclose(out, expected, **tolerance(jnp.float32))
        readable = readable_positions(indices, counts, lengths, 5, self.seq_len(), 1)
        expected_reads = np.repeat(readable.sum(-1)[:, None], num_kv_heads, axis=1)
        np.testing.assert_array_equal(reads, expected_reads)

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        granularity=st.sampled_from([1, 16]),
        lengths=st.lists(st.integers(0, 150), min_size=3, max_size=3),
        counts=st.lists(st.integers(-1, 12), min_size=3, max_size=3),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_random_selections(self, granularity, lengths, counts, seed):
        """Random lengths, counts and shuffled lists (shapes fixed: one compile each)."""
        if not self.INTERPRET:
            lengths = [x * 100 for x in lengths]
        num_queries = 5
        num_heads, num_kv_heads = self.heads("32/8")
        seq_len = self.seq_len() // 2
        lengths = jnp.asarray(lengths, jnp.int32)
        k_inputs, k_select = jax.random.split(jax.random.key(seed))
        q, k, v = make_qkv(
            k_inputs, 3, num_queries, num_heads, num_kv_heads, 64, seq_len, jnp.float32
        )
        indices, block_counts = make_selection(k_select, lengths, counts, seq_len, granularity)
        out = pk.sparse_verify_attention(
            q,
            k,
            v,
            indices,
            block_counts,
            lengths,
            granularity=granularity,
            interpret=self.INTERPRET,
        )
        assert bool(jnp.isfinite(out).all())
        expected = pk.sparse_verify_attention_reference(
            q, k, v, indices, block_counts, lengths, granularity=granularity
        )
        np.testing.assert_allclose(out, expected, **tolerance(jnp.float32))


@pytest.mark.gpu
class SparseVerifyAttentionTest(SparseVerifyAttentionCases):
    __test__ = True  # collected despite the jax-style name
    INTERPRET = False


class SparseVerifyAttentionInterpretTest(SparseVerifyAttentionCases):
    __test__ = True
    INTERPRET = True


# The reference itself, and the public wrapper's checks (plain jnp, no kernel).


@pytest.mark.parametrize("granularity", [1, 16, 32, 64])
def test_reference_matches_gather_formulation(granularity):
    seq_len, num_queries = 200, 5
    lengths = jnp.asarray([0, 1, 77, seq_len - num_queries], jnp.int32)
    q, k, v = make_qkv(jax.random.key(5), 4, num_queries, 6, 2, 16, seq_len, jnp.float32)
    indices, counts = make_selection(
        jax.random.key(6), lengths, [3, 1, 2, -1], seq_len, granularity
    )
    out = pk.sparse_verify_attention_reference(
        q, k, v, indices, counts, lengths, granularity=granularity
    )
    expected = gather_attention_f64(q, k, v, indices, counts, lengths, granularity)
    np.testing.assert_allclose(out, expected, **tolerance(jnp.float32))


def test_reference_ignores_unselected_finite_garbage():
    """The reference reads every position and masks the logits: large finite garbage outside
    the selection leaves its output and its count unchanged, and a dense read sees it."""
    seq_len, num_queries, granularity = 200, 5, 16
    lengths = jnp.asarray([0, 1, 77, seq_len - num_queries], jnp.int32)
    q, k, v = make_qkv(jax.random.key(11), 4, num_queries, 6, 2, 16, seq_len, jnp.float32)
    indices, counts = make_selection(
        jax.random.key(12), lengths, [3, 1, 2, -1], seq_len, granularity
    )
    readable = readable_positions(indices, counts, lengths, num_queries, seq_len, granularity)
    keep = jnp.asarray(readable)[:, :, None, None]
    garbage = 1e4 * jax.random.normal(jax.random.key(13), k.shape)
    k_bad, v_bad = jnp.where(keep, k, garbage), jnp.where(keep, v, -garbage)
    run = functools.partial(
        pk.sparse_verify_attention_reference, granularity=granularity, return_reads=True
    )
    clean, clean_reads = run(q, k, v, indices, counts, lengths)
    out, reads = run(q, k_bad, v_bad, indices, counts, lengths)
    np.testing.assert_array_equal(out, clean)
    np.testing.assert_array_equal(reads, clean_reads)
    np.testing.assert_array_equal(reads, np.repeat(readable.sum(-1)[:, None], 2, axis=1))
    all_blocks = pk.dense_block_list(lengths, seq_len, granularity)
    dense_bad, _ = run(q, k_bad, v_bad, *all_blocks, lengths)
    dense, _ = run(q, k, v, *all_blocks, lengths)
    assert float(jnp.abs(dense_bad - dense).max()) > 1.0


def test_dispatch_routes_by_backend(monkeypatch):
    """ "reference" runs the reference, "pallas" the kernel, "auto" the kernel exactly where
    the default device is a CUDA GPU and the head dim is supported (routing only: the values
    are compared by the kernel tests above)."""
    calls = []
    for name in ("sparse_verify_attention", "sparse_verify_attention_reference"):
        monkeypatch.setattr(svmod, name, lambda *a, name=name, **kw: calls.append(name))
    args = (jnp.zeros((1, 1, 2, 16)),) + (jnp.zeros((1, 8, 1, 16)),) * 2
    lists = (jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32))
    on_gpu = pk.default_backend() == "pallas"
    for backend, head_dim, expected in [
        ("reference", 16, "sparse_verify_attention_reference"),
        ("pallas", 16, "sparse_verify_attention"),
        ("auto", 16, "sparse_verify_attention" if on_gpu else "sparse_verify_attention_reference"),
        ("auto", 24, "sparse_verify_attention_reference"),  # no kernel for this head dim
    ]:
        q, k, v = (x[..., :head_dim] for x in args)
        pk.sparse_verify_attention_dispatch(q, k, v, *lists, granularity=16, backend=backend)
        assert calls.pop() == expected, (backend, head_dim)
    assert pk.resolve_backend("auto") == pk.default_backend()
    with pytest.raises(ValueError, match="backend"):
        pk.sparse_verify_attention_dispatch(*args, *lists, granularity=16, backend="cuda")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(granularity=8), "granularity"),
        (dict(k=jnp.zeros((2, 64, 3, 16))), "v_cache"),
        (dict(q=jnp.zeros((2, 3, 5, 16))), "multiple"),
        (dict(counts=jnp.zeros((3,), jnp.int32)), "block_counts"),
        (dict(indices=jnp.zeros((2, 4), jnp.float32)), "integers"),
    ],
    ids=["granularity", "kv_shapes", "head_ratio", "counts_shape", "index_dtype"],
)
def test_bad_inputs_raise(change, message):
    q, k, v = make_qkv(jax.random.key(9), 2, 3, 4, 2, 16, 64, jnp.float32)
    args = dict(
        q=q,
        k=k,
        v=v,
        indices=jnp.zeros((2, 4), jnp.int32),
        counts=jnp.zeros((2,), jnp.int32),
        lengths=jnp.zeros((2,), jnp.int32),
        granularity=16,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        pk.sparse_verify_attention(
            args["q"],
            args["k"],
            v,
            args["indices"],
            args["counts"],
            args["lengths"],
            granularity=args["granularity"],
            interpret=True,
        )
