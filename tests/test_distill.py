"""Distilling a draft from a verifier (`specattn train --distill-from`), on CPU in seconds:
the bundled verifier teaches a tiny draft on the synthetic corpus. The losses are checked
against numpy, the embedding initialisation against an SVD, and a run against the same run
with the plain next-token loss and with the attention loss; the exported draft then drafts
for the verifier."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax, softmax

from specattn_jax import SpecConfig, generate, load_pair, load_pretrained
from specattn_jax.cli import main as cli_main
from specattn_jax.config import LlamaConfig
from specattn_jax.distill import (
    DistillationLoss,
    attention_kl,
    attention_rows,
    embedding_from_verifier,
    plot_distillation,
)
from specattn_jax.layer_map import layer_groups
from specattn_jax.testing import tiny_hf_config
from specattn_jax.train import init_model

VERIFIER = "bundled:verifier"
TINY_DRAFT = tiny_hf_config(vocab_size=8192, tie_word_embeddings=True)
TINY_TRAIN = {
    "seq_len": 32,
    "batch_size": 4,
    "steps": 40,
    "warmup_steps": 5,
    "peak_lr": 1e-2,
    "eval_every": 40,
    "eval_windows": 4,
    "final_eval_windows": 8,
    "log_every": 10,
    "attention": "xla",
    "compute_dtype": "float32",
}


def _run_config(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": model, "train": TINY_TRAIN, "distill": {"lm_weight": 0}}))
    return path


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Metrics of three CLI runs from the same seed: distilled (lm_weight 0, exported), the
    plain next-token loss (--lm-weight 1), and distilled with the attention loss."""
    results = {}
    variants = (
        ("distilled", []),
        ("lm_only", ["--lm-weight", "1"]),
        ("attention", ["--attention-weight", "1"]),
    )
    for name, extra in variants:
        folder = tmp_path_factory.mktemp(name)
        argv = ["train", "--config", str(_run_config(folder, TINY_DRAFT))]
        argv += ["--distill-from", VERIFIER, "--data-dir", str(corpus)]
        argv += ["--out-dir", str(folder / "run"), "--export", str(folder / "hf"), *extra]
        assert cli_main(argv) == 0
        history = json.loads((folder / "run" / "history.json").read_text())
        results[name] = {"metrics": history["final"], "history": history, "folder": folder}
    return results


def _numpy_head_mean_attention(q, k, rows):
    """f64[B, R, T]: each head's causal softmax over keys 0..row for the queries at `rows`,
    averaged over heads (GQA: query head h reads KV head h // (H / H_kv))."""
    q, k = np.asarray(q, np.float64)[:, rows], np.asarray(k, np.float64)
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)  # [B, T, H, D]
    scores = np.einsum("brhd,bshd->bhrs", q, k) / np.sqrt(q.shape[-1])
    later = np.arange(k.shape[1])[None, :] > np.asarray(rows)[:, None]  # [R, T]
    scores = np.where(later, -np.inf, scores)
    return softmax(scores, axis=-1).mean(axis=1)


def _numpy_attention_kl(target, draft):
    """Mean over rows of sum_s target log(target / draft), over the keys the target reads."""
    read = target > 0
    ratio = np.log(np.where(read, target, 1) / np.where(read, draft, 1))
    return (target * ratio).sum(-1).mean()


def test_loss_is_the_kl_to_the_verifier_mixed_with_the_next_token_loss():
    config = LlamaConfig.from_hf(tiny_hf_config(vocab_size=11, num_layers=3))
    verifier, draft = init_model(config, seed=3), init_model(config, seed=4)
    for model in (verifier, draft):  # sharp attention, far from uniform
        for layer in model.layers:
            layer.self_attn.qkv_proj[...] = 30.0 * layer.self_attn.qkv_proj[...]
    graphdef, state = nnx.split(verifier)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 11, (2, 9)), jnp.int32)
    rows, groups = (2, 5, 7), ((0,), (1, 2), (2,))
    objective = DistillationLoss(graphdef, state, 0.3, 0.5, rows, groups)
    loss, parts = objective.loss(draft, tokens, state, "xla")

    # The reference reads both models through the cached forward (keys from the cache), and
    # does the rest in numpy.
    outputs = []
    for model in (verifier, draft):
        logits, cache, info = model(tokens[:, :-1], model.init_cache(2, 8), return_queries=True)
        keys = [cache.layer(layer).k for layer in range(3)]
        attention = [
            _numpy_head_mean_attention(q, k, rows) for q, k in zip(info.queries, keys, strict=True)
        ]
        outputs.append((logits, attention))
    (verifier_logits, verifier_attention), (draft_logits, draft_attention) = outputs
    p = softmax(np.asarray(verifier_logits, np.float64), axis=-1)
    log_q = log_softmax(np.asarray(draft_logits, np.float64), axis=-1)
    kl = (p * (np.log(p) - log_q)).sum(-1).mean()
    targets = np.asarray(tokens[:, 1:])
    ce = -np.take_along_axis(log_q, targets[..., None], axis=-1).mean()
    attention = []
    for draft_layer, group in enumerate(groups):
        target = np.mean([verifier_attention[v] for v in group], axis=0)
        attention.append(_numpy_attention_kl(target, draft_attention[draft_layer]))
    np.testing.assert_allclose(parts["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(parts["attention_kl"], np.mean(attention), rtol=1e-4)
    assert parts["attention_kl"] > 0.05
    np.testing.assert_allclose(loss, 0.7 * kl + 0.3 * ce + 0.5 * np.mean(attention), rtol=1e-4)
    # Without the attention term the loss is the token mix alone and asks for no queries.
    loss, parts = DistillationLoss(graphdef, state, 0.3).loss(draft, tokens, state, "xla")
    assert "attention_kl" not in parts
    np.testing.assert_allclose(loss, 0.7 * kl + 0.3 * ce, rtol=1e-5)


def test_attention_loss_compares_head_mean_attention_across_head_layouts():
    """attention_kl on raw queries and keys: a draft of 4/2 heads of dim 8 against a
    verifier of 6/3 heads of dim 16, groups of verifier layers averaged."""
    rng = np.random.default_rng(1)
    batch, seq, rows, groups = 2, 12, (0, 4, 11), ((0,), (1, 2))
    draft_q, draft_k = (rng.normal(size=(2, batch, seq, h, 8)) for h in (4, 2))
    verifier_q, verifier_k = (rng.normal(size=(3, batch, seq, h, 16)) for h in (6, 3))
    got = attention_kl(
        *(jnp.asarray(x, jnp.float32) for x in (draft_q, draft_k, verifier_q, verifier_k)),
        rows,
        groups,
    )
    want = []
    for draft_layer, group in enumerate(groups):
        target = np.mean(
            [_numpy_head_mean_attention(verifier_q[v], verifier_k[v], rows) for v in group], 0
        )
        draft = _numpy_head_mean_attention(draft_q[draft_layer], draft_k[draft_layer], rows)
        want.append(_numpy_attention_kl(target, draft))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)
    # The draft's own attention as the target: zero.
    same = attention_kl(
        *(jnp.asarray(x, jnp.float32) for x in (draft_q, draft_k, draft_q, draft_k)),
        rows,
        ((0,), (1,)),
    )
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_layer_groups_and_rows_cover_what_the_attention_loss_reads():
    assert layer_groups(30, 8) == (
        (0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10), (11, 12, 13, 14),
        (15, 16, 17, 18), (19, 20, 21), (22, 23, 24, 25), (26, 27, 28, 29),
    )  # fmt: skip
    assert layer_groups(4, 4) == ((0,), (1,), (2,), (3,))
    with pytest.raises(Exception, match="a draft of 1..3 layers"):
        layer_groups(3, 4)
    rows = attention_rows(8192, 64)
    assert len(rows) == 64 and rows[0] == 1024 and rows[-1] == 8191
    assert list(rows) == sorted(set(rows))
    assert attention_rows(32, 64) == tuple(range(4, 32))


def test_embedding_starts_on_the_verifier_principal_directions():
    rng = np.random.default_rng(0)
    # A verifier embedding with a few strong directions and a weak rest.
    strong = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 48)) * 3.0
    embedding = strong + rng.normal(size=(300, 48)) * 0.1
    draft = embedding_from_verifier(embedding, 6)
    assert draft.shape == (300, 6)
    np.testing.assert_allclose(draft.std(), 0.02, rtol=1e-5)
    # The draft's columns span the verifier's top 6 left singular vectors.
    left, _, _ = np.linalg.svd(embedding, full_matrices=False)
    basis, _ = np.linalg.qr(draft)
    np.testing.assert_allclose(basis @ basis.T, left[:, :6] @ left[:, :6].T, atol=1e-5)
    with pytest.raises(Exception, match="hidden_size=64 <= the verifier's 48"):
        embedding_from_verifier(embedding, 64)


def test_distillation_brings_the_draft_closer_to_the_verifier(runs):
    distilled, lm_only = runs["distilled"]["metrics"], runs["lm_only"]["metrics"]
    for metrics in (distilled, lm_only):
        assert metrics["params_ratio"] > 40 and metrics["steps"] == 40
    assert distilled["distill_config"]["lm_weight"] == 0.0
    assert lm_only["distill_config"]["lm_weight"] == 1.0
    # Same seed, data and steps: only the loss differs, and the KL-trained draft is closer.
    assert distilled["kl_verifier_to_draft"] < 0.8 * lm_only["kl_verifier_to_draft"]
    assert distilled["greedy_agreement"] > lm_only["greedy_agreement"]
    kl = [row["kl"] for row in runs["distilled"]["history"]["train"]]
    assert kl[-1] < 0.7 * kl[0]


def test_the_attention_loss_brings_the_draft_attention_to_the_verifier(runs):
    distilled, attention = runs["distilled"]["metrics"], runs["attention"]["metrics"]
    assert attention["distill_config"]["attention_weight"] == 1.0
    assert "attention_kl" in runs["attention"]["history"]["train"][0]
    # Same seed, data and steps: the run with the attention loss attends more like the
    # verifier on validation windows, at a next-token KL not much worse.
    assert attention["attention_kl"] < 0.8 * distilled["attention_kl"]
    assert attention["kl_verifier_to_draft"] < 1.2 * distilled["kl_verifier_to_draft"]


@pytest.mark.parametrize("name", ["distilled", "attention"])
def test_the_run_plots_its_curves(runs, name, tmp_path):
    path = plot_distillation(runs[name]["history"], tmp_path / "curves.png", "a run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_exported_draft_drafts_for_the_verifier(runs):
    export = runs["distilled"]["folder"] / "hf"
    draft, verifier, tokenizer = load_pair(VERIFIER, str(export))
    assert tokenizer.get_vocab() == load_pretrained(export)[1].get_vocab()
    assert (draft.config.bos_token_id, draft.config.eos_token_id) == (1, 2)
    prompt = tokenizer("The old man saw a ship into night. The young woman")["input_ids"]
    options = dict(max_new_tokens=24, eos_id=None)
    reference = generate(None, verifier, [prompt], **options)
    result = generate(draft, verifier, [prompt], SpecConfig(gamma=3), **options)
    assert result.tokens == reference.tokens
    assert result.stats["acceptance_rate"] > 0


@pytest.mark.parametrize(
    "model, extra, message",
    [
        (
            {**TINY_DRAFT, "vocab_size": 4096},
            [],
            "the draft's vocab_size 4096 differs from the verifier's 8192",
        ),
        (TINY_DRAFT, ["--lm-weight", "1.5"], "lm_weight=1.5 must be in [0, 1]"),
        (TINY_DRAFT, ["--tokenizer", "x"], "--tokenizer does not apply to --distill-from"),
        (
            TINY_DRAFT,
            ["--attention-weight", "-1"],
            "attention_weight=-1.0 must be >= 0",
        ),
        (
            {**TINY_DRAFT, "num_hidden_layers": 9},
            ["--attention-weight", "1"],
            "the attention loss needs a draft of 1..8 layers",
        ),
    ],
    ids=["vocabulary", "lm-weight", "tokenizer", "attention-weight", "deeper-draft"],
)
def test_bad_distillation_input_is_one_error(model, extra, message, corpus, tmp_path, capsys):
    argv = ["train", "--config", str(_run_config(tmp_path, model)), "--distill-from", VERIFIER]
    argv += ["--data-dir", str(corpus), "--out-dir", str(tmp_path / "run"), *extra]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.startswith(f"specattn: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("option", ["--lm-weight", "--attention-weight"])
def test_loss_weights_need_a_verifier(option, tmp_path, capsys):
    argv = ["train", "--config", str(_run_config(tmp_path, TINY_DRAFT)), option, "0.5"]
    code, _, err = _cli(argv + ["--out-dir", str(tmp_path)], capsys)
    assert (code, err.strip()) == (2, f"specattn: error: {option} needs --distill-from")
