"""Sampling rules against transformers: the filters, and greedy decoding with a repetition
penalty end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specattn_jax import speculative
from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.convert.hf import save_hf_model
from specattn_jax.convert.llama2c import llama2c_tokenizer, load_llama2c_model
from specattn_jax.errors import SpecAttnError
from specattn_jax.sampling import Greedy, Sampling, make_sampler, mark_seen, seen_before_each
from specattn_jax.speculative import SpecConfig, generate
from specattn_jax.testing import perturbed_copy
from tests.reference_sampling import transformers_filtered_logits

SETTINGS = {
    "temperature": Sampling(temperature=0.6),
    "top-k": Sampling(temperature=1.3, top_k=7),
    "top-p": Sampling(top_p=0.8),
    "min-p": Sampling(temperature=0.9, min_p=0.08),
    "repetition-penalty": Sampling(repetition_penalty=1.4),
    "reward-repetition": Sampling(repetition_penalty=0.7),
    "all": Sampling(temperature=0.7, top_k=30, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
}


@pytest.mark.parametrize("sampling", list(SETTINGS.values()), ids=list(SETTINGS))
def test_filters_match_transformers_logits_processors(sampling):
    """The same tokens kept, the same values, as transformers' processors in its order; on
    rows of mixed signs and spreads, so that each filter binds somewhere."""
    rng = np.random.default_rng(7)
    batch, vocab = 64, 97
    logits = rng.normal(size=(batch, vocab)) * rng.uniform(0.5, 6.0, size=(batch, 1))
    logits = (logits + rng.normal(size=(batch, 1))).astype(np.float32)
    history = rng.integers(0, vocab, size=(batch, 20))
    expected = transformers_filtered_logits(sampling, history, logits)

    seen = mark_seen(jnp.zeros((batch, vocab), bool), jnp.asarray(history))
    ours = np.asarray(sampling.filtered_logits(sampling.penalize(jnp.asarray(logits), seen)))

    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6, atol=1e-6)
    unfiltered = Sampling(temperature=sampling.temperature)
    if sampling.repetition_penalty is None and sampling != unfiltered:
        assert 0 < (~kept).mean() < 0.95, "the filter should remove some tokens, not all"


def test_seen_before_each_marks_the_prefixes():
    seen = jnp.zeros((2, 6), bool).at[0, 5].set(True)
    tokens = jnp.array([[1, 2, 1], [0, 0, 4]])
    rows = np.asarray(seen_before_each(seen, tokens))  # [2, 4, 6]
    expected = np.zeros((2, 4, 6), bool)
    expected[0, :, 5] = True
    expected[0, 1:, 1] = expected[0, 2:, 2] = True
    expected[1, 1:, 0] = expected[1, 3:, 4] = True
    np.testing.assert_array_equal(rows, expected)


def test_greedy_with_repetition_penalty_matches_transformers_generate(stories260k_dir, tmp_path):
    """stories260K exported to transformers: `generate(repetition_penalty=1.3)` greedy, and
    ours, autoregressive and speculative (whose drafts and verify positions each see the
    drafts before them). A new penalty value reuses the compiled loop."""
    model = load_llama2c_model(stories260k_dir / "stories260K.bin")
    tokenizer = llama2c_tokenizer(stories260k_dir / "tok512.bin")
    save_hf_model(model, tmp_path)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = tokenizer("Once upon a time")["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
            repetition_penalty=1.3,
        )  # fmt: skip
    expected = out[0, len(prompt) :].tolist()

    options = dict(max_new_tokens=40, eos_id=None)
    plain = generate_autoregressive(model, [prompt], **options).tokens[0]
    assert plain != expected, "the penalty must change this continuation"
    penalized = Greedy(repetition_penalty=1.3)
    assert generate_autoregressive(model, [prompt], sampler=penalized, **options).tokens[0] == (
        expected
    )
    jax.clear_caches()
    draft = perturbed_copy(model, 0.3, seed=1)
    result = generate(draft, model, [prompt], SpecConfig(gamma=3), sampler=penalized, **options)
    assert result.tokens[0] == expected
    assert 0 < result.stats["accepted"] < result.stats["drafted"]
    generate(draft, model, [prompt], SpecConfig(gamma=3), sampler=Greedy(repetition_penalty=1.1),
             **options)  # fmt: skip
    assert speculative._generate._cache_size() == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=1.0, min_p=1.5), "min_p=1.5 must be in"),
        (dict(temperature=1.0, repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty=-1.0 must be > 0"),
        (dict(top_p=0.0), "top_p=0.0 must be in"),
    ],
)
def test_bad_sampling_values_are_errors(options, message):
    with pytest.raises(SpecAttnError, match=message):
        make_sampler(**options)


def test_a_penalty_of_one_keeps_no_record():
    assert make_sampler(repetition_penalty=1.0) == Greedy()
    assert not make_sampler(temperature=0.5).tracks_seen
    assert make_sampler(temperature=0.5, repetition_penalty=1.2).tracks_seen
