"""Import of llama2.c checkpoints (`model.bin` legacy format) and their `tok*.bin` tokenizers.

llama2.c rotates adjacent pairs (2i, 2i+1) of each head in RoPE; HF Llama (and this project)
rotates halves, so the rows of wq and wk are permuted head by head: output row order
[0, 2, 4, ..., 1, 3, 5, ...].

The tokenizer becomes a HF `PreTrainedTokenizerFast`: a byte-fallback BPE whose merges are
ordered by the merged piece's llama2.c score, which reproduces llama2.c's greedy
highest-score-first merging, with its BOS and dummy-space prefix.
"""

from __future__ import annotations

import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from specattn_jax.config import LlamaConfig
from specattn_jax.convert._params import model_from_params
from specattn_jax.convert.hf import rotary_pairs_to_halves
from specattn_jax.errors import CheckpointError
from specattn_jax.model import Llama

_HEADER = struct.Struct("<7i")


def _read_header(data: bytes, source: Path) -> tuple[int, ...]:
    if len(data) < _HEADER.size:
        raise CheckpointError(f"{source} is too short to be a llama2.c checkpoint")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(data)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0 or dim % heads:
        raise CheckpointError(f"{source} does not start with a valid llama2.c header")
    return dim, hidden, layers, heads, kv_heads, vocab, seq_len


def llama2c_config(path: str | Path) -> LlamaConfig:
    """The `LlamaConfig` of a llama2.c checkpoint, from its header."""
    path = Path(path)
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = _read_header(
            f.read(_HEADER.size), path
        )
    return LlamaConfig(
        vocab_size=abs(vocab),
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=dim // heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=seq_len,
        tie_word_embeddings=vocab > 0,
        bos_token_id=1,
        eos_token_id=2,
    )


def load_llama2c_model(path: str | Path, dtype=jnp.float32) -> Llama:
    """A `Llama` with the weights of a llama2.c `.bin` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    _read_header(data, path)
    config = llama2c_config(path)
    dim, hidden, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    kv_dim = kv_heads * head_dim
    sizes = [
        ("embed", (config.vocab_size, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis", (2, config.max_position_embeddings, head_dim // 2)),
    ]
    if not config.tie_word_embeddings:
        sizes.append(("wcls", (config.vocab_size, dim)))
    needed = _HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in sizes)
    if len(data) != needed:
        raise CheckpointError(
            f"{path} has {len(data)} bytes; its header describes a model of {needed} bytes "
            f"(truncated or not a llama2.c v0 checkpoint)"
        )
    arrays, offset = {}, _HEADER.size
    for name, shape in sizes:
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(data, np.float32, count, offset).reshape(shape)
        offset += 4 * count

    params = {
        ("embed_tokens",): arrays["embed"],
        ("norm", "weight"): arrays["rms_final"],
    }
    if not config.tie_word_embeddings:
        params[("lm_head",)] = arrays["wcls"].T
    for i in range(layers):
        wq = rotary_pairs_to_halves(arrays["wq"][i], heads)
        wk = rotary_pairs_to_halves(arrays["wk"][i], kv_heads)
        layer = {
            ("input_layernorm", "weight"): arrays["rms_att"][i],
            ("post_attention_layernorm", "weight"): arrays["rms_ffn"][i],
            ("self_attn", "q_proj"): wq.T.reshape(dim, heads, head_dim),
            ("self_attn", "k_proj"): wk.T.reshape(dim, kv_heads, head_dim),
            ("self_attn", "v_proj"): arrays["wv"][i].T.reshape(dim, kv_heads, head_dim),
            ("self_attn", "o_proj"): arrays["wo"][i].T.reshape(heads, head_dim, dim),
            ("mlp", "gate_proj"): arrays["w1"][i].T,
            ("mlp", "down_proj"): arrays["w2"][i].T,
            ("mlp", "up_proj"): arrays["w3"][i].T,
        }
        params.update({("layers", i, *key): value for key, value in layer.items()})
    return model_from_params(config, params, dtype, source=str(path))


def read_llama2c_vocab(path: str | Path) -> list[tuple[str, float]]:
    """(piece, score) per token id of a llama2.c `tok*.bin`; byte tokens stay `<0xNN>`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c tokenizer not found: {path}")
    data = path.read_bytes()
    pieces, offset = [], 4
    try:
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise struct.error("piece runs past the end of the file")
            pieces.append((data[offset : offset + length].decode("utf-8"), score))
            offset += length
    except (struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid llama2.c tokenizer ({e})") from None
    return pieces


def llama2c_tokenizer(path: str | Path):
    """A `transformers.PreTrainedTokenizerFast` equivalent to llama2.c's tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pieces = read_llama2c_vocab(path)
    special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab = {}
    for index, (piece, _) in enumerate(pieces):
        vocab[special.get(index, piece.replace(" ", "\u2581"))] = index
    by_score = sorted(range(len(pieces)), key=lambda i: -pieces[i][1])
    merges = []
    for index in by_score:
        piece = special.get(index) or pieces[index][0].replace(" ", "\u2581")
        if index in special or piece.startswith("<0x"):
            continue
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )
