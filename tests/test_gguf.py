"""GGUF checkpoints: our loader against transformers' own GGUF loading of the same file.

The files are written here as llama.cpp's converter writes them (its names, its RoPE row
permutation of q and k, the LM head left out when tied), from random `transformers` models,
in every supported tensor type. Quantised types go through `gguf`'s own quantiser; for the
K-quants, which it cannot write, the bytes are random with every byte below 0x20, so each
block's f16 scales stay small and finite.
"""

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import quant_shape_to_byte_shape, quantize

from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.cli import main
from specattn_jax.convert.gguf import SUPPORTED_TENSOR_TYPES, gguf_config, load_gguf_model
from specattn_jax.errors import CheckpointError
from specattn_jax.loading import load_pretrained
from specattn_jax.testing.tiny_models import max_relative_error, tiny_hf_config
from tests.test_convert import ORACLE_PROMPT, ORACLE_TOKENS
from tests.tolerances import HF_LOGITS_ATOL, HF_LOGITS_RTOL

# Rows of 256 values, so that the K-quants (blocks of 256) fit every matrix.
_SIZES = dict(hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=384)
_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _random_hf_model(tie: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_hf_config(num_kv_heads=2, tie_word_embeddings=tie)
    config.update(_SIZES)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _gguf_name(hf_key: str) -> str:
    stem, suffix = hf_key.rsplit(".", 1)
    if stem.startswith("model.layers."):
        layer, module = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{suffix}"
    return f"{_HF_TO_GGUF[stem]}.{suffix}"


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: HF's half-split RoPE rows to adjacent pairs."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _encode(array: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _K_QUANTS:
        byte_shape = quant_shape_to_byte_shape(array.shape, qtype)
        return rng.integers(0, 0x20, size=byte_shape, dtype=np.uint8)
    return quantize(array, qtype)


def write_gguf(path, model: transformers.LlamaForCausalLM, type_name: str, arch: str = "llama"):
    """`model` as a GGUF file: matrices in `type_name`, norms in F32, as llama.cpp writes."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(
        ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(config.vocab_size - 3)]
    )
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(config.vocab_size - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (config.vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if ".q_proj." in key:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in key:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 1:
            writer.add_tensor(_gguf_name(key), array)
        else:
            qtype = gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(_gguf_name(key), _encode(array, type_name, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tokens(vocab: int = 384, length: int = 24) -> list[int]:
    return np.random.default_rng(1).integers(3, vocab, length).tolist()


def _our_logits(source, tokens) -> np.ndarray:
    model, _ = load_pretrained(source)
    return np.asarray(model(np.asarray([tokens]))[0][0])


def _transformers_gguf_logits(path, tokens) -> np.ndarray:
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("type_name", SUPPORTED_TENSOR_TYPES)
def test_every_tensor_type_loads_as_transformers_loads_it(type_name, tmp_path):
    path = write_gguf(tmp_path / f"tiny.{type_name}.gguf", _random_hf_model(tie=False), type_name)
    tokens = _tokens()
    ours = _our_logits(path, tokens)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(
        ours,
        _transformers_gguf_logits(path, tokens),
        rtol=HF_LOGITS_RTOL,
        atol=HF_LOGITS_ATOL * np.abs(ours).max(),
    )


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_gguf_equals_the_model_it_was_written_from(tie, tmp_path):
    """GQA (4 query heads, 2 KV heads) and both head layouts, against the torch model itself."""
    hf = _random_hf_model(tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", hf, "F32")
    model, tokenizer = load_pretrained(path)
    assert model.config.tie_word_embeddings is tie
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert tokenizer.convert_ids_to_tokens([1, 2, 5]) == ["<s>", "</s>", "\u2581t2"]
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].numpy()
    ours = np.asarray(model(np.asarray([tokens]))[0][0])
    np.testing.assert_allclose(ours, expected, rtol=HF_LOGITS_RTOL, atol=HF_LOGITS_ATOL)


def test_convert_gguf_to_hf_on_the_cli(tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", _random_hf_model(tie=True), "Q8_0")
    main(["convert", str(path), str(tmp_path / "hf"), "--format", "hf"])
    assert "wrote hf checkpoint" in capsys.readouterr().out
    tokens = _tokens()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        converted = hf(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(
        converted, _our_logits(path, tokens), rtol=HF_LOGITS_RTOL, atol=HF_LOGITS_ATOL
    )
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").convert_ids_to_tokens(5)
        == "\u2581t2"
    )


def test_stories260k_gguf_greedy_oracle(stories260k_dir):
    """The same weights as the llama2.c `.bin`, through llama.cpp's converter: the same
    greedy output. Its padding id is llama.cpp's "none" (2**32 - 1), which transformers'
    GGUF tokenizer cannot read: one clear error, not an IndexError from inside transformers."""
    path = stories260k_dir / "stories260K.gguf"
    model = load_gguf_model(path)
    result = generate_autoregressive(model, [ORACLE_PROMPT], max_new_tokens=40, eos_id=None)
    assert result.tokens[0] == ORACLE_TOKENS
    with pytest.raises(CheckpointError, match="padding_token_id is 4294967295, outside its 512"):
        load_pretrained(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: write_gguf(p, _random_hf_model(tie=True), "F16", arch="qwen2"),
            "architecture 'qwen2'",
        ),
        (lambda p: write_gguf(p, _random_hf_model(tie=True), "MXFP4"), "of type MXFP4"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5), "not a readable GGUF"),
        (lambda p: p.write_text("not a gguf"), "not a readable GGUF"),
    ],
    ids=["other-architecture", "unsupported-type", "truncated", "not-gguf"],
)
def test_bad_gguf_is_one_clear_error(make, message, tmp_path):
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(path)


def test_bad_gguf_is_one_line_on_the_cli(tmp_path, capsys):
    path = write_gguf(tmp_path / "bad.gguf", _random_hf_model(tie=True), "MXFP4")
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MXFP4" in err[0] and "Traceback" not in err[0]


def test_config_reads_the_metadata(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _random_hf_model(tie=True), "F32")
    config = gguf_config(path)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (256, 512, 64)
    assert (config.num_hidden_layers, config.vocab_size, config.rope_theta) == (2, 384, 500000.0)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert max_relative_error(config.rms_norm_eps, 1e-5) < 1e-6
