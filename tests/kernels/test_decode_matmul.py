"""decode_matmul (Pallas) against its op-by-op jnp reference, and the model's fused decode
and verify steps against its XLA path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels.decode_matmul as dm
from specattn_jax import model as model_lib
from specattn_jax.testing.tiny_models import tiny_llama
from tests.kernels.base import KernelTestBase
from tests.tolerances import tolerance


@dataclasses.dataclass(frozen=True)
class Case:
    rows: int
    epilogue: str | None
    norm: bool

    def __str__(self):
        return f"rows{self.rows}-{self.epilogue or 'plain'}-{'norm' if self.norm else 'raw'}"


CASES = [
    Case(1, None, True),  # the QKV projection of a decode step
    Case(5, None, True),  # ... of a verify step
    Case(1, "residual", False),  # the output and down projections
    Case(9, "residual", False),
    Case(1, "swiglu", True),  # gate/up with SwiGLU
    Case(16, "swiglu", True),
    Case(3, None, False),
]


def make_inputs(key, case: Case, k_dim: int, n_dim: int, dtype):
    """x [1, rows, K] and the weight (and norm weight, residual) the case needs, random."""
    keys = jax.random.split(key, 4)
    x = (2.0 * jax.random.normal(keys[0], (1, case.rows, k_dim))).astype(dtype)
    w_shape = (k_dim, 2, n_dim) if case.epilogue == "swiglu" else (k_dim, n_dim)
    w = (jax.random.normal(keys[1], w_shape) / np.sqrt(k_dim)).astype(dtype)
    kwargs = {"epilogue": case.epilogue}
    if case.norm:
        norm_weight = 1.0 + 0.2 * jax.random.normal(keys[2], (k_dim,))
        kwargs.update(norm_weight=norm_weight.astype(dtype), eps=1e-5)
    if case.epilogue == "residual":
        kwargs["residual"] = jax.random.normal(keys[3], (1, case.rows, n_dim)).astype(dtype)
    return x, w, kwargs


class DecodeMatmulCases(KernelTestBase):
    """GPU: a TinyLlama-shaped layer (K = 2048, N = 2560 or F = 5632); interpret: K = 384,
    N = 128."""

    def dims(self, epilogue):
        if self.INTERPRET:
            return 384, 128
        return 2048, 5632 if epilogue == "swiglu" else 2560

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, case, dtype):
        if self.INTERPRET and dtype == jnp.float16:
            pytest.skip("interpret mode covers bf16; the GPU class both half types")
        k_dim, n_dim = self.dims(case.epilogue)
        x, w, kwargs = make_inputs(jax.random.key(case.rows), case, k_dim, n_dim, dtype)
        out = dm.decode_matmul(x, w, interpret=self.INTERPRET, **kwargs)
        expected = dm.decode_matmul_reference(x, w, **kwargs)
        assert out.shape == expected.shape == (1, case.rows, n_dim) and out.dtype == dtype
        assert bool(jnp.isfinite(out).all())
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(expected, np.float32), **tolerance(dtype)
        )

    @pytest.mark.parametrize("block_n, block_k", [(16, 64), (32, 128), (64, 32)])
    def test_tilings_agree(self, block_n, block_k):
        case = Case(5, "swiglu", True)
        k_dim, n_dim = self.dims(case.epilogue)
        x, w, kwargs = make_inputs(jax.random.key(7), case, k_dim, n_dim, jnp.bfloat16)
        sizes = dm.BlockSizes(block_n=block_n, block_k=block_k)
        out = dm.decode_matmul(x, w, block_sizes=sizes, interpret=self.INTERPRET, **kwargs)
        expected = dm.decode_matmul_reference(x, w, **kwargs)
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(expected, np.float32),
            **tolerance(jnp.bfloat16),
        )  # fmt: skip

    @pytest.mark.parametrize("num_tokens", [1, 5])
    def test_fused_model_step_matches_xla(self, num_tokens, monkeypatch):
        """A decode (1 token) and a verify (5 tokens) step of a bf16 model, batch 2, with the
        fused kernels against the same model multiplying op by op in XLA: the kernels run
        (four a layer), and the logits and cache agree."""
        mode = "interpret" if self.INTERPRET else "fused"
        fused = tiny_llama(seed=3, dtype=jnp.bfloat16, num_layers=2, num_kv_heads=2)
        fused.matmul_mode = mode
        plain = tiny_llama(seed=3, dtype=jnp.bfloat16, num_layers=2, num_kv_heads=2)
        plain.matmul_mode = "xla"
        calls = []
        kernel = model_lib.decode_matmul

        def counted(*args, **kwargs):
            calls.append(kwargs.get("epilogue"))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(model_lib, "decode_matmul", counted)
        tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, fused.config.vocab_size)
        results = []
        for model in (fused, plain):
            graphdef, state = nnx.split(model)
            cache = model.init_cache(2, 64)
            _, cache = model.prefill(tokens, cache, num_tokens=jnp.asarray([24, 11]))
            step = jax.jit(lambda state, cache, graphdef=graphdef: nnx.merge(graphdef, state)(
                tokens[:, :num_tokens], cache))  # fmt: skip
            logits, cache, _ = step(state, cache)
            results.append((logits, cache.k[1], cache.v[1]))
        assert calls == [None, "residual", "swiglu", "residual"] * 2
        for got, want in zip(results[0], results[1], strict=True):
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=5e-2, atol=5e-2
            )


@pytest.mark.gpu
class DecodeMatmulTest(DecodeMatmulCases):
    __test__ = True
    INTERPRET = False


class DecodeMatmulInterpretTest(DecodeMatmulCases):
    __test__ = True
    INTERPRET = True


def test_reference_is_the_model_arithmetic():
    """The reference (a route of its own: one 2-D matmul) equals the model's XLA ops."""
    config = tiny_llama(num_layers=1).config
    model = tiny_llama(seed=2, dtype=jnp.bfloat16, num_layers=1)
    layer = model.layers[0]
    x = jax.random.normal(jax.random.key(0), (2, 3, config.hidden_size)).astype(jnp.bfloat16)
    norm = layer.post_attention_layernorm
    mlp = layer.mlp(x, norm, None)
    hidden = dm.decode_matmul_reference(
        x, layer.mlp.gate_up_proj[...], norm_weight=norm.weight[...], eps=norm.eps,
        epilogue="swiglu",
    )  # fmt: skip
    fused = dm.decode_matmul_reference(
        hidden, layer.mlp.down_proj[...], residual=x, epilogue="residual"
    )
    np.testing.assert_allclose(
        np.asarray(fused, np.float32), np.asarray(mlp, np.float32), **tolerance(jnp.bfloat16)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rows=17), "1 to 16 rows"),
        (dict(k_dim=40), "multiples of 16"),
        (dict(epilogue="swiglu"), r"swiglu needs w \[K, 2, F\]"),
        (dict(epilogue="residual"), "a residual goes with"),
        (dict(epilogue="gelu"), "epilogue='gelu' must be one of"),
        (dict(norm_weight=True), "norm_weight and eps go together"),
    ],
)
def test_bad_inputs_raise(change, message):
    rows, k_dim = change.pop("rows", 2), change.pop("k_dim", 64)
    x = jnp.ones((rows, k_dim), jnp.bfloat16)
    w = jnp.ones((k_dim, 32), jnp.bfloat16)
    if change.pop("norm_weight", False):
        change["norm_weight"] = jnp.ones((k_dim,), jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        dm.decode_matmul(x, w, interpret=True, **change)
