"""The bundled draft/verifier pair (`specattn_jax/assets/`): it loads in transformers and in
the project's loader with the same logits, and it learned English from the Gutenberg books."""

import functools
import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax.data import default_data_dir, load_split_texts, split_books
from specattn_jax.loading import ASSETS, load_pretrained
from specattn_jax.model import count_params, forward
from specattn_jax.testing import max_relative_error
from specattn_jax.train import causal_lm_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_LOGITS_RTOL = 1e-4
GUTENBERG = default_data_dir()  # ../shared/data/gutenberg beside the checkout
NAMES = ["verifier", "draft"]
PPL_BOOK = "pg10068.txt"  # a test-split book
EXCERPT_TOKENS = 2048
PROMPTS = ["It was a dark and stormy night, and", "When I came into the room, she"]
_WORD = re.compile(r"[a-z]+")


@pytest.fixture(scope="module")
def gutenberg():
    if not (GUTENBERG / "MANIFEST.tsv").is_file():
        pytest.skip(f"../shared/data/gutenberg is not beside the checkout ({GUTENBERG})")
    return GUTENBERG


@functools.cache
def _bundled(name):
    return load_pretrained(f"bundled:{name}")


@functools.cache
def _scores(name):
    """Jitted fp32 full-sequence logits of a bundled model."""
    graphdef, state = nnx.split(_bundled(name)[0])
    return jax.jit(lambda tokens: causal_lm_logits(nnx.merge(graphdef, state), tokens))


def _excerpt_ids(text: str, tokenizer, count: int) -> list[int]:
    """`count` tokens from the middle of a text (BOS first), on whole lines."""
    start = text.index("\n", len(text) // 2) + 1
    ids = tokenizer(text[start : start + 12 * count])["input_ids"][:count]
    assert len(ids) == count
    return ids


def test_pair_shapes_and_shared_tokenizer():
    verifier, draft = _bundled("verifier")[0], _bundled("draft")[0]
    assert 12e6 <= count_params(verifier) <= 16e6
    assert 1e6 <= count_params(draft) <= 3e6
    for model in (verifier, draft):
        assert (model.config.vocab_size, model.config.head_dim) == (8192, 64)
        assert model.config.max_position_embeddings == 2048
    digests = {
        name: hashlib.sha256((ASSETS / name / "tokenizer.json").read_bytes()).hexdigest()
        for name in NAMES
    }
    assert digests["verifier"] == digests["draft"]
    tokenizer = _bundled("verifier")[1]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (1, 2, 8192)
    size = sum(p.stat().st_size for name in NAMES for p in (ASSETS / name).iterdir())
    assert size < 40e6
    for name in NAMES:
        assert {"TRAINING.md", "loss_curves.png"} <= {p.name for p in (ASSETS / name).iterdir()}


@pytest.mark.parametrize("name", NAMES)
def test_transformers_and_our_loader_agree(name, gutenberg):
    model, tokenizer = _bundled(name)
    text = split_books("validation", gutenberg)[0].read()
    ids = _excerpt_ids(text, tokenizer, 256)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(ASSETS / name), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    graphdef, state = nnx.split(model)
    cached, _, _ = forward(graphdef, state, jnp.asarray([ids]), model.init_cache(1, len(ids)))
    assert max_relative_error(cached, expected) <= HF_LOGITS_RTOL
    assert max_relative_error(_scores(name)(jnp.asarray([ids])), expected) <= HF_LOGITS_RTOL


def test_verifier_beats_draft_beats_unigram(gutenberg):
    tokenizer = _bundled("verifier")[1]
    book = next(b for b in split_books("test", gutenberg) if b.file == PPL_BOOK)
    ids = np.asarray(_excerpt_ids(book.read(), tokenizer, EXCERPT_TOKENS + 1))
    targets = ids[1:]
    perplexity = {}
    for name in NAMES:
        logits = _scores(name)(jnp.asarray(ids[None, :-1]))[0]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -np.asarray(jnp.take_along_axis(log_probs, targets[:, None], axis=-1)).mean()
        perplexity[name] = float(np.exp(nll))
    # The best unigram model of this very text (its own token frequencies): a lower bound on
    # any unigram model's perplexity.
    counts = np.bincount(targets, minlength=8192)
    p = counts[counts > 0] / counts.sum()
    perplexity["unigram"] = float(np.exp(-(p * np.log(p)).sum()))
    assert perplexity["verifier"] < perplexity["draft"], perplexity
    assert perplexity["draft"] < 0.5 * perplexity["unigram"], perplexity
    assert perplexity["verifier"] < 100, perplexity


def _greedy(name: str, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy continuations of a batch of prompts (ragged prefill, then one token a step)."""
    model, tokenizer = _bundled(name)
    graphdef, state = nnx.split(model)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    cache = model.init_cache(len(prompts), int(lengths.max()) + new_tokens)
    logits, cache, _ = forward(
        graphdef, state, jnp.asarray(tokens), cache, jnp.asarray(lengths), last_logits_only=True
    )
    out = []
    for _ in range(new_tokens):
        out.append(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        logits, cache, _ = forward(graphdef, state, out[-1][:, None], cache)
    generated = np.asarray(jnp.stack(out, axis=1))
    return [tokenizer.decode(row, skip_special_tokens=True) for row in generated]


def test_verifier_continues_in_english(gutenberg):
    vocabulary = {
        w for text in load_split_texts("train", gutenberg) for w in _WORD.findall(text.lower())
    }
    words = [w for text in _greedy("verifier", PROMPTS, 40) for w in _WORD.findall(text.lower())]
    assert len(words) >= 40, words
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.95, [w for w in words if w not in vocabulary]
