"""The NNX Llama against `transformers.LlamaForCausalLM`, and its cache invariances."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from specattn_jax.config import LlamaConfig
from specattn_jax.convert.hf import load_hf_model
from specattn_jax.model import Llama, RMSNorm, apply_rope, forward, rope_inverse_frequencies
from specattn_jax.testing import (
    max_relative_error,
    tiny_hf_config,
    tiny_llama,
    write_tiny_hf_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_LOGITS_RTOL = 1e-4

LAYOUTS = [
    pytest.param(dict(num_kv_heads=4), id="mha"),
    pytest.param(dict(num_kv_heads=2), id="gqa"),
    pytest.param(dict(num_kv_heads=1), id="mqa"),
    pytest.param(dict(num_kv_heads=2, tie_word_embeddings=True), id="gqa-tied"),
    pytest.param(dict(num_kv_heads=2, llama3_rope=True), id="gqa-llama3-rope"),
    pytest.param(
        dict(num_kv_heads=1, tie_word_embeddings=True, llama3_rope=True), id="mqa-tied-llama3"
    ),
    pytest.param(dict(num_kv_heads=2, attention_bias=True), id="gqa-attention-bias"),
]


def _token_batch(vocab: int, batch: int = 2, length: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def _hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _full_forward(model: Llama, tokens: np.ndarray) -> np.ndarray:
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, _, _ = model(jnp.asarray(tokens), cache)
    return np.asarray(logits)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(tmp_path, layout):
    hf_config = tiny_hf_config(**layout)
    hf_model = write_tiny_hf_checkpoint(tmp_path, hf_config)
    model = load_hf_model(tmp_path)
    tokens = _token_batch(hf_config["vocab_size"])
    assert max_relative_error(_full_forward(model, tokens), _hf_logits(hf_model, tokens)) <= (
        HF_LOGITS_RTOL
    )


def test_rms_norm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = np.random.default_rng(1).normal(size=(3, 5, 32)).astype(np.float32)
    weight = np.random.default_rng(2).uniform(0.5, 1.5, 32).astype(np.float32)
    hf_norm = LlamaRMSNorm(32, eps=1e-5)
    hf_norm.weight.data = torch.from_numpy(weight)
    norm = RMSNorm(32, 1e-5, dtype=jnp.float32, rngs=None)
    norm.weight[...] = jnp.asarray(weight)
    expected = hf_norm(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("llama3_rope", [False, True], ids=["default", "llama3"])
def test_rope_matches_transformers(llama3_rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = transformers.LlamaConfig(**tiny_hf_config(llama3_rope=llama3_rope))
    config = LlamaConfig.from_hf(tiny_hf_config(llama3_rope=llama3_rope))
    positions = np.arange(0, 200, 7, dtype=np.int32)[None]
    x = np.random.default_rng(3).normal(size=(1, 4, positions.shape[1], 8)).astype(np.float32)
    cos, sin = LlamaRotaryEmbedding(hf_config)(
        torch.from_numpy(x), torch.from_numpy(positions).long()
    )
    expected, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    ours = apply_rope(
        jnp.asarray(x).transpose(0, 2, 1, 3),
        jnp.asarray(positions),
        rope_inverse_frequencies(config),
    )
    np.testing.assert_allclose(
        np.asarray(ours).transpose(0, 2, 1, 3), expected.numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("chunk", [1, 5], ids=["decode", "chunks-of-5"])
def test_prefill_then_decode_matches_full_forward(num_kv_heads, chunk):
    model = tiny_llama(num_kv_heads=num_kv_heads, llama3_rope=True)
    tokens = _token_batch(model.config.vocab_size, batch=2, length=27)
    expected = _full_forward(model, tokens)
    prefix = 12
    cache = model.init_cache(2, 32)
    logits, cache, _ = model(jnp.asarray(tokens[:, :prefix]), cache)
    pieces = [np.asarray(logits)]
    for start in range(prefix, tokens.shape[1], chunk):
        logits, cache, _ = model(jnp.asarray(tokens[:, start : start + chunk]), cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [27, 27])


def test_ragged_batch_matches_each_sequence_alone():
    model = tiny_llama(num_kv_heads=2)
    rng = np.random.default_rng(4)
    lengths = [3, 11, 7]
    prompts = [rng.integers(0, 128, n, dtype=np.int32) for n in lengths]
    padded = np.zeros((3, 16), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    cache = model.init_cache(3, 24)
    logits, cache, _ = model(jnp.asarray(padded), cache, num_tokens=jnp.asarray(lengths))
    next_tokens = rng.integers(0, 128, (3, 2), dtype=np.int32)
    step_logits, cache, _ = model(jnp.asarray(next_tokens), cache)
    np.testing.assert_array_equal(cache.lengths, np.array(lengths) + 2)
    for row, prompt in enumerate(prompts):
        alone = _full_forward(model, np.concatenate([prompt, next_tokens[row]])[None])[0]
        n = len(prompt)
        np.testing.assert_allclose(logits[row, :n], alone[:n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step_logits[row], alone[n:], rtol=1e-5, atol=1e-5)


def test_last_logits_only_picks_each_rows_last_token():
    model = tiny_llama()
    tokens = _token_batch(128, batch=2, length=9)
    lengths = jnp.asarray([4, 9])
    full, _, _ = model(jnp.asarray(tokens), model.init_cache(2, 9), num_tokens=lengths)
    last, _, _ = model(
        jnp.asarray(tokens), model.init_cache(2, 9), num_tokens=lengths, last_logits_only=True
    )
    np.testing.assert_allclose(last[:, 0], full[jnp.arange(2), lengths - 1], rtol=1e-6)


def test_attention_summary_is_head_mean_probabilities():
    model = tiny_llama()
    tokens = _token_batch(128, batch=2, length=6)
    cache = model.init_cache(2, 10)
    _, cache, info = model(jnp.asarray(tokens), cache, return_attention=True)
    attention = info.attention
    assert attention.shape == (2, 2, 6, 10)
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(attention)[..., 6:] == 0)  # never past the queries
    assert np.all(np.triu(np.asarray(attention)[..., :6], k=1) == 0)  # causal


def test_attention_summaries_only_for_the_layers_asked(monkeypatch):
    """Only the layers named compute summaries (the others never ask their attention)."""
    from specattn_jax import attention

    asked = []
    dense = attention.dense_attention

    def counting(*args, return_summary=False, **kwargs):
        asked.append(return_summary)
        return dense(*args, return_summary=return_summary, **kwargs)

    monkeypatch.setattr(attention, "dense_attention", counting)
    model = tiny_llama(num_layers=3)
    tokens = jnp.asarray(_token_batch(128, batch=2, length=5))
    _, _, every = model(tokens, model.init_cache(2, 8), return_attention=True)
    asked.clear()
    _, _, some = model(tokens, model.init_cache(2, 8), return_attention=(2, 0))
    assert asked == [True, False, True]
    np.testing.assert_array_equal(some.attention, every.attention[jnp.array([2, 0])])
    _, _, none = model(tokens, model.init_cache(2, 8), return_attention=())
    assert none.attention is None
    with pytest.raises(ValueError, match="outside"):
        model(tokens, model.init_cache(2, 8), return_attention=(3,))


def test_jitted_forward_with_split_model_matches_eager():
    from flax import nnx

    model = tiny_llama(num_kv_heads=1)
    tokens = _token_batch(128, batch=2, length=8)
    graphdef, state = nnx.split(model)
    logits, cache, _ = forward(graphdef, state, jnp.asarray(tokens), model.init_cache(2, 8))
    np.testing.assert_allclose(logits, _full_forward(model, tokens), rtol=1e-5, atol=1e-6)
    assert cache.lengths.tolist() == [8, 8]


def test_bf16_forward_is_close_to_fp32():
    model32 = tiny_llama(seed=5)
    from specattn_jax.convert._params import model_from_params, params_of

    model16 = model_from_params(model32.config, params_of(model32), jnp.bfloat16, source="test")
    tokens = _token_batch(128, batch=1, length=16)
    logits32 = _full_forward(model32, tokens)
    logits16 = _full_forward(model16, tokens)
    assert logits16.dtype == np.float32 and np.isfinite(logits16).all()
    assert max_relative_error(logits16, logits32) < 3e-2


def test_config_round_trips_through_hf_dict():
    for layout in LAYOUTS:
        config = LlamaConfig.from_hf(tiny_hf_config(**layout.values[0]))
        assert LlamaConfig.from_hf(config.to_hf()) == config
        assert hash(config) == hash(dataclasses.replace(config))
    hf = transformers.LlamaConfig(**tiny_hf_config(llama3_rope=True)).to_dict()
    assert LlamaConfig.from_hf(hf) == LlamaConfig.from_hf(tiny_hf_config(llama3_rope=True))


def test_model_key_set_equals_transformers(tmp_path):
    hf_model = write_tiny_hf_checkpoint(tmp_path, tiny_hf_config(num_kv_heads=2))
    from specattn_jax.convert._params import params_of
    from specattn_jax.convert.hf import path_to_hf_key

    model = load_hf_model(tmp_path)
    ours = {path_to_hf_key(path)[0] for path in params_of(model)}
    assert ours == set(hf_model.state_dict())
