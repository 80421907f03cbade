"""top_p_select (Pallas) against its reference bit for bit, and the reference's top-p
properties against a sort-based float64 top-p."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from tests.kernels.base import KernelTestBase

# The module (the package re-exports a function of the same name).
topmod = importlib.import_module("pallas_kernels.top_p_select")

KINDS = ("softmax", "peaked", "flat", "tied", "zeros", "sparse", "longtail")


def make_row(rng, kind, seq_len):
    """One nonnegative weight row of a named shape."""
    if kind == "softmax":
        x = rng.normal(size=seq_len) * rng.uniform(0.5, 4.0)
        w = np.exp(x - x.max())
    elif kind == "peaked":
        w = rng.uniform(0, 1e-3, size=seq_len)
        w[rng.integers(seq_len)] = 1.0
    elif kind == "flat":
        w = np.full(seq_len, 1.0 / seq_len)
    elif kind == "tied":
        w = rng.choice([0.0, 1 / 64, 3 / 64, 0.25], size=seq_len)
    elif kind == "zeros":
        w = np.zeros(seq_len)
    elif kind == "sparse":
        w = np.where(rng.uniform(size=seq_len) < 0.05, rng.uniform(size=seq_len), 0.0)
    else:  # longtail: log-uniform over 12 decades
        w = 10.0 ** rng.uniform(-12, 0, size=seq_len)
    return (w / max(w.sum(), 1e-30)).astype(np.float32)


def make_weights(seed, num_rows, num_draft_rows, seq_len, kinds=None):
    rng = np.random.default_rng(seed)
    kinds = kinds or [KINDS[i % len(KINDS)] for i in range(num_rows * num_draft_rows)]
    rows = [make_row(rng, kind, seq_len) for kind in kinds]
    return jnp.asarray(np.stack(rows).reshape(num_rows, num_draft_rows, seq_len))


def assert_same_selection(got, expected):
    theta, indices, counts = got
    theta_e, indices_e, counts_e = expected
    assert theta.shape == theta_e.shape and indices.shape == indices_e.shape
    np.testing.assert_array_equal(
        np.asarray(theta).view(np.int32), np.asarray(theta_e).view(np.int32), "theta bits"
    )
    np.testing.assert_array_equal(counts, counts_e, "block_counts")
    np.testing.assert_array_equal(indices, indices_e, "block_indices")


def check_layout(weights, theta, indices, counts, lengths, granularity):
    """block_indices lists exactly the blocks holding a selected position, then FILL_INDEX."""
    weights, theta, indices, counts, lengths = map(
        np.asarray, (weights, theta, indices, counts, lengths)
    )
    num_rows, _, seq_len = weights.shape
    for r in range(num_rows):
        valid = np.arange(seq_len) < lengths[r]
        selected = (valid & (weights[r] >= theta[r][:, None])).any(axis=0)
        blocks = np.unique(np.nonzero(selected)[0] // granularity)
        assert counts[r] == len(blocks)
        np.testing.assert_array_equal(indices[r, : counts[r]], blocks)
        assert (indices[r, counts[r] :] == pk.FILL_INDEX).all()


class TopPSelectCases(KernelTestBase):
    def seq_lens(self):
        """(a one-chunk row, a row of many chunks, the chunk)."""
        return (250, 3000, 512) if self.INTERPRET else (32768, 262144, 2048)

    def route(self, name):
        """Tiling that sends every row through one of the kernels' two routes: "bisect" (the
        row in one program) or "radix" (passes over chunks, several per row)."""
        if name == "bisect":
            return pk.TopPBlockSizes()
        return pk.TopPBlockSizes(max_resident=0, block_s=64 if self.INTERPRET else 2048)

    @pytest.mark.parametrize("route", ["bisect", "radix"])
    @pytest.mark.parametrize("granularity", [1, 16, 32, 64])
    @pytest.mark.parametrize("num_draft_rows", [1, 3], ids=lambda a: f"A={a}")
    def test_matches_reference(self, granularity, num_draft_rows, route):
        seq_len, _, _ = self.seq_lens()
        num_rows = 7
        weights = make_weights(granularity + num_draft_rows, num_rows, num_draft_rows, seq_len)
        p = jnp.asarray([0.9, 0.5, 1e-6, 1.0, 0.999, 0.3, 0.95], jnp.float32)
        lengths = jnp.asarray([seq_len, 1, seq_len - 3, 17, 0, seq_len // 3, seq_len], jnp.int32)
        got = pk.top_p_select(
            weights,
            p,
            lengths,
            granularity=granularity,
            block_sizes=self.route(route),
            interpret=self.INTERPRET,
        )
        expected = pk.top_p_select_reference(weights, p, lengths, granularity=granularity)
        assert_same_selection(got, expected)
        check_layout(weights, *got, lengths, granularity)

    @pytest.mark.parametrize("skew", [0.5, 1.5])
    def test_bisection_checks_its_float_pass(self, monkeypatch, skew):
        """The float bisection only guesses: with its target skewed, the exact check rejects
        the guess and the exact redo still gives the reference's result."""
        seq_len, _, _ = self.seq_lens()
        weights = make_weights(5, 4, 2, seq_len)
        p = jnp.asarray([0.9, 0.5, 0.3, 0.6], jnp.float32)
        lengths = jnp.asarray([seq_len, seq_len - 7, seq_len // 2, 40], jnp.int32)
        monkeypatch.setattr(topmod, "_FLOAT_TARGET_SCALE", skew)
        jax.clear_caches()  # trace again with the skewed target
        try:
            got = pk.top_p_select(weights, p, lengths, granularity=1, interpret=self.INTERPRET)
        finally:
            jax.clear_caches()
        expected = pk.top_p_select_reference(weights, p, lengths, granularity=1)
        assert_same_selection(got, expected)

    @pytest.mark.parametrize("granularity", [1, 16])
    def test_rows_of_many_chunks_match_reference(self, granularity):
        """Rows over several radix chunks and compaction tiles (the default route of a row
        past 32K), lengths ending inside, at and just past a chunk."""
        _, seq_len, block_s = self.seq_lens()
        weights = make_weights(11, 4, 2, seq_len)
        p = jnp.asarray([0.9, 0.99, 0.5, 1e-3], jnp.float32)
        lengths = jnp.asarray([seq_len, seq_len - block_s - 1, block_s, 2 * block_s + 1], jnp.int32)
        got = pk.top_p_select(
            weights,
            p,
            lengths,
            granularity=granularity,
            interpret=self.INTERPRET,
            block_sizes=pk.TopPBlockSizes(max_resident=0, block_s=block_s, block_c=block_s),
        )
        expected = pk.top_p_select_reference(weights, p, lengths, granularity=granularity)
        assert_same_selection(got, expected)
        check_layout(weights, *got, lengths, granularity)

    @pytest.mark.parametrize("route", ["bisect", "radix"])
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        kinds=st.lists(st.sampled_from(KINDS), min_size=6, max_size=6),
        p=st.lists(
            st.one_of(st.sampled_from([1e-7, 0.5, 0.9, 0.999999, 1.0]), st.floats(0.01, 1.0)),
            min_size=3,
            max_size=3,
        ),
        lengths=st.lists(st.integers(0, 200), min_size=3, max_size=3),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_random_rows(self, route, kinds, p, lengths, seed):
        seq_len = 200 if self.INTERPRET else 20000
        if not self.INTERPRET:
            lengths = [x * 100 for x in lengths]
        weights = make_weights(seed, 3, 2, seq_len, kinds)
        p, lengths = jnp.asarray(p, jnp.float32), jnp.asarray(lengths, jnp.int32)
        got = pk.top_p_select(
            weights,
            p,
            lengths,
            granularity=1,
            block_sizes=self.route(route),
            interpret=self.INTERPRET,
        )
        expected = pk.top_p_select_reference(weights, p, lengths, granularity=1)
        assert_same_selection(got, expected)


@pytest.mark.gpu
class TopPSelectTest(TopPSelectCases):
    __test__ = True  # collected despite the jax-style name
    INTERPRET = False


class TopPSelectInterpretTest(TopPSelectCases):
    __test__ = True
    INTERPRET = True


# Properties of the reference (plain jnp, no kernel): what top-p means.


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4),
    p=st.lists(st.floats(1e-6, 0.999999), min_size=4, max_size=4),
    lengths=st.lists(st.integers(1, 300), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_is_top_p(kinds, p, lengths, seed):
    """The reference keeps the fewest largest weights whose mass reaches p, ties kept: the
    kept mass reaches p, that above theta does not (float64 sums, within the fixed point's
    resolution), and theta is a weight of the row."""
    weights = make_weights(seed, 4, 1, 300, kinds)
    theta, _, _ = pk.top_p_select_reference(
        weights, jnp.asarray(p, jnp.float32), jnp.asarray(lengths, jnp.int32), granularity=1
    )
    for r in range(4):
        row = np.asarray(weights[r, 0, : lengths[r]], np.float64)
        cut = float(theta[r, 0])
        total, top = row.sum(), row.max()
        resolution = len(row) * top * 2.0**-40 + 2.0**-30 * total  # limbs, and p rounded up
        target = np.float32(p[r]) * total
        assert row[row >= cut].sum() >= target - resolution
        assert row[row > cut].sum() < target + resolution or total == 0
        assert cut in row


@pytest.mark.parametrize("granularity", [1, 16, 32, 64])
def test_reference_edge_rows(granularity):
    """p = 1 keeps every valid entry (zeros too); tiny p keeps the max and its ties; a row
    without valid entries keeps nothing; all-zero rows keep everything valid."""
    seq_len = 130
    weights = np.full((4, 2, seq_len), 0.5 / seq_len, np.float32)
    weights[0, :, ::3] = 0.0
    weights[1, 0, [5, 77]] = 1.0
    weights[1, 1] = weights[1, 0]
    weights[3] = 0.0
    p = jnp.asarray([1.0, 1e-7, 0.9, 0.5], jnp.float32)
    lengths = jnp.asarray([seq_len, seq_len, 0, 100], jnp.int32)
    theta, indices, counts = pk.top_p_select_reference(
        jnp.asarray(weights), p, lengths, granularity=granularity
    )
    num_blocks = -(-seq_len // granularity)
    assert int(counts[0]) == num_blocks and float(theta[0, 0]) == 0.0
    np.testing.assert_array_equal(
        indices[1, : int(counts[1])], np.unique(np.array([5, 77]) // granularity)
    )
    assert int(counts[2]) == 0 and (np.asarray(indices[2]) == pk.FILL_INDEX).all()
    assert int(counts[3]) == -(-100 // granularity)
    check_layout(weights, theta, indices, counts, lengths, granularity)


def test_exact_reference_agrees_on_simple_rows():
    weights = jnp.asarray([[[0.5, 0.25, 0.125, 0.125]]], jnp.float32)
    for p, count in ((0.5, 1), (0.6, 2), (0.8, 4), (1.0, 4)):
        args = (weights, jnp.asarray([p], jnp.float32), jnp.asarray([4], jnp.int32))
        _, _, counts = pk.top_p_select_reference(*args, granularity=1)
        _, _, counts_exact = pk.top_p_exact_reference(*args, granularity=1)
        assert int(counts[0]) == int(counts_exact[0]) == count


def test_dispatch_routes_by_backend(monkeypatch):
    """ "reference" runs the reference, "pallas" the kernel, "auto" the kernel exactly where
    the default device is a CUDA GPU (routing only: the kernel tests compare the values)."""
    calls = []
    for name in ("top_p_select", "top_p_select_reference"):
        monkeypatch.setattr(topmod, name, lambda *a, name=name, **kw: calls.append(name))
    args = (make_weights(3, 2, 2, 100), jnp.asarray([0.9, 0.3]), jnp.asarray([100, 41]))
    on_gpu = pk.default_backend() == "pallas"
    for backend, expected in [
        ("reference", "top_p_select_reference"),
        ("pallas", "top_p_select"),
        ("auto", "top_p_select" if on_gpu else "top_p_select_reference"),
    ]:
        pk.top_p_select_dispatch(*args, granularity=16, backend=backend)
        assert calls.pop() == expected, backend
    with pytest.raises(ValueError, match="backend"):
        pk.top_p_select_dispatch(*args, granularity=16, backend="cuda")
