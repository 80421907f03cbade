"""The training recipe on a tiny model and a tiny synthetic corpus (CPU, seconds): the loss
falls, a seed fixes the run, checkpoints and the HF export load back."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.convert.orbax_io import load_orbax
from specattn_jax.data import load_split_texts, split_books
from specattn_jax.loading import load_pretrained
from specattn_jax.model import count_params, forward
from specattn_jax.testing import tiny_hf_config
from specattn_jax.tokenizer_training import BOS_ID, EOS_ID, save_tokenizer, train_bpe
from specattn_jax.train import (
    TrainConfig,
    causal_lm_logits,
    eval_windows,
    export_model,
    init_model,
    learning_rate,
    load_run_config,
    tokenize_split,
    train,
    train_windows,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    texts = load_split_texts("train", corpus, verify=True)
    return save_tokenizer(train_bpe(texts, vocab_size=300), tmp_path_factory.mktemp("tok"))


TINY_MODEL = LlamaConfig.from_hf({**tiny_hf_config(vocab_size=320), "max_position_embeddings": 64})
TINY_TRAIN = TrainConfig(
    seq_len=32,
    batch_size=4,
    steps=30,
    warmup_steps=5,
    peak_lr=1e-2,
    eval_every=15,
    eval_windows=4,
    final_eval_windows=8,
    log_every=5,
    checkpoint_every=15,
    attention="xla",
)


@pytest.fixture(scope="module")
def two_runs(corpus, tokenizer_dir, tmp_path_factory):
    """Two runs of the same config and seed, in separate folders."""
    return [
        train(
            TINY_TRAIN,
            TINY_MODEL,
            tmp_path_factory.mktemp(f"run{i}"),
            corpus,
            tokenizer_dir,
            progress=False,
        )
        for i in range(2)
    ]


def test_splits_follow_the_manifest(corpus):
    assert [b.file for b in split_books("train", corpus)] == ["pg0.txt", "pg1.txt", "pg3.txt"]
    assert [b.file for b in split_books("validation", corpus)] == ["pg2.txt"]
    assert [b.file for b in split_books("test", corpus)] == ["pg4.txt"]


def test_tokenizer_loads_with_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)
    assert len(tokenizer) == 300
    text = "The old man saw a ship into night.\nThe sea!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_token_stream_wraps_each_book(corpus, tokenizer_dir, tmp_path):
    stream = tokenize_split("train", corpus, tokenizer_dir, tmp_path)
    assert stream[0] == BOS_ID and stream[-1] == EOS_ID
    assert (stream == BOS_ID).sum() == 3 and (stream == EOS_ID).sum() == 3
    cached = tokenize_split("train", corpus, tokenizer_dir, tmp_path)
    np.testing.assert_array_equal(stream, cached)
    assert len(list(tmp_path.glob("train-*.npy"))) == 1


def test_data_order_is_seeded():
    stream = np.arange(1000, dtype=np.uint16)
    first = [next(b) for b in [train_windows(stream, 16, 4, seed=3)] for _ in range(30)]
    again = train_windows(stream, 16, 4, seed=3)
    for batch in first:
        np.testing.assert_array_equal(batch, next(again))
    assert first[0].shape == (4, 17)
    np.testing.assert_array_equal(np.diff(first[0], axis=1), 1)  # contiguous windows
    other = next(train_windows(stream, 16, 4, seed=4))
    assert not np.array_equal(first[0], other)


def test_eval_windows_score_every_token_once():
    stream = np.arange(101, dtype=np.uint16)
    windows = eval_windows(stream, 10)
    assert windows.shape == (10, 11)
    np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 101))
    assert eval_windows(stream, 10, count=3)[:, 0].tolist() == [0, 40, 90]


def test_learning_rate_schedule():
    config = dataclasses.replace(TINY_TRAIN, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(s, 100, config) for s in range(100)]
    assert lrs[9] == pytest.approx(config.peak_lr)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 * config.peak_lr, rel=1e-2)


@pytest.mark.parametrize(
    "layout",
    [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True)],
    ids=["gqa", "mqa-tied"],
)
def test_training_forward_matches_the_cached_forward(layout):
    config = LlamaConfig.from_hf(tiny_hf_config(**layout))
    model = init_model(config, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)), jnp.int32)
    graphdef, state = nnx.split(model)
    reference, _, _ = forward(graphdef, state, tokens, model.init_cache(2, 24))
    np.testing.assert_allclose(causal_lm_logits(model, tokens), reference, rtol=1e-5, atol=1e-5)


def test_loss_decreases(two_runs):
    history = two_runs[0].history
    losses = [row["loss"] for row in history["train"]]
    assert losses[0] > math.log(300) - 1.0  # starts near uniform
    assert losses[-1] < losses[0] - 2.0
    val = [row["val_loss"] for row in history["eval"]]
    assert val[-1] < val[0]
    metrics = two_runs[0].metrics
    assert metrics["steps"] == 30 and metrics["tokens_seen"] == 30 * 4 * 32
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_ppl"] < 30


def test_same_seed_same_run(two_runs):
    first, second = two_runs
    assert [r["loss"] for r in first.history["train"]] == [
        r["loss"] for r in second.history["train"]
    ]
    for a, b in zip(
        jax.tree.leaves(nnx.state(first.model)),
        jax.tree.leaves(nnx.state(second.model)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_other_seed_and_a_time_budget(corpus, tokenizer_dir, tmp_path, two_runs):
    """Another seed gives another run; a budget too small for any step keeps warmup + 1."""
    config = dataclasses.replace(
        TINY_TRAIN, seed=1, steps=10, calibration_steps=2, time_budget_s=1e-9, eval_every=10
    )
    result = train(config, TINY_MODEL, tmp_path, corpus, tokenizer_dir, progress=False)
    assert result.history["train"][0]["loss"] != two_runs[0].history["train"][0]["loss"]
    assert result.metrics["steps"] == TINY_TRAIN.warmup_steps + 1


def test_split_as_a_datasets_table(corpus):
    pytest.importorskip("datasets")
    from specattn_jax.data import load_split_dataset

    table = load_split_dataset("train", corpus, verify=True)
    assert table.column_names == ["file", "gutenberg_id", "title", "author", "text"]
    assert table["file"] == ["pg0.txt", "pg1.txt", "pg3.txt"]
    assert table["text"][1] == (corpus / "pg1.txt").read_text()


def test_checkpoints_and_export_load_back(two_runs, tokenizer_dir, tmp_path):
    result = two_runs[0]
    out_dir = Path(result.history["out_dir"])
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == [
        "step_000015",
        "step_000030",
    ]
    restored = load_orbax(out_dir / "checkpoints" / "step_000030")
    for a, b in zip(
        jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(result.model)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert json.loads((out_dir / "history.json").read_text())["final"] == result.metrics

    export_model(result.model, tmp_path / "hf", tokenizer_dir)
    model, tokenizer = load_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert tokenizer.bos_token_id == BOS_ID
    tokens = jnp.asarray([[BOS_ID, 50, 60, 70, 80]], jnp.int32)
    rounded = causal_lm_logits(nnx.merge(*_bf16_rounded(result.model)), tokens)
    np.testing.assert_allclose(causal_lm_logits(model, tokens), rounded, rtol=1e-5, atol=1e-5)


def _bf16_rounded(model):
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), state)


@pytest.mark.parametrize("name, low, high", [("verifier", 12e6, 16e6), ("draft", 1e6, 3e6)])
def test_shipped_configs(name, low, high):
    train_config, model_config = load_run_config(CONFIGS / f"{name}.json")
    assert low <= count_params(nnx.eval_shape(lambda: init_model(model_config, 0))) <= high
    assert (model_config.vocab_size, model_config.max_position_embeddings) == (8192, 2048)
    assert (model_config.head_dim, train_config.seq_len) == (64, 2048)
