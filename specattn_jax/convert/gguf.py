"""GGUF checkpoints (llama.cpp's format) -> NNX `Llama`, read with the `gguf` package.

The `gguf` package parses the file and dequantises each tensor (`gguf.quants.dequantize`);
this module only maps llama.cpp's names and layouts onto HF's, then hands the tensors to the
HF loader's checks (`hf.params_from_hf_tensors`), one tensor in memory at a time:
  token_embd / output_norm / output             model.embed_tokens / model.norm / lm_head
  blk.N.attn_norm / ffn_norm                    input_layernorm / post_attention_layernorm
  blk.N.attn_{q,k,v,output}                     self_attn.{q,k,v,o}_proj
  blk.N.ffn_{gate,up,down}                      mlp.{gate,up,down}_proj
llama.cpp's converter permutes the rows of q and k to rotate adjacent pairs in RoPE; they are
permuted back to HF's half-split rotation. A file without `output.weight` ties the LM head to
the embedding. The tokenizer comes from transformers' own GGUF support.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from specattn_jax.config import LlamaConfig, eos_token_field
from specattn_jax.convert._params import model_from_params
from specattn_jax.convert.hf import params_from_hf_tensors, rotary_pairs_to_halves
from specattn_jax.errors import CheckpointError
from specattn_jax.model import Llama

# Tensor types this loader reads: each is covered by a test against transformers' own GGUF
# loading. The I-quants, ternary and FP4 types are refused by name.
SUPPORTED_TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# The special tokens transformers' GGUF tokenizer looks up by id.
_SPECIAL_TOKEN_IDS = tuple(
    f"tokenizer.ggml.{name}_token_id" for name in ("bos", "eos", "unknown", "padding")
)
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<name>\w+)\.(?P<suffix>weight|bias)")


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(path: str | Path, reader=None) -> LlamaConfig:
    """The `LlamaConfig` of a GGUF file, from its `llama.*` and `tokenizer.ggml.*` metadata."""
    path = Path(path)
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path} holds a GGUF model of architecture {arch!r}; specattn-jax loads "
            f"Llama-family models (architecture 'llama')"
        )
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path} uses RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}), "
            f"which the GGUF loader does not read; convert the HF checkpoint instead"
        )
    try:
        hidden = int(_field(reader, "llama.embedding_length"))
        heads = int(_field(reader, "llama.attention.head_count"))
        layers = int(_field(reader, "llama.block_count"))
        intermediate = int(_field(reader, "llama.feed_forward_length"))
    except TypeError:
        raise CheckpointError(f"{path} lacks the llama.* sizes in its metadata") from None
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_stop_tokens(reader, int(vocab)),
    )


def _stop_tokens(reader, vocab: int) -> int | tuple[int, ...] | None:
    """End of text, and end of turn and of message where the file names them (llama.cpp
    stops generation at each; an id outside the vocabulary is its "none")."""
    ids = []
    for key in ("eos", "eot", "eom"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id < vocab and token_id not in ids:
            ids.append(int(token_id))
    return eos_token_field(ids)


def _hf_key(name: str) -> str | None:
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        return None
    layer, base, suffix = match.group("layer", "name", "suffix")
    if layer is None:
        hf = _GLOBAL_NAMES.get(base)
        return None if hf is None else f"{hf}.{suffix}"
    hf = _LAYER_NAMES.get(base)
    return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"


def _iter_hf_tensors(
    reader, config: LlamaConfig, path: Path
) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(HF key, f32 tensor in HF's layout, file) for each tensor of the file."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is of type {type_name}, which the GGUF loader "
                f"does not read (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
        key = _hf_key(tensor.name)
        if key is None:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not a Llama parameter")
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            array = rotary_pairs_to_halves(array, config.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            array = rotary_pairs_to_halves(array, config.num_key_value_heads)
        yield key, array, path


def load_gguf_model(path: str | Path, dtype=jnp.float32, place=None) -> Llama:
    """A `Llama` of `dtype` with the (dequantised) weights of a GGUF file.

    Raises `CheckpointError` for a file that is not GGUF, a model other than Llama, RoPE
    scaling, a tensor type outside `SUPPORTED_TENSOR_TYPES`, or tensors that do not fit.
    """
    path = Path(path)
    reader = _reader(path)
    config = gguf_config(path, reader)
    params = params_from_hf_tensors(config, _iter_hf_tensors(reader, config, path), path)
    return model_from_params(config, params, dtype, source=str(path), place=place)


def load_gguf_tokenizer(path: str | Path):
    """The file's tokenizer (and chat template), rebuilt by transformers' GGUF support.

    Raises `CheckpointError` when a special-token id lies outside the vocabulary (llama.cpp
    writes 2**32 - 1 for "none", which transformers cannot read).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    reader = _reader(path)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    for key in _SPECIAL_TOKEN_IDS:
        token_id = _field(reader, key)
        if token_id is not None and not 0 <= token_id < vocab:
            raise CheckpointError(
                f"{path}: {key} is {token_id}, outside its {vocab}-token vocabulary, so "
                f"transformers cannot rebuild its tokenizer; load the weights alone with "
                f"specattn_jax.convert.gguf.load_gguf_model"
            )
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its tokenizer ({e})") from None
