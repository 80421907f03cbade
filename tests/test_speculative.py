"""Speculative decoding: exactness of greedy, distribution of sampling, no retracing, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specattn_jax import speculative
from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.convert._params import model_from_params, params_of
from specattn_jax.decoding import DecodeProgress
from specattn_jax.errors import IncompatibleModelsError, SpecAttnError
from specattn_jax.loading import load_pretrained
from specattn_jax.sampling import Greedy, Sampling
from specattn_jax.speculative import SpecConfig, generate, generate_stream
from specattn_jax.testing import perturbed_copy, tiny_llama
from tests.reference_sampling import transformers_probabilities


@pytest.fixture(scope="module")
def stories_pair(stories260k_dir):
    verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin")
    return perturbed_copy(verifier, 0.3, seed=1), verifier, tokenizer


PROMPTS = {
    "batch1": ["Once upon a time"],
    "batch3-ragged": ["Once upon a time", "Tom", "The little dog ran to the park and"],
}


@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("prompts", list(PROMPTS), ids=list(PROMPTS))
@pytest.mark.parametrize("eos_id", [None, 426], ids=["no-eos", "eos-in-budget"])
def test_greedy_speculative_equals_verifier_greedy(stories_pair, gamma, prompts, eos_id):
    draft, verifier, tokenizer = stories_pair
    prompt_ids = [tokenizer(text)["input_ids"] for text in PROMPTS[prompts]]
    expected = generate_autoregressive(verifier, prompt_ids, max_new_tokens=30, eos_id=eos_id)
    result = generate(
        draft, verifier, prompt_ids, SpecConfig(gamma=gamma), max_new_tokens=30, eos_id=eos_id
    )
    assert result.tokens == expected.tokens
    if eos_id is not None:
        assert all(tokens[-1] == eos_id and len(tokens) < 30 for tokens in result.tokens)
    stats = result.stats
    assert 0 < stats["accepted"] < stats["drafted"]  # the draft really was wrong sometimes
    assert 1 <= stats["tokens_per_step"] <= gamma + 1


def test_several_stop_tokens_stop_at_the_first_of_any(stories_pair):
    """Two stop tokens taken from the greedy continuation itself: every decoder stops right
    after the earliest occurrence of either, and speculative acceptance stops there too
    (gamma 8 drafts past it)."""
    draft, verifier, tokenizer = stories_pair
    prompt = [tokenizer("Once upon a time")["input_ids"]]
    free = generate_autoregressive(verifier, prompt, max_new_tokens=40, eos_id=None).tokens[0]
    stops = (free[25], free[12])
    end = min(free.index(stops[0]), free.index(stops[1])) + 1
    assert end < 25
    expected = [free[:end]]
    assert (
        generate_autoregressive(verifier, prompt, max_new_tokens=40, eos_id=stops).tokens
        == expected
    )
    for gamma in (1, 8):
        result = generate(
            draft, verifier, prompt, SpecConfig(gamma=gamma), max_new_tokens=40, eos_id=list(stops)
        )
        assert result.tokens == expected
        assert result.stats["tokens"] == end
    streamed = []
    for new_tokens, _ in generate_stream(
        draft, verifier, prompt, SpecConfig(gamma=8), max_new_tokens=40, eos_id=stops
    ):
        streamed += new_tokens[0]
    assert [streamed] == expected


def _shortest_prefix_containing(tokenizer, tokens: list[int], stop: str) -> list[int]:
    """The reference: a linear scan over prefixes."""
    for end in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:end], skip_special_tokens=True):
            return tokens[:end]
    return tokens


@pytest.mark.parametrize(
    "stop, in_loop",
    [("She loved", True), (".", False)],
    ids=["three-tokens-in-the-loop", "cut-on-the-host"],
)
def test_stop_strings_end_every_decoder_at_the_same_token(stories_pair, stop, in_loop):
    """ "She loved" encodes alone to the three tokens the model generates, so the jitted loop
    itself stops there (its token count says so); "." encodes alone to ("▁", ".") while the
    model writes "." after a word, so the loop runs on and the host cuts the output."""
    draft, verifier, tokenizer = stories_pair
    prompt = [tokenizer("Once upon a time")["input_ids"]]
    free = generate_autoregressive(verifier, prompt, max_new_tokens=40, eos_id=None).tokens[0]
    expected = _shortest_prefix_containing(tokenizer, free, stop)
    assert len(expected) < 20
    options = dict(max_new_tokens=40, eos_id=None, stop_strings=[stop], tokenizer=tokenizer)
    plain = generate_autoregressive(verifier, prompt, **options)
    spec = generate(draft, verifier, prompt, SpecConfig(gamma=4), **options)
    streamed = []
    for new_tokens, _ in generate_stream(draft, verifier, prompt, SpecConfig(gamma=4), **options):
        streamed += new_tokens[0]
    assert plain.tokens == spec.tokens == [expected]
    assert streamed == expected
    assert (plain.stats["tokens"] == len(expected)) is in_loop
    assert (spec.stats["tokens"] == len(expected)) is in_loop


def test_stop_sequences_match_across_steps():
    """`DecodeProgress.append` against a plain-Python scan, on random steps of random
    lengths: a stop sequence may begin in an earlier step's tokens."""
    rng = np.random.default_rng(0)
    sequences = ((3,), (1, 2), (2, 2, 1))
    for trial in range(30):
        budget = int(rng.integers(4, 12))
        progress = DecodeProgress.init(jnp.array([budget]), 12)
        generated = []
        expected_done = False
        for _ in range(6):
            tokens = rng.integers(0, 4, size=(1, 3)).astype(np.int32)
            count = int(rng.integers(1, 4))
            progress, taken = progress.append(jnp.asarray(tokens), jnp.array([count]), sequences)
            take = 0
            if not expected_done:
                for token in tokens[0, :count]:
                    if len(generated) == budget:
                        break
                    generated.append(int(token))
                    take += 1
                    if any(tuple(generated[-len(s) :]) == s for s in sequences):
                        expected_done = True
                        break
                expected_done |= len(generated) == budget
            assert int(taken[0]) == take, trial
            assert bool(progress.done[0]) == expected_done, trial
        assert np.asarray(progress.output)[0, : len(generated)].tolist() == generated


def test_stop_strings_need_a_tokenizer_and_text(stories_pair):
    _, verifier, tokenizer = stories_pair
    with pytest.raises(SpecAttnError, match="need the tokenizer"):
        generate_autoregressive(verifier, [[1, 2]], max_new_tokens=4, stop_strings=["x"])
    with pytest.raises(SpecAttnError, match="non-empty strings"):
        generate_autoregressive(
            verifier, [[1, 2]], max_new_tokens=4, stop_strings=[""], tokenizer=tokenizer
        )


@pytest.mark.parametrize(
    "config",
    [SpecConfig(gamma=3), SpecConfig(gamma=3, attn_p=0.5, history_p=0.8)],
    ids=["speculative", "specattn-with-history"],
)
def test_stream_yields_the_same_tokens(stories_pair, config):
    """Also with the record of the verifier's attention carried from step to step."""
    draft, verifier, tokenizer = stories_pair
    prompt = [tokenizer("Once upon a time")["input_ids"]]
    expected = generate(draft, verifier, prompt, config, max_new_tokens=25)
    streamed, chunks, last_stats = [], 0, None
    for new_tokens, stats in generate_stream(draft, verifier, prompt, config, max_new_tokens=25):
        streamed += new_tokens[0]
        chunks += 1
        last_stats = stats
    assert streamed == expected.tokens[0]
    assert last_stats == expected.stats
    assert chunks > 1


def test_spec_step_traces_once(stories_pair):
    draft, verifier, tokenizer = stories_pair
    jax.clear_caches()
    for text in ["Once upon a time", "Lily"]:  # same bucketed shapes, different prompts
        prompt = [tokenizer(text)["input_ids"]]
        for _ in generate_stream(draft, verifier, prompt, SpecConfig(gamma=3), max_new_tokens=20):
            pass
    assert speculative._jit_step._cache_size() == 1


def test_changing_max_new_tokens_does_not_recompile(stories_pair):
    """Budgets from 17 to 32 new tokens share one compiled loop (one bucket), and each run
    stops at its own budget: the shorter runs are prefixes of the longest."""
    draft, verifier, tokenizer = stories_pair
    prompt = [tokenizer("Once upon a time")["input_ids"]]
    jax.clear_caches()
    runs = {
        budget: generate(
            draft, verifier, prompt, SpecConfig(gamma=3), max_new_tokens=budget, eos_id=None
        ).tokens[0]
        for budget in (32, 17, 24, 31)
    }
    assert speculative._generate._cache_size() == 1
    for budget, tokens in runs.items():
        assert tokens == runs[32][:budget]
    for budget in (20, 29):
        for _ in generate_stream(draft, verifier, prompt, max_new_tokens=budget, eos_id=None):
            pass
    assert speculative._jit_prefill._cache_size() == 1


# Stochastic speculative sampling preserves the verifier's distribution.

VOCAB = 5
GENERATED = 4  # x1 from the prefill, x2..x4 from one speculative step with gamma = 3


def _peaky_model(seed: int):
    """A tiny random model whose next-token distributions are far from uniform."""
    model = tiny_llama(seed=seed, vocab_size=VOCAB, num_layers=1)
    params = params_of(model)
    params[("lm_head",)] = params[("lm_head",)] * 25.0
    return model_from_params(model.config, params, jnp.float32, source="peaky")


def _exact_joint(verifier, sampling, prompt, length):
    """Probabilities of every continuation of `length` tokens under `sampling`, each step's
    distribution from transformers' logits processors given the tokens before it."""
    sequences = np.array(list(itertools.product(range(VOCAB), repeat=length)), np.int32)
    tokens = np.concatenate([np.tile(prompt, (len(sequences), 1)), sequences], axis=1)
    cache = verifier.init_cache(len(tokens), tokens.shape[1])
    logits, _, _ = verifier(jnp.asarray(tokens), cache)
    joint = np.ones(len(sequences))
    for step in range(length):
        position = len(prompt) + step
        probs = transformers_probabilities(
            sampling, tokens[:, :position], np.asarray(logits[:, position - 1])
        )
        joint *= probs[np.arange(len(sequences)), sequences[:, step]]
    return sequences, joint


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.0),
        Sampling(temperature=0.7, top_k=4, top_p=0.9),
        Sampling(temperature=1.2, min_p=0.05),
        Sampling(temperature=0.8, repetition_penalty=1.5),
    ],
    ids=["t1", "t0.7-topk4-topp0.9", "t1.2-minp0.05", "t0.8-penalty1.5"],
)
def test_speculative_sampling_preserves_verifier_distribution(sampling):
    # Two independent random models. The asserts below check that this pair both accepts
    # and rejects drafts (both branches of the rule are drawn often), and that the verifier
    # spreads its mass over enough continuations for the chi-square test. With the penalty
    # the prompt repeats one token, so most drafts are new to it: each verify position must
    # then be penalised for the drafts before it.
    verifier, draft = _peaky_model(seed=15), _peaky_model(seed=16)
    prompt = [1, 3, 0] if sampling.repetition_penalty is None else [2, 2, 2]
    samples = 20_000
    result = generate(
        draft,
        verifier,
        [prompt] * samples,
        SpecConfig(gamma=3),
        max_new_tokens=GENERATED,
        key=jax.random.key(2024),
        sampler=sampling,
        eos_id=None,
    )
    assert 0.1 < result.stats["acceptance_rate"] < 0.9  # rejections and acceptances both occur
    drawn = np.array(result.tokens)[:, 1:]  # x2..x4: produced by the speculative step
    sequences, joint = _exact_joint(verifier, sampling, prompt, GENERATED)
    cells = {tuple(seq): 0.0 for seq in sequences[:, 1:]}
    for seq, prob in zip(sequences[:, 1:], joint, strict=True):
        cells[tuple(seq)] += prob
    observed = {cell: 0 for cell in cells}
    for row in drawn:
        observed[tuple(row)] += 1
    expected_counts = np.array([cells[c] * samples for c in cells])
    observed_counts = np.array([observed[c] for c in cells], np.float64)
    impossible = expected_counts == 0  # filtered out by top-k / top-p: must never be drawn
    assert observed_counts[impossible].sum() == 0
    expected_counts, observed_counts = expected_counts[~impossible], observed_counts[~impossible]
    # Pool the cells expected fewer than 5 times into one, as the chi-square test requires.
    small = expected_counts < 5
    if small.any():
        expected_counts = np.append(expected_counts[~small], expected_counts[small].sum())
        observed_counts = np.append(observed_counts[~small], observed_counts[small].sum())
    statistic = np.sum((observed_counts - expected_counts) ** 2 / expected_counts)
    dof = len(expected_counts) - 1
    assert dof >= 5, "too few cells for a meaningful test"
    p_value = float(jax.scipy.stats.chi2.sf(statistic, dof))
    assert p_value > 1e-3, f"chi2={statistic:.1f} with {dof} dof, p={p_value:.2g}"


# Bad input.


def test_vocabulary_mismatch_is_an_error():
    with pytest.raises(IncompatibleModelsError, match="vocabulary has 64 tokens"):
        generate(tiny_llama(vocab_size=64), tiny_llama(), [[1, 2]], max_new_tokens=4)


def test_tokenizer_mismatch_is_an_error():
    class FakeTokenizer:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(IncompatibleModelsError, match="tokenizers map tokens to different ids"):
        speculative.check_compatible(
            tiny_llama(), tiny_llama(), FakeTokenizer({"a": 0}), FakeTokenizer({"a": 1})
        )


def test_gamma_below_one_is_an_error():
    with pytest.raises(SpecAttnError, match="gamma=0 must be an integer >= 1"):
        SpecConfig(gamma=0)


def test_budget_overflowing_the_cache_is_an_error():
    with pytest.raises(SpecAttnError, match="overflows the cache of 32"):
        generate(tiny_llama(), tiny_llama(), [[1, 2, 3]], max_new_tokens=30, cache_size=32)


def test_greedy_speculative_with_repetition_penalty_equals_verifier_greedy():
    """On a five-token vocabulary a token often recurs within one step's drafts, so each
    verify position must see the drafts before it; the prompts repeat few tokens, so that
    most tokens are new to the penalty when drafted."""
    verifier = _peaky_model(seed=15)
    draft = perturbed_copy(verifier, 0.5, seed=3)
    prompts = [[2, 2, 2], [1], [4, 0], [3, 3]]
    penalized = Greedy(repetition_penalty=1.5)
    options = dict(max_new_tokens=30, eos_id=None, sampler=penalized)
    expected = generate_autoregressive(verifier, prompts, **options)
    assert expected.tokens != generate_autoregressive(verifier, prompts, max_new_tokens=30,
                                                      eos_id=None).tokens  # fmt: skip
    result = generate(draft, verifier, prompts, SpecConfig(gamma=4), **options)
    assert result.tokens == expected.tokens
    assert 0 < result.stats["accepted"] < result.stats["drafted"]
