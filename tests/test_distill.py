"""Distilling a draft from a verifier (`specattn train --distill-from`), on CPU in seconds:
the bundled verifier teaches a tiny draft on the synthetic corpus. The loss is checked
against numpy, the embedding initialisation against an SVD, and a run against the same run
with the plain next-token loss; the exported draft then drafts for the verifier."""

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
from specattn_jax.distill import DistillationLoss, embedding_from_verifier, plot_distillation
from specattn_jax.model import forward
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


def _run_config(tmp_path: Path, model: dict, lm_weight: float = 0.0) -> Path:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"model": model, "train": TINY_TRAIN, "distill": {"lm_weight": lm_weight}})
    )
    return path


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Metrics of two CLI runs from the same seed: distilled (lm_weight 0, exported) and the
    plain next-token loss (--lm-weight 1)."""
    results = {}
    for name, extra in (("distilled", []), ("lm_only", ["--lm-weight", "1"])):
        folder = tmp_path_factory.mktemp(name)
        argv = ["train", "--config", str(_run_config(folder, TINY_DRAFT))]
        argv += ["--distill-from", VERIFIER, "--data-dir", str(corpus)]
        argv += ["--out-dir", str(folder / "run"), "--export", str(folder / "hf"), *extra]
        assert cli_main(argv) == 0
        history = json.loads((folder / "run" / "history.json").read_text())
        results[name] = {"metrics": history["final"], "history": history, "folder": folder}
    return results


def test_loss_is_the_kl_to_the_verifier_mixed_with_the_next_token_loss():
    config = LlamaConfig.from_hf(tiny_hf_config(vocab_size=11))
    verifier = init_model(config, seed=3)
    graphdef, state = nnx.split(verifier)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 11, (2, 9)), jnp.int32)
    draft_logits = jnp.asarray(rng.normal(size=(2, 8, 11)) * 2, jnp.float32)
    loss, parts = DistillationLoss(graphdef, state, 0.3).loss(draft_logits, tokens, state, "xla")

    # The reference reads the verifier through the cached forward, and does the rest in numpy.
    verifier_logits, _, _ = forward(graphdef, state, tokens[:, :-1], verifier.init_cache(2, 8))
    p = softmax(np.asarray(verifier_logits, np.float64), axis=-1)
    log_q = log_softmax(np.asarray(draft_logits, np.float64), axis=-1)
    kl = (p * (np.log(p) - log_q)).sum(-1).mean()
    targets = np.asarray(tokens[:, 1:])
    ce = -np.take_along_axis(log_q, targets[..., None], axis=-1).mean()
    np.testing.assert_allclose(parts["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * kl + 0.3 * ce, rtol=1e-5)


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


def test_the_run_plots_its_curves(runs, tmp_path):
    path = plot_distillation(runs["distilled"]["history"], tmp_path / "curves.png", "a run")
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
    ],
    ids=["vocabulary", "lm-weight", "tokenizer"],
)
def test_bad_distillation_input_is_one_error(model, extra, message, corpus, tmp_path, capsys):
    argv = ["train", "--config", str(_run_config(tmp_path, model)), "--distill-from", VERIFIER]
    argv += ["--data-dir", str(corpus), "--out-dir", str(tmp_path / "run"), *extra]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.startswith(f"specattn: error: {message}") and err.count("\n") == 1


def test_lm_weight_needs_a_verifier(tmp_path, capsys):
    argv = ["train", "--config", str(_run_config(tmp_path, TINY_DRAFT)), "--lm-weight", "0.5"]
    code, _, err = _cli(argv + ["--out-dir", str(tmp_path)], capsys)
    assert (code, err.strip()) == (2, "specattn: error: --lm-weight needs --distill-from")
