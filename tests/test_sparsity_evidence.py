"""Evidence that sparse verification reads only what its plan selects, and that the KV-read
statistics count what the attention read: one forward with a sparse plan, and a whole
SpecAttn `generate`, each with every unselected KV entry of the sparse layers poisoned.

The masks of what may be read are built here from the block lists by plain comparison
(`readable_positions`), not by the library's selection or mask code. The CPU classes run the
jnp reference (which computes logits over every position and masks them, so it gets large
finite garbage); the GPU classes run the Pallas kernel, which must never load an unselected
entry, so it gets NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specattn_jax.attention as attention_module
from specattn_jax import sharding
from specattn_jax.attention import AttentionPlan, dense_attention
from specattn_jax.cache import KVCache
from specattn_jax.layer_map import LayerMap, calibrate
from specattn_jax.loading import ASSETS, load_pretrained
from specattn_jax.model import forward
from specattn_jax.selection import sparse_layer_flags
from specattn_jax.selection.baselines import StreamingLLM
from specattn_jax.speculative import SpecConfig, generate
from specattn_jax.testing import perturbed_copy
from tests.kernels.base import KernelTestBase

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the",
    "Tom had a big red ball. He",
]
BOOK_PROMPTS = [
    "It was a dark and stormy night, and the wind howled over the moor. The old house",
    "When I came into the room, she",
]


def readable_positions(
    block_indices: jax.Array,  # i32[B, N]
    block_counts: jax.Array,  # i32[B]
    context_lengths: jax.Array,  # i32[B]
    num_new: int,
    size: int,
    granularity: int,
) -> jax.Array:
    """bool[B, S]: the positions a sparse layer may read: context positions whose block is
    listed (compared with every listed id), and the num_new new tokens."""
    positions = jnp.arange(size)[None, :]
    listed = jnp.arange(block_indices.shape[1])[None, :] < block_counts[:, None]
    in_listed_block = (positions[:, :, None] // granularity == block_indices[:, None, :]) & listed[
        :, None, :
    ]
    context = context_lengths[:, None]
    selected = in_listed_block.any(-1) & (positions < context)
    return selected | ((positions >= context) & (positions < context + num_new))


def finite_garbage(x: jax.Array) -> jax.Array:
    """Keys and values far outside anything a model produces (finite)."""
    return (1e4 * jax.random.normal(jax.random.key(7), x.shape, jnp.float32)).astype(x.dtype)


def nan_garbage(x: jax.Array) -> jax.Array:
    return jnp.full_like(x, jnp.nan)


def _poison(x, keep, garbage):  # x [B, S, H_kv, D], keep bool[B, S]
    return jnp.where(keep[:, :, None, None], x, garbage(x))


def _copy(cache):
    return jax.tree.map(jnp.copy, cache)


def _random_block_lists(rng, context_lengths, num_layers, size, granularity, fraction=0.3):
    """i32[L, B, N] ascending random subsets (about `fraction`) of each row's context blocks,
    and i32[L, B] counts."""
    num_slots = size // granularity
    indices = np.zeros((num_layers, len(context_lengths), num_slots), np.int32)
    counts = np.zeros((num_layers, len(context_lengths)), np.int32)
    for layer in range(num_layers):
        for row, context in enumerate(context_lengths):
            blocks = -(-int(context) // granularity)
            chosen = np.sort(rng.choice(blocks, max(1, int(fraction * blocks)), replace=False))
            indices[layer, row, : len(chosen)] = chosen
            counts[layer, row] = len(chosen)
    return jnp.asarray(indices), jnp.asarray(counts)


class ForwardSparsityCases:
    """One verifier forward (T = 5 new tokens, ragged contexts) with a sparse plan."""

    BACKEND = "reference"
    GARBAGE = staticmethod(finite_garbage)
    DTYPE = jnp.float32

    @pytest.fixture(scope="class")
    @classmethod
    def verifier(cls):
        return load_pretrained("bundled:verifier", cls.DTYPE)[0]

    @pytest.mark.parametrize("granularity", [1, 16])
    def test_unselected_entries_are_not_read_and_reads_are_counted(self, verifier, granularity):
        size, num_new = 256, 5
        context = jnp.array([200, 37, 130], jnp.int32)
        rng = np.random.default_rng(granularity)
        tokens = jnp.asarray(rng.integers(3, 8000, (3, size)), jnp.int32)
        graphdef, state = nnx.split(verifier)
        _, cache, _ = forward(
            graphdef, state, tokens, verifier.init_cache(3, size), context, backend=self.BACKEND
        )
        new_tokens = tokens[:, -num_new:]
        num_layers = verifier.config.num_hidden_layers
        sparse_layers = sparse_layer_flags(num_layers, 2)
        indices, counts = _random_block_lists(rng, context, num_layers, size, granularity)
        plan = AttentionPlan(indices, counts, granularity, sparse_layers)
        keep = [
            readable_positions(indices[layer], counts[layer], context, num_new, size, granularity)
            for layer in range(num_layers)
        ]
        poison = lambda layer, x: (  # noqa: E731
            _poison(x, keep[layer], self.GARBAGE) if sparse_layers[layer] else x
        )
        poisoned = KVCache(
            k=tuple(poison(layer, k) for layer, k in enumerate(cache.k)),
            v=tuple(poison(layer, v) for layer, v in enumerate(cache.v)),
            lengths=cache.lengths,
        )

        def run(cache, plan):
            return forward(
                graphdef, state, new_tokens, _copy(cache), plan=plan, backend=self.BACKEND
            )

        sparse_logits, _, info = run(cache, plan)
        poisoned_logits, _, poisoned_info = run(poisoned, plan)
        assert bool(jnp.isfinite(poisoned_logits).all())
        np.testing.assert_array_equal(np.asarray(poisoned_logits), np.asarray(sparse_logits))

        # The counts come from the attention that read, and equal the masks built here.
        expected = np.array([np.asarray(k).sum(-1) for k in keep])
        expected[~np.array(sparse_layers)] = np.asarray(context) + num_new
        np.testing.assert_array_equal(np.asarray(info.kv_read), expected)
        np.testing.assert_array_equal(np.asarray(poisoned_info.kv_read), expected)

        # Not vacuous: the sparse output is not the dense one, and the poison is visible to a
        # dense read.
        dense_logits, _, _ = run(cache, None)
        assert float(jnp.abs(dense_logits - sparse_logits).max()) > 1e-2
        poisoned_dense, _, _ = run(poisoned, None)
        assert not np.allclose(np.asarray(poisoned_dense), np.asarray(dense_logits), atol=1e-1)


class ForwardSparsityTest(ForwardSparsityCases):
    __test__ = True  # collected despite the jax-style name


@pytest.mark.gpu
class ForwardSparsityGpuTest(KernelTestBase, ForwardSparsityCases):
    __test__ = True
    BACKEND = "pallas"
    GARBAGE = staticmethod(nan_garbage)
    DTYPE = jnp.bfloat16


# A whole generate: every sparse verify of every step, poisoned where its plan selects nothing.


def _poisoned_sparse_attention(garbage, attention):
    """`sparse_attention`'s signature: poisons K and V outside what the lists select, then
    runs `attention` (the library's sparse attention, or dense attention to break it)."""

    def poisoned(q, k, v, block_indices, block_counts, context_lengths, *, granularity, **options):
        keep = readable_positions(
            block_indices, block_counts, context_lengths, q.shape[1], k.shape[1], granularity
        )
        k, v = _poison(k, keep, garbage), _poison(v, keep, garbage)
        return attention(
            q, k, v, block_indices, block_counts, context_lengths, granularity=granularity,
            **options,
        )  # fmt: skip

    return poisoned


def _dense_instead(
    q, k, v, block_indices, block_counts, context_lengths, *, return_summary=False, **_
):
    """The sparse branch broken on purpose: dense attention over everything."""
    positions = context_lengths[:, None] + jnp.arange(q.shape[1])[None, :]
    return dense_attention(q, k, v, positions, return_summary=return_summary)


class GenerateSparsityCases:
    BACKEND = "reference"
    GARBAGE = staticmethod(finite_garbage)
    DTYPE = jnp.float32
    GRANULARITY = 1
    HISTORY_P = 0.7  # the verifier's own last attention, where the history case adds it

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, stories260k_dir):
        verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin", cls.DTYPE)
        draft = perturbed_copy(verifier)
        prompts = [tokenizer(text)["input_ids"] for text in STORY_PROMPTS]
        return draft, verifier, prompts, calibrate(draft, verifier, [np.array(p) for p in prompts])

    @pytest.mark.parametrize("history", [False, True], ids=["draft", "history"])
    @pytest.mark.parametrize("mesh_spec", [None, "data=2,model=2"])
    def test_generate_never_reads_unselected_entries(self, pair, monkeypatch, mesh_spec, history):
        """Also tensor- and data-parallel: each device poisons and reads its own heads. With
        `history`, the sparse layers also report what they read to the next selection."""
        history_p = self.HISTORY_P if history else None
        if mesh_spec and len(jax.devices()) < 4:
            pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 4 on CPU)")
        mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
        draft, verifier, prompts, layer_map = pair
        config = SpecConfig(
            gamma=3, attn_p=0.5, granularity=self.GRANULARITY, layer_map=layer_map,
            backend=self.BACKEND, history_p=history_p,
        )  # fmt: skip

        def run(config):
            return generate(
                draft, verifier, prompts, config, max_new_tokens=32, eos_id=None, cache_size=128,
                mesh=mesh,
            )  # fmt: skip

        sparse = run(config)
        dense = run(SpecConfig(gamma=3, backend=self.BACKEND))
        assert sparse.tokens != dense.tokens  # not vacuous: the selection changes the output
        assert sparse.stats["kv_reduction"] > 0.1

        original = attention_module.sparse_attention
        try:
            jax.clear_caches()  # no compiled generate from before the patch may be reused
            poison = _poisoned_sparse_attention(self.GARBAGE, original)
            monkeypatch.setattr(attention_module, "sparse_attention", poison)
            poisoned = run(config)
            monkeypatch.setattr(
                attention_module,
                "sparse_attention",
                _poisoned_sparse_attention(self.GARBAGE, _dense_instead),
            )
            jax.clear_caches()
            broken = run(config)
        finally:
            monkeypatch.undo()
            jax.clear_caches()
        assert poisoned.tokens == sparse.tokens
        for name in ("accepted", "kv_read_sparse_layers", "kv_read_dense_layers", "kv_read_draft"):
            assert poisoned.stats[name] == sparse.stats[name], name
        # The same poison, read densely, changes what is generated and what is counted.
        assert broken.tokens != sparse.tokens
        assert broken.stats["kv_reduction"] < sparse.stats["kv_reduction"]


class GenerateSparsityTest(GenerateSparsityCases):
    __test__ = True


@pytest.mark.gpu
class GenerateSparsityGpuTest(KernelTestBase, GenerateSparsityCases):
    """The bundled pair in bfloat16 through the Pallas kernels, NaN in every unselected entry."""

    __test__ = True
    BACKEND = "pallas"
    GARBAGE = staticmethod(nan_garbage)
    DTYPE = jnp.bfloat16
    GRANULARITY = 16
    # At 0.7 the verifier's own attention keeps nearly the whole 128-token cache of this pair
    # (6.7% KV reduction, CPU, bf16, reference backend): too dense to show anything. At 0.3:
    # 13.2%.
    HISTORY_P = 0.3

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls):
        verifier, tokenizer = load_pretrained("bundled:verifier", cls.DTYPE)
        draft, _ = load_pretrained("bundled:draft", cls.DTYPE)
        prompts = [tokenizer(text)["input_ids"] for text in BOOK_PROMPTS]
        return draft, verifier, prompts, LayerMap.load(ASSETS / "layer_map.json")


# Statistics.


def test_statistics_use_the_selectors_dense_layers(stories260k_dir):
    """A baseline that keeps 3 layers dense while the config says 2: the statistics follow
    the selector (what the forward did)."""
    verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin")
    draft = perturbed_copy(verifier)
    prompts = [tokenizer(text)["input_ids"] for text in STORY_PROMPTS]
    selector = StreamingLLM(budget=jnp.float32(0.3), sinks=2, dense_layers=3)
    config = SpecConfig(gamma=3, selector=selector, dense_layers=2)
    stats = generate(draft, verifier, prompts, config, max_new_tokens=16).stats
    per_layer = stats["kv_reduction_per_layer"]
    assert per_layer[:3] == [0.0, 0.0, 0.0] and all(r > 0.2 for r in per_layer[3:])
    assert stats["kv_reduction"] == pytest.approx(np.mean(per_layer[3:]), rel=1e-6)
    dense_per_layer = stats["kv_dense_sparse_layers"] // 2
    assert stats["kv_read_dense_layers"] == 3 * dense_per_layer
