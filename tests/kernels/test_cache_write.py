"""write_new_rows (Pallas) against `scatter_rows`, its reference by another route (XLA's
scatter), and the model's step writing its cache through it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels.cache_write as cw
from pallas_kernels import scatter_rows
from specattn_jax import cache as cache_lib
from specattn_jax import model as model_lib
from specattn_jax.config import LlamaConfig
from specattn_jax.testing.tiny_models import tiny_hf_config
from tests.kernels.base import KernelTestBase


def random_caches(key, batch, seq_len, num_new, num_kv_heads, head_dim, dtype):
    """Random (never zero) caches and new rows, so an unwritten or misplaced row shows."""
    keys = jax.random.split(key, 4)
    cache_shape = (batch, seq_len, num_kv_heads, head_dim)
    new_shape = (batch, num_new, num_kv_heads, head_dim)
    shapes = (cache_shape, cache_shape, new_shape, new_shape)
    return [
        jax.random.normal(k, shape, jnp.float32).astype(dtype)
        for k, shape in zip(keys, shapes, strict=True)
    ]


class CacheWriteCases(KernelTestBase):
    def write(self, *args):
        return cw.write_new_rows(*args, interpret=self.INTERPRET)

    @pytest.mark.parametrize("num_new", [1, 5, 16])
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_matches_scatter(self, num_new, dtype):
        """Rows at the start, the middle, running past the end (dropped) and wholly past it,
        for 1, 5 (not a power of two) and 16 new tokens: bit-equal to the scatter."""
        seq_len = 40 if self.INTERPRET else 4096
        num_kv_heads, head_dim = (2, 16) if self.INTERPRET else (8, 128)
        k_cache, v_cache, k_new, v_new = random_caches(
            jax.random.key(num_new), 4, seq_len, num_new, num_kv_heads, head_dim, dtype
        )
        starts = jnp.asarray([0, seq_len // 2 + 1, seq_len - 3, seq_len + 2], jnp.int32)
        got_k, got_v = self.write(k_cache, v_cache, starts, k_new, v_new)
        positions = starts[:, None] + jnp.arange(num_new, dtype=jnp.int32)
        np.testing.assert_array_equal(got_k, scatter_rows(k_cache, positions, k_new))
        np.testing.assert_array_equal(got_v, scatter_rows(v_cache, positions, v_new))

    def test_model_step_writes_with_the_kernel(self, monkeypatch):
        """A decode and a verify step (bf16, batch 2, ragged) writing through the kernel
        against the same model writing through XLA's scatter: the kernel runs once a layer,
        and the caches and logits are equal."""
        calls = []

        def counted(*args, **kwargs):
            calls.append(args[2].shape)
            return cw.write_new_rows(*args, **kwargs, interpret=self.INTERPRET)

        monkeypatch.setattr(cache_lib, "write_new_rows", counted)
        config = LlamaConfig.from_hf(tiny_hf_config(num_kv_heads=2) | {"head_dim": 16})
        model = model_lib.Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(model)
        tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, model.config.vocab_size)
        cache = model.init_cache(2, 64)
        _, cache = model.prefill(tokens, cache, num_tokens=jnp.asarray([24, 11]))

        @functools.partial(jax.jit, static_argnames="kernel")
        def step(state, cache, new_tokens, kernel):
            del kernel  # the static key that keeps the two traces apart
            return nnx.merge(graphdef, state)(new_tokens, cache)

        for num_new in (1, 5):
            results = []
            for kernel in (True, False):
                monkeypatch.setattr(
                    model_lib.Llama, "write_kernel", lambda *_, kernel=kernel: kernel
                )
                logits, written, _ = step(state, cache, tokens[:, :num_new], kernel)
                results.append((logits, *written.k, *written.v))
            for got, want in zip(*results, strict=True):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert calls == [(2,), (2,)] * 2  # one write a layer, starts i32[B]


@pytest.mark.gpu
class CacheWriteTest(CacheWriteCases):
    __test__ = True
    INTERPRET = False

    def test_writes_in_place(self):
        """Under jit with the caches donated, the outputs are the donated buffers."""
        k_cache, v_cache, k_new, v_new = random_caches(
            jax.random.key(0), 1, 1024, 5, 8, 128, jnp.bfloat16
        )
        pointers = (k_cache.unsafe_buffer_pointer(), v_cache.unsafe_buffer_pointer())
        write = jax.jit(cw.write_new_rows, donate_argnums=(0, 1))
        k_out, v_out = write(k_cache, v_cache, jnp.asarray([7], jnp.int32), k_new, v_new)
        assert (k_out.unsafe_buffer_pointer(), v_out.unsafe_buffer_pointer()) == pointers


class CacheWriteInterpretTest(CacheWriteCases):
    __test__ = True
    INTERPRET = True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_new=17), "1 to 16 rows"),
        (dict(head_dim=24), "powers of two"),
        (dict(seq_len=3, num_new=3), "lanes fitting the cache"),
        (dict(starts_shape=(2,)), "starts must be i32"),
        (dict(new_heads=1), "must be \\[B, T, H_kv, D\\]"),
    ],
)
def test_bad_inputs_raise(change, message):
    shape = dict(batch=1, seq_len=64, num_new=5, head_dim=16) | {
        k: v for k, v in change.items() if k in ("seq_len", "num_new", "head_dim")
    }
    k_cache, v_cache, k_new, v_new = random_caches(
        jax.random.key(0), shape["batch"], shape["seq_len"], shape["num_new"], 2,
        shape["head_dim"], jnp.float32,
    )  # fmt: skip
    if "new_heads" in change:
        k_new = v_new = k_new[:, :, :1]
    starts = jnp.zeros(change.get("starts_shape", (1,)), jnp.int32)
    with pytest.raises(ValueError, match=message):
        cw.write_new_rows(k_cache, v_cache, starts, k_new, v_new, interpret=True)
