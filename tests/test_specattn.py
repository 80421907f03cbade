"""SpecAttn: exactness at p = 1, exactness of the speculative machinery at p < 1, measured KV
reduction, and the errors for bad settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax.acceptance import GreedyAcceptance
from specattn_jax.cache import KVCache
from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import LayerMap, calibrate
from specattn_jax.loading import load_pretrained
from specattn_jax.model import forward
from specattn_jax.selection import SelectionInputs
from specattn_jax.speculative import SpecConfig, draft_tokens, generate, kv_reduction
from specattn_jax.testing import perturbed_copy, tiny_llama

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the",
    "Tom had a big red ball. He",
    "The sun was hot and the birds sang. A little dog ran to the park with his friend, and",
]


@pytest.fixture(scope="module")
def pair(stories260k_dir):
    draft, verifier, prompts = _noisy_pair(stories260k_dir, jnp.float32)
    layer_map = calibrate(draft, verifier, [np.array(p) for p in prompts])
    return draft, verifier, prompts, layer_map


@pytest.mark.parametrize("granularity", [1, 16])
def test_p_one_equals_dense_speculative_decoding(pair, granularity):
    draft, verifier, prompts, layer_map = pair
    dense = generate(draft, verifier, prompts, SpecConfig(gamma=3), max_new_tokens=30)
    config = SpecConfig(gamma=3, attn_p=1.0, granularity=granularity, layer_map=layer_map)
    sparse = generate(draft, verifier, prompts, config, max_new_tokens=30)
    assert sparse.tokens == dense.tokens
    assert sparse.stats["accepted"] == dense.stats["accepted"]
    assert sparse.stats["kv_reduction"] == 0.0


def test_all_layers_dense_equals_dense_speculative_decoding(pair):
    draft, verifier, prompts, layer_map = pair
    dense = generate(draft, verifier, prompts, SpecConfig(gamma=3), max_new_tokens=30)
    config = SpecConfig(gamma=3, attn_p=0.5, dense_layers=5, layer_map=layer_map)
    assert generate(draft, verifier, prompts, config, max_new_tokens=30).tokens == dense.tokens


def _noisy_pair(stories260k_dir, dtype):
    """stories260K as verifier; a noisy copy of it as draft (a real, imperfect draft)."""
    verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin", dtype)
    draft = perturbed_copy(verifier)
    return draft, verifier, [tokenizer(text)["input_ids"] for text in PROMPTS]


STEPWISE_CACHE = 128


@functools.partial(jax.jit, static_argnames=("graphdef", "gamma"))
def _draft_from_scratch(graphdef, state, sequence, length, gamma):
    """The draft prefilled densely on sequence[:length - 2] (i32[1, STEPWISE_CACHE] padded),
    then drafting gamma tokens from the last two: (drafts i32[1, gamma], attention)."""
    draft = nnx.merge(graphdef, state)
    cache = draft.init_cache(1, STEPWISE_CACHE)
    _, cache, _ = draft(sequence, cache, num_tokens=(length - 2)[None])
    last_two = jax.lax.dynamic_slice_in_dim(sequence, length - 2, 2, axis=1)
    drafted, _, attention, _ = draft_tokens(
        draft, cache.with_lengths((length - 2)[None]), last_two, GreedyAcceptance(),
        jax.random.key(0), gamma,
    )  # fmt: skip
    return drafted, attention


def _truncated(cache, length: int):
    """A fresh cache holding exactly the first `length` entries of `cache` (no stale ones)."""
    keep = lambda x: jnp.zeros_like(x).at[:, :length].set(x[:, :length])  # noqa: E731
    return KVCache(
        k=tuple(map(keep, cache.k)),
        v=tuple(map(keep, cache.v)),
        lengths=jnp.full_like(cache.lengths, length),
    )


def _stepwise_sparse_greedy(draft, verifier, prompt, config, layer_map, max_new_tokens):
    """Greedy SpecAttn written out plainly, for one sequence: no rollback by lengths, no
    batching, no while_loop, no reuse of the draft's cache. Each step prefills the (dense)
    draft from scratch, drafts, selects, verifies sparsely, accepts, and cuts the verifier's
    cache to the accepted positions by copying them into a fresh cache. (The verifier's
    cache is kept across steps because its entries come from the sparse forwards that fed
    each token: a dense re-prefill would compute other keys and values.)"""
    selector, _ = config.build_selector(draft, verifier, [prompt])
    rule = GreedyAcceptance()
    draft_graphdef, draft_state = nnx.split(draft)
    verifier_graphdef, verifier_state = nnx.split(verifier)
    logits, verifier_cache, _ = verifier(
        jnp.array([prompt]), verifier.init_cache(1, STEPWISE_CACHE)
    )
    sequence = list(prompt) + [int(jnp.argmax(logits[0, -1]))]
    while len(sequence) - len(prompt) < max_new_tokens:
        padded = (
            jnp.zeros((1, STEPWISE_CACHE), jnp.int32)
            .at[0, : len(sequence)]
            .set(jnp.array(sequence, jnp.int32))
        )
        drafted, attention = _draft_from_scratch(
            draft_graphdef, draft_state, padded, jnp.int32(len(sequence)), config.gamma
        )
        plan = selector.plan(
            SelectionInputs(
                context_lengths=verifier_cache.lengths,
                draft_attention=attention,
                num_layers=verifier.config.num_hidden_layers,
                cache_size=STEPWISE_CACHE,
            )
        )
        verify_tokens = jnp.concatenate([jnp.array([sequence[-1:]]), drafted], axis=1)
        logits, verifier_cache, _ = forward(
            verifier_graphdef, verifier_state, verify_tokens, verifier_cache, plan=plan
        )
        accepted, next_token = rule.accept(drafted, None, logits, None)
        sequence += [int(t) for t in drafted[0, : int(accepted[0])]] + [int(next_token[0])]
        verifier_cache = _truncated(verifier_cache, len(sequence) - 1)
    return sequence[len(prompt) : len(prompt) + max_new_tokens]


@pytest.mark.parametrize("granularity", [1, 16])
def test_sparse_greedy_equals_stepwise_sparse_verifier(stories260k_dir, granularity):
    """In float64, so that the different but equivalent orders of arithmetic of the two
    paths (one-token vs many-token matmuls) cannot flip a top-p choice at its threshold:
    what is compared is the machinery (rollback, batching, the loop), not rounding."""
    with jax.enable_x64(True):
        draft, verifier, prompts = _noisy_pair(stories260k_dir, jnp.float64)
        layer_map = calibrate(draft, verifier, [np.array(p) for p in prompts])
        config = SpecConfig(gamma=3, attn_p=0.6, granularity=granularity, layer_map=layer_map)
        result = generate(
            draft, verifier, prompts, config, max_new_tokens=24, eos_id=None,
            cache_size=STEPWISE_CACHE,
        )  # fmt: skip
        assert result.stats["kv_reduction"] > 0.1  # the verifier really read less
        for prompt, tokens in zip(prompts, result.tokens, strict=True):
            expected = _stepwise_sparse_greedy(draft, verifier, prompt, config, layer_map, 24)
            assert tokens == expected


def test_kv_reduction_statistics_are_consistent(pair):
    draft, verifier, prompts, layer_map = pair
    config = SpecConfig(gamma=3, attn_p=0.8, layer_map=layer_map, dense_layers=2)
    stats = generate(draft, verifier, prompts, config, max_new_tokens=20).stats
    per_layer = stats["kv_reduction_per_layer"]
    assert per_layer[:2] == [0.0, 0.0] and all(0 < r < 1 for r in per_layer[2:])
    assert len(stats["kv_reduction_per_step"]) == stats["steps"]
    assert stats["kv_reduction"] == pytest.approx(np.mean(per_layer[2:]), rel=0.05)


def test_kv_reduction_arithmetic():
    read = np.array([[10.0, 4.0], [20.0, 5.0]])
    dense = np.array([10.0, 20.0])
    overall, per_layer, per_step = kv_reduction(read, dense, [False, True])
    assert overall == pytest.approx(1 - 9 / 30)
    assert per_layer == pytest.approx([0.0, 1 - 9 / 30])
    assert per_step == pytest.approx([0.6, 0.75])


def test_without_layer_map_calibrates_on_the_prompts(pair):
    draft, verifier, prompts, _ = pair
    stats = generate(draft, verifier, prompts, SpecConfig(attn_p=0.9), max_new_tokens=8).stats
    assert stats["layer_map"] == "calibrated on the prompts"


# Bad input.


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_attn_p_outside_unit_interval_is_an_error(p):
    with pytest.raises(SpecAttnError, match=f"attn_p={p} must be in"):
        SpecConfig(attn_p=p)


def test_layer_map_of_wrong_length_is_an_error(pair):
    draft, verifier, prompts, layer_map = pair
    short = LayerMap(layer_map.mapping[:-1], layer_map.scores, *layer_map_ids(layer_map))
    with pytest.raises(SpecAttnError, match="the layer map has 4 entries but the verifier has 5"):
        generate(
            draft, verifier, prompts, SpecConfig(attn_p=0.9, layer_map=short), max_new_tokens=4
        )


def test_layer_map_for_other_models_is_an_error(pair):
    draft, verifier, prompts, _ = pair
    other = calibrate(
        tiny_llama(vocab_size=512, num_layers=2),
        tiny_llama(vocab_size=512, num_layers=5),
        [np.arange(8)],
    )
    with pytest.raises(SpecAttnError, match="calibrated for other models"):
        generate(
            draft, verifier, prompts, SpecConfig(attn_p=0.9, layer_map=other), max_new_tokens=4
        )


def test_granularity_not_dividing_the_cache_is_an_error(pair):
    draft, verifier, prompts, layer_map = pair
    config = SpecConfig(attn_p=0.9, granularity=16, layer_map=layer_map)
    with pytest.raises(SpecAttnError, match="granularity=16 does not divide the cache size 200"):
        generate(draft, verifier, prompts, config, max_new_tokens=4, cache_size=200)


def layer_map_ids(layer_map):
    return layer_map.draft_fingerprint, layer_map.verifier_fingerprint
