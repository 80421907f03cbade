"""HuggingFace Llama checkpoints <-> NNX `Llama` parameters.

Reading streams tensor by tensor (`model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin`), asserts each tensor's shape against
the config, and fails loudly on a missing, unexpected, duplicated or unmapped key. Writing
produces a directory that `transformers.LlamaForCausalLM.from_pretrained` loads.

One table maps HF keys to parameter paths; one transform per kind of tensor:
  copy        same layout
  transpose   [out, in] -> [in, out]                 (MLP, LM head)
  in_heads    [N * D, E] -> [E, N, D]                (q, k, v projections)
  out_heads   [E, H * D] -> [H, D, E]                (o projection)
  bias_heads  [N * D] -> [N, D]                      (q, k, v biases)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from specattn_jax.config import LlamaConfig
from specattn_jax.convert._params import ParamPath, model_from_params, param_shapes, params_of
from specattn_jax.errors import CheckpointError
from specattn_jax.model import Llama

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_KEY_TABLE: list[tuple[re.Pattern, tuple[str, ...], str]] = [
    (re.compile(r"model\.embed_tokens\.weight"), ("embed_tokens",), "copy"),
    (re.compile(r"model\.norm\.weight"), ("norm", "weight"), "copy"),
    (re.compile(r"lm_head\.weight"), ("lm_head",), "transpose"),
    (
        re.compile(_LAYER + r"(?P<norm>input_layernorm|post_attention_layernorm)\.weight"),
        ("{norm}", "weight"),
        "copy",
    ),
    (
        re.compile(_LAYER + r"self_attn\.(?P<p>[qkv])_proj\.weight"),
        ("self_attn", "{p}_proj"),
        "in_heads",
    ),
    (re.compile(_LAYER + r"self_attn\.o_proj\.weight"), ("self_attn", "o_proj"), "out_heads"),
    (
        re.compile(_LAYER + r"self_attn\.(?P<p>[qkv])_proj\.bias"),
        ("self_attn", "{p}_bias"),
        "bias_heads",
    ),
    (re.compile(_LAYER + r"self_attn\.o_proj\.bias"), ("self_attn", "o_bias"), "copy"),
    (
        re.compile(_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.weight"),
        ("mlp", "{p}_proj"),
        "transpose",
    ),
    (re.compile(_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.bias"), ("mlp", "{p}_bias"), "copy"),
]
# Buffers some older checkpoints carry; they hold nothing the model needs.
_IGNORED_KEYS = re.compile(_LAYER + r"self_attn\.rotary_emb\.inv_freq")

_NP_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def hf_key_to_path(key: str) -> tuple[ParamPath, str] | None:
    """The parameter path and transform kind for an HF key, or None if the key is unmapped."""
    for pattern, template, kind in _KEY_TABLE:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            path = tuple(part.format(**groups) for part in template)
            if "layer" in groups:
                path = ("layers", int(groups["layer"]), *path)
            return path, kind
    return None


def path_to_hf_key(path: ParamPath) -> tuple[str, str]:
    """The HF key and transform kind for a parameter path."""
    if path[0] == "layers":
        layer, *rest = path[1:]
        module, name = rest[0], rest[-1]
        if module in ("input_layernorm", "post_attention_layernorm"):
            return f"model.layers.{layer}.{module}.weight", "copy"
        proj, part = name.split("_")
        suffix = "weight" if part == "proj" else "bias"
        key = f"model.layers.{layer}.{module}.{proj}_proj.{suffix}"
        return key, hf_key_to_path(key)[1]
    return {
        ("embed_tokens",): ("model.embed_tokens.weight", "copy"),
        ("norm", "weight"): ("model.norm.weight", "copy"),
        ("lm_head",): ("lm_head.weight", "transpose"),
    }[tuple(path)]


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of a parameter of `shape` stored with transform `kind`."""
    if kind == "copy":
        return shape
    if kind == "transpose":
        return shape[::-1]
    if kind == "in_heads":
        embed, heads, dim = shape
        return (heads * dim, embed)
    if kind == "out_heads":
        heads, dim, embed = shape
        return (embed, heads * dim)
    if kind == "bias_heads":
        heads, dim = shape
        return (heads * dim,)
    raise ValueError(f"unknown transform kind {kind!r}")


def from_hf_layout(kind: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor in the parameter layout of `shape`."""
    if kind == "copy":
        return tensor
    if kind == "bias_heads":
        return tensor.reshape(shape)
    return tensor.T.reshape(shape)


def to_hf_layout(kind: str, param: np.ndarray) -> np.ndarray:
    """A parameter in HF's layout (the inverse of `from_hf_layout`)."""
    shape = hf_shape(kind, tuple(param.shape))
    if kind == "copy":
        return param
    if kind == "bias_heads":
        return param.reshape(shape)
    return np.ascontiguousarray(param.reshape(shape[::-1]).T)


def _checkpoint_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    torch_bin = directory / "pytorch_model.bin"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are missing: {absent}")
        return files
    if torch_bin.is_file():
        return [torch_bin]
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin"
    )


def _iter_tensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs of one weights file, one tensor in memory at a time."""
    if file.suffix == ".bin":
        yield from _iter_torch_tensors(file)
        return
    try:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None


def _iter_torch_tensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file} is a PyTorch checkpoint; reading it needs torch (pip install torch)"
        ) from None
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint ({e})") from None
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            yield key, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield key, tensor.numpy()


def read_hf_config(directory: str | Path) -> LlamaConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    return LlamaConfig.from_json_file(directory / "config.json")


def load_hf_model(directory: str | Path, dtype=jnp.float32, place=None) -> Llama:
    """Loads an HF Llama checkpoint directory into a `Llama` of `dtype`.

    `place(path, array)` may put each parameter on its devices (e.g. sharded); by default
    each is a `jnp` array on the default device.
    """
    directory = Path(directory)
    config = read_hf_config(directory)
    tensors = (
        (key, tensor, file)
        for file in _checkpoint_files(directory)
        for key, tensor in _iter_tensors(file)
    )
    params = params_from_hf_tensors(config, tensors, directory)
    return model_from_params(config, params, dtype, source=str(directory), place=place)


def params_from_hf_tensors(
    config: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray, Path]], source: Path
) -> dict[ParamPath, np.ndarray]:
    """HF-keyed tensors, each with the file it came from, as HF-shaped parameters
    (`param_shapes`). Each tensor's shape is checked against the config as it arrives;
    a duplicated, unmapped or misshapen key, or an untied `lm_head` under
    `tie_word_embeddings`, raises `CheckpointError`."""
    shapes = param_shapes(config)
    params: dict[ParamPath, np.ndarray] = {}
    seen: set[str] = set()
    tied_head = None
    for key, tensor, file in tensors:
        if _IGNORED_KEYS.fullmatch(key):
            continue
        if key in seen:
            raise CheckpointError(f"{source}: tensor {key!r} appears twice")
        seen.add(key)
        if key == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = tensor
            continue
        mapped = hf_key_to_path(key)
        if mapped is None:
            raise CheckpointError(f"{file}: tensor {key!r} is not a Llama parameter")
        path, kind = mapped
        if path not in shapes:
            raise CheckpointError(
                f"{file}: tensor {key!r} does not fit this config "
                f"({config.num_hidden_layers} layers, attention_bias="
                f"{config.attention_bias}, mlp_bias={config.mlp_bias})"
            )
        want = hf_shape(kind, shapes[path])
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config needs {want}"
            )
        params[path] = from_hf_layout(kind, tensor, shapes[path])
    if tied_head is not None and not np.array_equal(
        tied_head, params.get(("embed_tokens",), tied_head)
    ):
        raise CheckpointError(
            f"{source}: tie_word_embeddings is set but lm_head.weight differs from "
            f"model.embed_tokens.weight"
        )
    return params


def rotary_pairs_to_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection ([heads * D, ...] rows: weight or bias) from the adjacent-pair RoPE
    order of llama2.c and llama.cpp (rotating (2i, 2i+1)) to HF's half-split order (rotating
    (i, i + D/2)): row order [0, 2, 4, ..., 1, 3, 5, ...] within each head."""
    rest = w.shape[1:]
    per_head = w.reshape(heads, -1, 2, *rest)  # [heads, D/2, 2, ...]
    return per_head.swapaxes(1, 2).reshape(w.shape)


def save_hf_model(
    model: Llama,
    directory: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes `config.json` and safetensors weights (sharded above `max_shard_bytes`).

    `dtype` ("float32", "bfloat16", "float16") defaults to the config's `torch_dtype`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if dtype is not None:
        config = dataclasses.replace(config, torch_dtype=dtype)
    np_dtype = _NP_DTYPES[config.torch_dtype]
    tensors = {}
    for path, value in params_of(model).items():
        key, kind = path_to_hf_key(path)
        tensors[key] = to_hf_layout(kind, np.asarray(value).astype(np_dtype))
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    shards: list[dict[str, np.ndarray]] = [{}]
    for key in sorted(tensors):
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) >= max_shard_bytes:
            shards.append({})
        shards[-1][key] = tensors[key]
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory
