"""Layer mapping: the monotone DP is optimal; KL scores; JSON round trip; plot; bad maps."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import (
    LayerMap,
    attention_kl_scores,
    calibrate,
    fit_layer_mix,
    group_layer_map,
    model_fingerprint,
    monotone_layer_map,
)
from specattn_jax.loading import load_pretrained
from specattn_jax.testing import tiny_hf_config, tiny_llama, write_tiny_hf_checkpoint


def _brute_force_best(scores: np.ndarray) -> float:
    num_draft, num_verifier = scores.shape
    return max(
        sum(scores[i, j] for j, i in enumerate(mapping))
        for mapping in itertools.combinations_with_replacement(range(num_draft), num_verifier)
    )


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 6)),
        elements=st.floats(-10, 0, allow_nan=False),
    )
)
def test_dp_equals_brute_force(scores):
    mapping = monotone_layer_map(scores)
    assert len(mapping) == scores.shape[1]
    assert all(a <= b for a, b in itertools.pairwise(mapping))
    total = sum(scores[i, j] for j, i in enumerate(mapping))
    assert total == pytest.approx(_brute_force_best(scores), rel=1e-12, abs=1e-12)


def test_dp_follows_the_diagonal_when_it_is_best():
    scores = -np.ones((3, 6))
    for j, i in enumerate([0, 0, 1, 1, 2, 2]):
        scores[i, j] = 0.0
    assert monotone_layer_map(scores) == (0, 0, 1, 1, 2, 2)


def test_kl_scores_match_direct_computation():
    rng = np.random.default_rng(0)
    draft = rng.dirichlet(np.ones(7), size=(2, 5)).astype(np.float32)  # [L_d, T, S]
    verifier = rng.dirichlet(np.ones(7), size=(3, 5)).astype(np.float32)
    expected = np.array(
        [
            [
                -np.mean(np.sum(verifier[j] * np.log(verifier[j] / draft[i]), axis=-1))
                for j in range(3)
            ]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(attention_kl_scores(draft, verifier), expected, rtol=1e-5)
    assert np.all(np.asarray(attention_kl_scores(verifier, verifier)).diagonal() > -1e-5)


@pytest.fixture(scope="module")
def pair():
    return tiny_llama(seed=1, num_layers=2), tiny_llama(seed=2, num_layers=4)


def test_calibrate_save_load_and_plot(pair, tmp_path):
    draft, verifier = pair
    sequences = [np.random.default_rng(s).integers(0, 128, 24) for s in range(3)]
    layer_map = calibrate(draft, verifier, sequences, source="random tokens")
    assert len(layer_map.mapping) == 4 and max(layer_map.mapping) < 2
    assert np.array(layer_map.scores).shape == (2, 4)
    assert np.all(np.array(layer_map.scores) <= 1e-6)  # -KL <= 0
    assert layer_map.mapping == monotone_layer_map(np.array(layer_map.scores))
    loaded = LayerMap.load(layer_map.save(tmp_path / "map.json"))
    assert loaded == layer_map
    assert loaded.calibration == {
        "sequences": 3, "tokens": 72, "source": "random tokens", "choose": "kl"
    }  # fmt: skip
    loaded.check_fits(draft, verifier)
    png = layer_map.plot(tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_groups_map_sends_each_verifier_layer_to_the_draft_layer_that_learned_it(pair):
    """choose="groups" keeps the measured scores but maps by the distillation groups."""
    draft, verifier = pair
    sequences = [np.random.default_rng(s).integers(0, 128, 24) for s in range(2)]
    by_kl = calibrate(draft, verifier, sequences)
    by_groups = calibrate(draft, verifier, sequences, choose="groups")
    assert by_groups.mapping == (0, 0, 1, 1)  # groups of 4 verifier layers over 2 draft layers
    assert by_groups.scores == by_kl.scores
    assert by_groups.calibration["choose"] == "groups"
    assert (
        group_layer_map(30, 8)
        == (0,) * 4 + (1,) * 4 + (2,) * 3 + (3,) * 4 + (4,) * 4 + (5,) * 3 + (6,) * 4 + (7,) * 4
    )
    with pytest.raises(SpecAttnError, match="choose='best' must be one of"):
        calibrate(draft, verifier, sequences, choose="best")


def test_fit_layer_mix_recovers_a_mix_the_verifier_rows_are_made_of():
    """Verifier rows built as known mixes of random draft rows: the fit finds the mix (a
    weight of 0 is dropped, not merely small)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(3, 48, 40))
    draft_rows = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [L_d, R, S]
    mix = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [0, 0.25, 0.75]])
    verifier_rows = np.einsum("ji,irs->jrs", mix, draft_rows)
    fitted = fit_layer_mix(
        jnp.asarray(draft_rows, jnp.float32), jnp.asarray(verifier_rows, jnp.float32)
    )
    np.testing.assert_allclose(fitted, mix, atol=0.02)
    np.testing.assert_array_equal(fitted == 0, mix == 0)
    np.testing.assert_allclose(fitted.sum(axis=1), 1.0)


def test_calibrated_mix_is_stored_and_no_worse_than_the_kl_map(pair, tmp_path):
    """choose="mix": the KL map plus a mix of the draft layers per verifier layer, which
    fits the calibration rows at least as well as the map's one layer each (numpy KL)."""
    draft, verifier = pair
    sequences = [np.random.default_rng(s).integers(0, 128, 24) for s in range(2)]
    by_kl = calibrate(draft, verifier, sequences)
    mixed = calibrate(draft, verifier, sequences, choose="mix")
    assert mixed.mapping == by_kl.mapping and by_kl.mix is None
    mix = np.array(mixed.mix)
    assert mix.shape == (4, 2) and np.all(mix >= 0)
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)
    loaded = LayerMap.load(mixed.save(tmp_path / "mix.json"))
    assert loaded.mix == mixed.mix
    loaded.check_fits(draft, verifier)

    def mean_kl(weights):
        total = 0.0
        for tokens in sequences:
            rows = {}
            for name, model in (("draft", draft), ("verifier", verifier)):
                cache = model.init_cache(1, len(tokens))
                _, _, info = model(jnp.asarray(tokens[None]), cache, return_attention=True)
                rows[name] = np.asarray(info.attention[:, 0], np.float64)  # [L, T, S]
            guide = np.einsum("ji,its->jts", weights, rows["draft"])
            v = rows["verifier"]
            total += np.sum(v * np.log(np.maximum(v, 1e-30) / np.maximum(guide, 1e-30)))
        return total

    one_hot = np.eye(2)[list(mixed.mapping)]
    assert mean_kl(mix) <= mean_kl(one_hot) * (1 + 1e-3)


def test_bad_layer_mix_is_rejected(pair):
    draft, verifier = pair
    fields = dict(mapping=(0, 0, 1, 1), scores=((0.0,) * 4,) * 2, draft_fingerprint="a",
                  verifier_fingerprint="b")  # fmt: skip
    with pytest.raises(SpecAttnError, match="non-negative and sum to 1"):
        LayerMap(**fields, mix=((0.5, 0.4),) * 4)
    with pytest.raises(SpecAttnError, match=r"shape \(3, 2\) but the map is 4 verifier x 2"):
        LayerMap(**fields, mix=((0.5, 0.5),) * 3)
    three_draft_layers = LayerMap(
        **{**fields, "scores": ((0.0,) * 4,) * 3}, mix=((0.5, 0.25, 0.25),) * 4
    )
    with pytest.raises(SpecAttnError, match="weighs 3 draft layers but the draft has 2"):
        three_draft_layers.check_fits(draft, verifier)


def test_map_for_other_models_is_rejected(pair, tmp_path):
    draft, verifier = pair
    layer_map = calibrate(draft, verifier, [np.arange(10) % 128])
    with pytest.raises(SpecAttnError, match="calibrated for other models"):
        layer_map.check_fits(draft, tiny_llama(seed=3, num_layers=4))
    with pytest.raises(SpecAttnError, match="the layer map has 4 entries but the verifier has 2"):
        layer_map.check_fits(draft, tiny_llama(seed=3, num_layers=2))


def test_corrupt_or_non_monotone_map_file_is_rejected(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecAttnError, match="not a valid layer map"):
        LayerMap.load(tmp_path / "bad.json")
    bad = LayerMap((1, 0), ((0.0, 0.0), (0.0, 0.0)), "a", "b")
    bad.save(tmp_path / "down.json")
    with pytest.raises(SpecAttnError, match="not non-decreasing"):
        LayerMap.load(tmp_path / "down.json")
    with pytest.raises(SpecAttnError, match="layer map not found"):
        LayerMap.load(tmp_path / "missing.json")


def test_fingerprint_tells_models_apart():
    assert model_fingerprint(tiny_llama(seed=1)) == model_fingerprint(tiny_llama(seed=1))
    assert model_fingerprint(tiny_llama(seed=1)) != model_fingerprint(tiny_llama(seed=2))
    assert model_fingerprint(tiny_llama(seed=1)) != model_fingerprint(
        tiny_llama(seed=1, num_layers=3)
    )


def test_fingerprint_is_the_checkpoints_in_every_dtype(tmp_path):
    """A map calibrated on the float32 load (CPU) fits the bfloat16 or float16 load of the
    same checkpoint (GPU): the float32 weights are not representable in either."""
    write_tiny_hf_checkpoint(tmp_path / "a", tiny_hf_config(), seed=1)
    write_tiny_hf_checkpoint(tmp_path / "b", tiny_hf_config(), seed=2)
    fingerprints = {
        dtype: model_fingerprint(load_pretrained(tmp_path / "a", dtype)[0])
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
    }
    assert len(set(fingerprints.values())) == 1, fingerprints
    assert model_fingerprint(load_pretrained(tmp_path / "b")[0]) != fingerprints[jnp.float32]
