"""verify_attention_mgpu (Pallas Mosaic GPU: TMA and wgmma) against dense causal attention
computed by XLA, and against the Triton kernel's dense read."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import verify_attention_mgpu as mgpu
from tests.kernels.base import KernelTestBase
from tests.kernels.test_sparse_verify_attention import causal_attention, make_qkv
from tests.tolerances import tolerance


@dataclasses.dataclass(frozen=True)
class Case:
    num_queries: int  # T
    heads: str  # "H/H_kv" of the model the case stands for
    head_dim: int
    dtype: str

    def __str__(self):
        return f"T={self.num_queries}_heads={self.heads}_D={self.head_dim}_{self.dtype}"


# The TinyLlama draft's decode, Llama-3-8B's and Llama-2-7B's verify, a verify of 9 tokens,
# and a full 64-row tile.
CASES = [
    Case(1, "32/4", 64, "bfloat16"),
    Case(5, "32/8", 128, "bfloat16"),
    Case(5, "32/32", 128, "bfloat16"),
    Case(9, "32/8", 64, "float16"),
    Case(16, "16/4", 64, "bfloat16"),
]


def _interpret_mode_available() -> bool:
    try:
        mgpu._interpret_params()
    except ImportError:
        return False
    return True


def _hopper_skip_reason() -> str | None:
    device = jax.devices()[0]
    if device.platform == "gpu" and not mgpu.on_hopper():
        capability = getattr(device, "compute_capability", "?")
        return f"the Mosaic GPU kernel is built for Hopper (sm90); this GPU is sm{capability}"
    return None


class VerifyAttentionMgpuCases(KernelTestBase):
    """Shapes scale with the mode: heads as in the named model and a 32K cache on GPU; two KV
    heads (the group kept) and a short cache in interpret mode."""

    @pytest.fixture(autouse=True)
    def _backend(self):
        if self.INTERPRET and not _interpret_mode_available():
            pytest.skip("this jax has no Mosaic GPU interpret mode")
        reason = None if self.INTERPRET else _hopper_skip_reason()
        if reason is not None:
            pytest.skip(reason)

    def heads(self, name):
        num_heads, num_kv_heads = map(int, name.split("/"))
        if self.INTERPRET:
            group = num_heads // num_kv_heads
            num_kv_heads = min(num_kv_heads, 2)
            num_heads = num_kv_heads * group
        return num_heads, num_kv_heads

    def seq_len(self):
        """Not a multiple of block_k: the last step's box is clamped to the cache's end."""
        return 300 if self.INTERPRET else 32800

    def run(self, q, k, v, lengths, **kwargs):
        return mgpu.verify_attention_mgpu(q, k, v, lengths, interpret=self.INTERPRET, **kwargs)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_causal_attention(self, case):
        num_heads, num_kv_heads = self.heads(case.heads)
        seq_len = self.seq_len()
        lengths = jnp.asarray([0, 7, seq_len // 2 + 3, seq_len - case.num_queries], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(0), 4, case.num_queries, num_heads, num_kv_heads, case.head_dim,
            seq_len, case.dtype,
        )  # fmt: skip
        out = self.run(q, k, v, lengths)
        assert out.shape == q.shape and out.dtype == q.dtype
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(causal_attention(q, k, v, lengths)),
            **tolerance(q.dtype),
        )

    @pytest.mark.parametrize(
        "block_sizes",
        [
            mgpu.BlockSizes(num_splits=1),  # many steps per program: the ring refills
            mgpu.BlockSizes(block_k=128, num_stages=2, num_splits=3),
            mgpu.BlockSizes(num_stages=4, num_splits=64),  # splits with no rows
        ],
        ids=["one_split", "block_k=128_two_stages", "64_splits"],
    )
    def test_rows_past_the_context_are_masked_and_reads_counted(self, block_sizes):
        """Rows past each sequence's context and new tokens hold large finite garbage (the
        kernel loads whole boxes, so they must be finite: the library's caches are): the
        output ignores them whatever the tiling, and each (sequence, KV head) reports reading
        exactly its context and new tokens."""
        num_heads, num_kv_heads = self.heads("32/8")
        num_queries, seq_len = 5, self.seq_len()
        lengths = jnp.asarray([0, 130, seq_len - num_queries], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(1), 3, num_queries, num_heads, num_kv_heads, 64, seq_len, "bfloat16"
        )
        live = (jnp.arange(seq_len)[None, :] < (lengths + num_queries)[:, None])[..., None, None]
        garbage = jnp.asarray(3e4, k.dtype)
        out, reads = self.run(
            q, jnp.where(live, k, garbage), jnp.where(live, v, garbage), lengths,
            block_sizes=block_sizes, return_reads=True,
        )  # fmt: skip
        np.testing.assert_allclose(
            np.asarray(out, np.float32),
            np.asarray(causal_attention(q, k, v, lengths)),
            **tolerance(q.dtype),
        )
        np.testing.assert_array_equal(
            np.asarray(reads), np.broadcast_to((lengths + num_queries)[:, None], reads.shape)
        )

    def test_agrees_with_the_triton_kernel(self):
        num_heads, num_kv_heads = self.heads("32/8")
        num_queries, seq_len = 5, self.seq_len()
        lengths = jnp.asarray([3, seq_len // 3, seq_len - num_queries], jnp.int32)
        q, k, v = make_qkv(
            jax.random.key(2), 3, num_queries, num_heads, num_kv_heads, 128, seq_len, "bfloat16"
        )
        out, reads = self.run(q, k, v, lengths, return_reads=True)
        triton, triton_reads = pk.dense_verify_attention(
            q, k, v, lengths, return_reads=True, interpret=self.INTERPRET
        )
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(triton, np.float32), **tolerance(q.dtype)
        )
        np.testing.assert_array_equal(np.asarray(reads), np.asarray(triton_reads))


@pytest.mark.gpu
class VerifyAttentionMgpuTest(VerifyAttentionMgpuCases):
    __test__ = True
    INTERPRET = False


class VerifyAttentionMgpuInterpretTest(VerifyAttentionMgpuCases):
    __test__ = True
    INTERPRET = True


@pytest.mark.parametrize(
    "q_shape, cache_shape, dtype, takes",
    [
        ((1, 5, 32, 128), (1, 4096, 8, 128), jnp.bfloat16, True),
        ((1, 1, 32, 64), (1, 64, 4, 64), jnp.float16, True),
        ((1, 5, 32, 128), (1, 4096, 8, 128), jnp.float32, False),  # no f32 wgmma path
        ((1, 5, 32, 96), (1, 4096, 8, 96), jnp.bfloat16, False),  # D not 64 or 128
        ((1, 9, 64, 128), (1, 4096, 8, 128), jnp.bfloat16, False),  # 72 rows per KV head
        ((1, 5, 32, 128), (1, 32, 8, 128), jnp.bfloat16, False),  # cache under one box
    ],
)
def test_supports(q_shape, cache_shape, dtype, takes):
    assert mgpu.supports(q_shape, cache_shape, dtype) is takes


def test_unsupported_call_raises_with_the_shapes():
    q = jnp.zeros((1, 5, 32, 96), jnp.bfloat16)
    k = jnp.zeros((1, 4096, 8, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"D in \(64, 128\).*\(1, 5, 32, 96\)"):
        mgpu.verify_attention_mgpu(q, k, k, jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("change", ["block_k", "num_stages"])
def test_bad_block_sizes_raise(change):
    with pytest.raises(ValueError, match=change):
        mgpu.BlockSizes(**{change: 1})


def test_kernel_lowers_for_a_gpu_on_any_machine():
    """The GPU path (wgmma, TMA, layouts) lowers to Mosaic GPU for CUDA here too: what CPU
    CI can check of the code the interpret mode does not run."""
    export = pytest.importorskip("jax.export")
    shapes = [((1, 1, 32, 64), (1, 32832, 4, 64)), ((2, 5, 32, 128), (2, 4160, 8, 128))]
    for q_shape, cache_shape in shapes:
        run = jax.jit(functools.partial(mgpu.verify_attention_mgpu, return_reads=True))
        shapes_in = (q_shape, cache_shape, cache_shape)
        arrays = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes_in]
        exported = export.export(
            run,
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*arrays, jax.ShapeDtypeStruct((q_shape[0],), jnp.int32))
        assert "mosaic_gpu" in exported.mlir_module()
