"""SpecAttn: exactness at p = 1, exactness of the speculative machinery at p < 1, measured KV
reduction, and the errors for bad settings."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specattn_jax.acceptance import GreedyAcceptance
from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import LayerMap, calibrate
from specattn_jax.loading import load_pretrained
from specattn_jax.speculative import SpecConfig, draft_tokens, generate, kv_reduction
from specattn_jax.testing import perturbed_copy, tiny_llama
from tests.reference_llama import ReferenceLlama, specattn_greedy

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


def test_the_draft_summarises_only_the_layers_its_map_uses(pair):
    """SpecAttn's draft computes attention summaries in the draft layers mapped to a sparse
    verifier layer, and they equal those layers' summaries; dense speculative decoding's
    draft computes none."""
    draft, verifier, prompts, layer_map = pair
    num_layers = verifier.config.num_hidden_layers
    mapping = tuple(min(j, draft.config.num_hidden_layers - 1) for j in range(num_layers))
    config = SpecConfig(gamma=3, attn_p=0.9, dense_layers=num_layers - 2,
                        layer_map=dataclasses.replace(layer_map, mapping=mapping))  # fmt: skip
    selector, _ = config.build_selector(draft, verifier, prompts)
    assert selector.draft_layers == tuple(sorted(set(mapping[num_layers - 2 :])))
    tokens = jnp.asarray([prompts[0][:12]], jnp.int32)
    _, cache, _ = draft(tokens, draft.init_cache(1, 32))
    last_two = jnp.asarray([prompts[0][12:14]], jnp.int32)
    run = functools.partial(
        draft_tokens, draft, cache, last_two, GreedyAcceptance(), jax.random.key(0), 3
    )
    mapped, every = run(selector.draft_layers), run(tuple(range(draft.config.num_hidden_layers)))
    assert mapped.attention.shape == (3, len(selector.draft_layers), 1, 32)
    np.testing.assert_array_equal(
        mapped.attention, every.attention[:, jnp.array(selector.draft_layers)]
    )
    assert run(()).attention is None


def _noisy_pair(stories260k_dir, dtype):
    """stories260K as verifier; a noisy copy of it as draft (a real, imperfect draft)."""
    verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin", dtype)
    draft = perturbed_copy(verifier)
    return draft, verifier, [tokenizer(text)["input_ids"] for text in PROMPTS]


STEPWISE_CACHE = 128


def _two_layer_mix(mapping: tuple[int, ...], num_draft_layers: int) -> tuple:
    """Each verifier layer j reads 0.6 of draft layer mapping[j] and 0.4 of the next one."""
    mix = np.zeros((len(mapping), num_draft_layers))
    for layer, draft_layer in enumerate(mapping):
        mix[layer, draft_layer] += 0.6
        mix[layer, (draft_layer + 1) % num_draft_layers] += 0.4
    return tuple(map(tuple, mix))


@pytest.mark.parametrize(
    "granularity, history_p, mixed", [(1, None, False), (16, None, False), (1, 0.8, False),
                                      (1, None, True)]
)  # fmt: skip
def test_sparse_greedy_equals_an_independent_stepwise_reference(
    stories260k_dir, granularity, history_p, mixed
):
    """Batched SpecAttn `generate` against `tests/reference_llama.py`: a float64 numpy Llama
    that re-prefills the draft every step, selects by sorting, and verifies through boolean
    position masks (no plan, selector, cache rollback or kernel of the library). Tokens and
    every KV read (per verifier layer group, and the draft's) must agree exactly. With
    `history_p`, each sparse layer also reads the top-p set of its attention in the last
    verify, which the reference keeps from its own masked forward. `mixed`: each verifier
    layer selects from a mix of two draft layers' rows (`LayerMap.mix`).

    In float64, so that the different but equivalent orders of arithmetic of the two paths
    cannot flip a greedy choice or a top-p boundary."""
    with jax.enable_x64(True):
        draft, verifier, prompts = _noisy_pair(stories260k_dir, jnp.float64)
        layer_map = calibrate(draft, verifier, [np.array(p) for p in prompts])
        if mixed:
            mix = _two_layer_mix(layer_map.mapping, draft.config.num_hidden_layers)
            layer_map = dataclasses.replace(layer_map, mix=mix)
        config = SpecConfig(
            gamma=3, attn_p=0.6, granularity=granularity, layer_map=layer_map,
            history_p=history_p,
        )  # fmt: skip
        result = generate(
            draft, verifier, prompts, config, max_new_tokens=24, eos_id=None,
            cache_size=STEPWISE_CACHE,
        )  # fmt: skip
    draft_ref, verifier_ref = ReferenceLlama(draft), ReferenceLlama(verifier)
    runs = [
        specattn_greedy(
            draft_ref,
            verifier_ref,
            prompt,
            mapping=layer_map.mapping,
            attn_p=0.6,
            granularity=granularity,
            dense_layers=config.dense_layers,
            gamma=3,
            max_new_tokens=24,
            cache_size=STEPWISE_CACHE,
            history_p=history_p,
            mix=None if layer_map.mix is None else np.array(layer_map.mix),
        )  # fmt: skip
        for prompt in prompts
    ]
    assert result.tokens == [run.tokens for run in runs]
    reads = np.sum([run.verifier_reads for run in runs], axis=0)
    stats = result.stats
    assert stats["kv_read_dense_layers"] == reads[: config.dense_layers].sum()
    assert stats["kv_read_sparse_layers"] == reads[config.dense_layers :].sum()
    assert stats["kv_read_draft"] == sum(run.draft_reads for run in runs)
    assert stats["drafted"] == 3 * sum(run.steps for run in runs)  # gamma per active step
    assert stats["accepted"] == sum(run.accepted for run in runs)
    assert stats["kv_reduction"] > 0.1  # the verifier really read less
    assert stats["kv_reduction"] == pytest.approx(
        1 - reads[config.dense_layers :].sum() / stats["kv_dense_sparse_layers"], abs=1e-12
    )


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


def test_calibration_on_long_prompts_uses_their_first_tokens(pair, monkeypatch):
    """A long prompt calibrates on its first CALIBRATION_TOKENS tokens: calibration holds
    [T, T] attention per layer, which a long context would not fit."""
    from specattn_jax import speculative

    draft, verifier, _, layer_map = pair
    seen = []

    def recording(draft, verifier, sequences, **kwargs):
        seen.extend(len(s) for s in sequences)
        return layer_map

    monkeypatch.setattr(speculative, "CALIBRATION_TOKENS", 40)
    monkeypatch.setattr(speculative, "calibrate", recording)
    prompts = [list(range(3, 103)), list(range(3, 23))]
    SpecConfig(attn_p=0.9).build_selector(draft, verifier, prompts)
    assert seen == [40, 20]


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
