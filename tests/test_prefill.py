"""Prefill of long prompts: blockwise attention (no [T, S] scores) and chunked prefill give the
logits and cache of the dense path, in memory bounded by the chunk, not the prompt."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax.data import default_data_dir
from specattn_jax.errors import SpecAttnError
from specattn_jax.loading import load_pretrained
from specattn_jax.speculative import SpecConfig, generate
from specattn_jax.testing import max_relative_error, tiny_llama

LOGITS_RTOL = 1e-4
LONG_PROMPT = 16384
PEAK_MEMORY_GB = 3.0

# Runs in its own process, so that its peak resident memory is the prefill's alone.
_LONG_PREFILL = textwrap.dedent(
    """
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from specattn_jax.data import load_split_texts
    from specattn_jax.loading import load_pretrained

    length = int(sys.argv[1])
    model, tokenizer = load_pretrained("bundled:verifier")
    text = load_split_texts("test")[0]
    ids = tokenizer(text[: 12 * length])["input_ids"][:length]
    assert len(ids) == length, len(ids)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray([ids], jnp.int32)

    def peak_gb():
        # VmHWM: this process's peak resident memory. (ru_maxrss would not do: it keeps the
        # parent's peak across fork and exec.)
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20

    @functools.partial(jax.jit, static_argnames="chunk_size")
    def prefill(state, tokens, chunk_size):
        model = nnx.merge(graphdef, state)
        return model.prefill(tokens, model.init_cache(1, length), chunk_size=chunk_size)[0]

    stages = {"loaded": peak_gb()}
    whole = prefill(state, tokens, None).block_until_ready()
    stages["whole"] = peak_gb()
    halves = prefill(state, tokens, length // 2).block_until_ready()
    stages["halves"] = peak_gb()
    print(json.dumps({"whole": np.asarray(whole).tolist(), "halves": np.asarray(halves).tolist(),
                      "peak_gb": stages}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_16k_prompt_prefills_in_bounded_memory_whole_or_in_two_chunks():
    if not (default_data_dir() / "MANIFEST.tsv").is_file():
        pytest.skip(f"../shared/data/gutenberg is not beside the checkout ({default_data_dir()})")
    done = subprocess.run(
        [sys.executable, "-c", _LONG_PREFILL, str(LONG_PROMPT)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert max(result["peak_gb"].values()) < PEAK_MEMORY_GB, result["peak_gb"]
    whole, halves = np.asarray(result["whole"]), np.asarray(result["halves"])
    assert np.isfinite(whole).all()
    np.testing.assert_allclose(halves, whole, rtol=LOGITS_RTOL, atol=LOGITS_RTOL)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation of a jaxpr (or of its sub-jaxprs) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(out.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_a_long_prefill_makes_no_value_the_size_of_its_scores():
    """Traced at 16K tokens into a 16K cache, no value of the program (scores included) has
    T * S elements: attention never holds scores over the whole cache."""
    model = tiny_llama(num_kv_heads=1)
    graphdef, state = nnx.split(model)

    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        return model.prefill(tokens, model.init_cache(1, LONG_PROMPT))

    tokens = jax.ShapeDtypeStruct((1, LONG_PROMPT), jnp.int32)
    jaxpr = jax.make_jaxpr(prefill)(state, tokens).jaxpr
    assert _largest_intermediate(jaxpr) < LONG_PROMPT * LONG_PROMPT // 16


@pytest.fixture(scope="module")
def verifier():
    return load_pretrained("bundled:verifier")[0]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _padded(prompts):
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.mark.parametrize("chunk_size", [None, 128, 200], ids=["whole", "128", "200"])
def test_prefill_matches_the_whole_cache_xla_path_on_a_ragged_batch(verifier, chunk_size):
    """Blockwise, chunked prefill equals XLA's attention over the whole cache (the path that
    holds [T, S] scores), on a prompt short enough for it: logits and cache entries."""
    tokens, lengths = _padded(_prompts(verifier.config.vocab_size, [600, 257, 64]))
    size = 640
    logits, cache = verifier.prefill(
        tokens, verifier.init_cache(3, size), num_tokens=lengths, chunk_size=chunk_size
    )
    # return_attention sends every layer down the "xla" path over the whole cache.
    expected, expected_cache, _ = verifier(
        tokens, verifier.init_cache(3, size), num_tokens=lengths, last_logits_only=True,
        return_attention=True,
    )  # fmt: skip
    assert max_relative_error(logits, expected[:, 0]) < LOGITS_RTOL
    np.testing.assert_array_equal(cache.lengths, lengths)
    for row, length in enumerate(lengths.tolist()):
        for layer in (0, verifier.config.num_hidden_layers - 1):
            actual, reference = cache.k[layer], expected_cache.k[layer]
            assert max_relative_error(actual[row, :length], reference[row, :length]) < 1e-4


def test_chunked_prefill_compiles_one_forward_whatever_the_prompt_length():
    """The chunks run in one scan: a longer prompt adds scan steps, not traced forwards."""
    model = tiny_llama(num_kv_heads=2)
    graphdef, state = nnx.split(model)
    traced = []

    def prefill(state, tokens):
        traced.append(tokens.shape)
        model = nnx.merge(graphdef, state)
        return model.prefill(tokens, model.init_cache(1, 256), chunk_size=32)

    jaxpr = jax.make_jaxpr(prefill)(state, jnp.ones((1, 200), jnp.int32))
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 7


def test_generate_with_chunked_prefill_gives_the_same_tokens(verifier):
    draft = load_pretrained("bundled:draft")[0]
    prompts = _prompts(verifier.config.vocab_size, [300, 45], seed=1)
    config = SpecConfig(gamma=3, attn_p=0.9, granularity=16)
    whole = generate(draft, verifier, prompts, config, max_new_tokens=12)
    chunked = generate(draft, verifier, prompts, config, max_new_tokens=12, prefill_chunk=64)
    assert chunked.tokens == whole.tokens
    assert chunked.stats["accepted"] == whole.stats["accepted"]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
def test_bf16_prefill_through_cudnn_matches_the_blockwise_path():
    """On a GPU in bf16 the first chunk takes cuDNN; its logits and cache agree with the
    jnp blockwise path (backend="reference") within bf16 rounding."""
    model = load_pretrained("bundled:verifier", jnp.bfloat16)[0]
    tokens, lengths = _padded(_prompts(model.config.vocab_size, [1500, 700], seed=2))
    runs = {
        backend: model.prefill(
            tokens, model.init_cache(2, 1536), num_tokens=lengths, backend=backend
        )
        for backend in ("auto", "reference")
    }
    (fused, _), (blockwise, _) = runs["auto"], runs["reference"]
    assert max_relative_error(fused, blockwise) < 3e-2
    np.testing.assert_array_equal(fused.argmax(-1), blockwise.argmax(-1))


@pytest.mark.parametrize("chunk", [0, -8, 2.5])
def test_a_bad_prefill_chunk_is_one_clear_error(verifier, chunk):
    with pytest.raises(SpecAttnError, match="prefill_chunk"):
        generate(None, verifier, [[5, 6, 7]], max_new_tokens=2, prefill_chunk=chunk)
