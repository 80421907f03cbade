"""Checkpoint conversion: HF <-> NNX, orbax, llama2.c, and the errors for bad checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.config import LlamaConfig
from specattn_jax.convert._params import params_of
from specattn_jax.convert.hf import load_hf_model, save_hf_model
from specattn_jax.convert.llama2c import llama2c_tokenizer, load_llama2c_model
from specattn_jax.convert.orbax_io import load_orbax, save_orbax
from specattn_jax.errors import CheckpointError
from specattn_jax.loading import load_pretrained
from specattn_jax.testing import (
    max_relative_error,
    tiny_hf_config,
    tiny_llama,
    write_tiny_hf_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ORACLE_PROMPT = [1, 403, 407, 261, 378]
ORACLE_TOKENS = [
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408,
    419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
    266, 268, 388, 426,
]  # fmt: skip
ORACLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball."
)


def _logits(model, tokens):
    logits, _, _ = model(jnp.asarray(tokens), model.init_cache(*tokens.shape))
    return np.asarray(logits)


def _tokens(vocab=128, shape=(2, 17)):
    return np.random.default_rng(0).integers(0, vocab, shape, dtype=np.int32)


@pytest.mark.parametrize(
    "layout",
    [dict(num_kv_heads=2), dict(num_kv_heads=1, tie_word_embeddings=True, llama3_rope=True)],
    ids=["gqa", "mqa-tied-llama3"],
)
def test_export_loads_in_transformers_with_same_logits(tmp_path, layout):
    model = tiny_llama(seed=3, **layout)
    save_hf_model(model, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    assert max_relative_error(_logits(model, tokens), expected) <= 1e-4
    reloaded = load_hf_model(tmp_path / "hf")
    for path, value in params_of(model).items():
        np.testing.assert_array_equal(params_of(reloaded)[path], value)


def test_sharded_safetensors_reload_exactly(tmp_path):
    model = tiny_llama(seed=4)
    save_hf_model(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    reloaded = load_hf_model(tmp_path)
    for path, value in params_of(model).items():
        np.testing.assert_array_equal(params_of(reloaded)[path], value)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf_model = write_tiny_hf_checkpoint(tmp_path, tiny_hf_config(), safe_serialization=False)
    if not (
        tmp_path / "pytorch_model.bin"
    ).is_file():  # newer transformers always write safetensors
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    assert max_relative_error(_logits(load_hf_model(tmp_path), tokens), expected) <= 1e-4


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    model = tiny_llama(seed=6)
    save_hf_model(model, tmp_path, dtype="bfloat16")
    reloaded = load_hf_model(tmp_path, dtype=jnp.bfloat16)
    assert reloaded.dtype == jnp.bfloat16
    expected = params_of(model)[("embed_tokens",)].astype(jnp.bfloat16)
    np.testing.assert_array_equal(params_of(reloaded)[("embed_tokens",)], expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_orbax_round_trip_is_bit_exact(tmp_path, dtype):
    from specattn_jax.convert._params import model_from_params

    base = tiny_llama(seed=7, llama3_rope=True)
    model = model_from_params(base.config, params_of(base), dtype, source="test")
    save_orbax(model, tmp_path / "ckpt")
    restored = load_orbax(tmp_path / "ckpt")
    assert restored.config.rope_scaling == model.config.rope_scaling
    for path, value in params_of(model).items():
        restored_value = params_of(restored)[path]
        assert restored_value.dtype == value.dtype
        np.testing.assert_array_equal(restored_value, value)
    via_loader, _ = load_pretrained(tmp_path / "ckpt", dtype=dtype)
    np.testing.assert_array_equal(_logits(via_loader, _tokens()), _logits(model, _tokens()))


def test_stories260k_greedy_oracle_through_llama2c_import(stories260k_dir):
    model, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin")
    prompt = tokenizer("Once upon a time")["input_ids"]
    assert prompt == ORACLE_PROMPT
    result = generate_autoregressive(model, [prompt], max_new_tokens=40, eos_id=None)
    assert result.tokens[0] == ORACLE_TOKENS
    assert tokenizer.decode(prompt + result.tokens[0], skip_special_tokens=True) == ORACLE_TEXT


def test_stories260k_oracle_after_export_to_hf_and_transformers(stories260k_dir, tmp_path):
    model = load_llama2c_model(stories260k_dir / "stories260K.bin")
    tokenizer = llama2c_tokenizer(stories260k_dir / "tok512.bin")
    save_hf_model(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = hf_tokenizer("Once upon a time")["input_ids"]
    assert prompt == ORACLE_PROMPT
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None
        )
    assert out[0, len(prompt) :].tolist() == ORACLE_TOKENS
    assert hf_tokenizer.decode(out[0].tolist(), skip_special_tokens=True) == ORACLE_TEXT
    reloaded, reloaded_tokenizer = load_pretrained(tmp_path)
    result = generate_autoregressive(reloaded, [prompt], max_new_tokens=40, eos_id=None)
    assert result.tokens[0] == ORACLE_TOKENS


# Bad input: each one clear error naming the problem.


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(CheckpointError, match="no weights in"):
        load_hf_model(tmp_path)


def test_truncated_safetensors_is_named(tmp_path):
    save_hf_model(tiny_llama(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors"):
        load_hf_model(tmp_path)


def test_non_llama_model_type_is_named(tmp_path):
    save_hf_model(tiny_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type='mistral' is not supported"):
        load_hf_model(tmp_path)


def test_wrong_tensor_shape_is_named(tmp_path):
    save_hf_model(tiny_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"mlp.down_proj.weight' has shape \(32, 64\), the config needs \(32, 48\)",
    ):
        load_hf_model(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_hf_model(tiny_llama(num_layers=2), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors for \['layers.2"):
        load_hf_model(tmp_path)
    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.layers.1.* does not fit this config"):
        load_hf_model(tmp_path)


def test_unmapped_key_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_hf_model(tiny_llama(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_norm.weight' is not a Llama parameter"):
        load_hf_model(tmp_path)


def test_truncated_llama2c_checkpoint_is_named(stories260k_dir, tmp_path):
    data = (stories260k_dir / "stories260K.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "tok512.bin").write_bytes((stories260k_dir / "tok512.bin").read_bytes())
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(tmp_path / "model.bin")


def test_hub_id_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be downloaded"):
        load_pretrained("meta-llama/Llama-2-7b-hf")


def test_several_stop_tokens_from_config_and_generation_config(tmp_path):
    """Llama-3-Instruct lists three stop tokens; `generation_config.json`'s list, when the
    checkpoint has one, is the one `generate` honours (as in transformers)."""
    config = tiny_hf_config()
    config["eos_token_id"] = [2, 5, 7]
    write_tiny_hf_checkpoint(tmp_path, config)
    model, _ = load_pretrained(tmp_path)
    assert model.config.eos_token_ids == (2, 5, 7)
    assert LlamaConfig.from_hf(model.config.to_hf()).eos_token_ids == (2, 5, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11]}))
    model, _ = load_pretrained(tmp_path)
    assert model.config.eos_token_ids == (9, 11)
