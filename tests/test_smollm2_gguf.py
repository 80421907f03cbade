"""A real pretrained GGUF, SmolLM2-135M-Instruct in Q4_1 (`python -m specattn_jax.fetch`
caches it), against transformers' own GGUF loading of the same file, both in float32: logits
over 1024 tokens of a Gutenberg test book, greedy continuations, and a one-turn chat."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.data import split_books
from specattn_jax.errors import SpecAttnError
from specattn_jax.fetch import smollm2_path
from specattn_jax.layer_map import model_fingerprint
from specattn_jax.loading import load_pretrained

pytestmark = pytest.mark.slow

WINDOW = 1024
NEW_TOKENS = 64
# Largest logit difference allowed, relative to the largest reference logit: float32 through
# 30 layers in two frameworks. Measured on CPU: 2.4e-4 at a largest logit of 39.3 (6e-6
# relative), mean 1.0e-5, the same argmax at all 1024 positions.
LOGITS_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gguf_file():
    path = smollm2_path()
    if not path.is_file():
        pytest.skip(
            f"SmolLM2-135M-Instruct GGUF not cached at {path}: run python -m specattn_jax.fetch"
        )
    return path


@pytest.fixture(scope="module")
def ours(gguf_file):
    return load_pretrained(gguf_file)


@pytest.fixture(scope="module")
def reference(gguf_file):
    return transformers.LlamaForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def book_tokens(ours):
    try:
        text = split_books("test")[0].read()
    except SpecAttnError as e:
        pytest.skip(f"no Gutenberg test book: {e}")
    _, tokenizer = ours
    return tokenizer(text[:20000])["input_ids"][:WINDOW]


def _reference_greedy(reference, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def test_logits_over_a_book_window_match_transformers(ours, reference, book_tokens):
    model, _ = ours
    assert len(book_tokens) == WINDOW
    with torch.no_grad():
        expected = reference(torch.tensor([book_tokens])).logits[0].numpy()
    actual = np.asarray(model(np.asarray([book_tokens]))[0][0])
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= LOGITS_RELATIVE_TOLERANCE * scale
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.99


def test_greedy_book_continuation_and_one_turn_chat_match_transformers(
    ours, reference, book_tokens
):
    """Greedy, 64 tokens, after 256 tokens of the book and after a one-turn chat in the
    file's own template: one ragged batch of ours (one compile), each prompt alone in
    transformers."""
    model, tokenizer = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    prompts = [book_tokens[:256], chat]
    result = generate_autoregressive(model, prompts, max_new_tokens=NEW_TOKENS, eos_id=None)
    expected = [_reference_greedy(reference, prompt) for prompt in prompts]
    assert result.tokens == expected
    assert "Paris" in tokenizer.decode(expected[1])


def test_bfloat16_load_has_the_float32_loads_fingerprint(gguf_file, ours):
    """A layer map calibrated on the float32 load fits the bfloat16 load (a GPU's default):
    the dequantised Q4_1 weights are not representable in bfloat16."""
    model, _ = ours
    bf16_model, _ = load_pretrained(gguf_file, jnp.bfloat16)
    assert model_fingerprint(bf16_model) == model_fingerprint(model)
