"""Building an NNX `Llama` from a flat {path: array} mapping, and the reverse.

The target model is built abstractly with `nnx.eval_shape`, so no random weights are ever
materialised; every parameter must be supplied exactly once with its exact shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.errors import CheckpointError
from specattn_jax.model import Llama

ParamPath = tuple[str | int, ...]


def abstract_model(config: LlamaConfig, dtype) -> Llama:
    """A `Llama` whose parameters are `ShapeDtypeStruct`s (no memory allocated)."""
    return nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))


def _model_params(model: Llama) -> dict[ParamPath, jax.Array]:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# The model keeps each layer's query, key and value projections as one array, and its gate and
# up projections as another, so that each is one matmul (`model.Attention`, `model.MLP`).
# Everything outside the model (checkpoints, converters, tests) sees them apart, HF-shaped:
#   q_proj [E, H, D], k_proj / v_proj [E, H_kv, D]  <->  qkv_proj [E, H_kv, G + 2, D]
#   q_bias [H, D], k_bias / v_bias [H_kv, D]        <->  qkv_bias [H_kv, G + 2, D]
#   gate_proj / up_proj [E, F]                      <->  gate_up_proj [E, 2, F]
#   gate_bias / up_bias [F]                         <->  gate_up_bias [2, F]
# (G = H / H_kv; query head h belongs to KV head h // G, as in HF's `repeat_kv`.)
_FUSED = {
    ("self_attn", "qkv_proj"): ("q_proj", "k_proj", "v_proj"),
    ("self_attn", "qkv_bias"): ("q_bias", "k_bias", "v_bias"),
    ("mlp", "gate_up_proj"): ("gate_proj", "up_proj"),
    ("mlp", "gate_up_bias"): ("gate_bias", "up_bias"),
}


def _xp(array):
    return np if isinstance(array, np.ndarray) else jnp


def _join(parts: list, kv_heads: int, is_attention: bool):
    """Stacks separate projections into their fused layout (numpy or jnp alike)."""
    xp = _xp(parts[0])
    if not is_attention:
        return xp.stack(parts, axis=-2)  # [..., 2, F]
    q, k, v = parts  # [..., H, D], [..., H_kv, D], [..., H_kv, D]
    q = q.reshape(*q.shape[:-2], kv_heads, -1, q.shape[-1])  # [..., H_kv, G, D]
    return xp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def _split(fused, is_attention: bool) -> list:
    """The separate projections of a fused array (the inverse of `_join`)."""
    if not is_attention:
        return [fused[..., 0, :], fused[..., 1, :]]
    q = fused[..., :-2, :]  # [..., H_kv, G, D]
    q = q.reshape(*q.shape[:-3], -1, q.shape[-1])
    return [q, fused[..., -2, :], fused[..., -1, :]]


def fuse_params(config: LlamaConfig, params: Mapping[ParamPath, object]) -> dict[ParamPath, object]:
    """HF-shaped parameters (separate q, k, v, gate, up) in the model's fused layout."""
    fused = dict(params)
    for layer in range(config.num_hidden_layers):
        for (module, name), parts in _FUSED.items():
            paths = [("layers", layer, module, part) for part in parts]
            if all(path in fused for path in paths):
                arrays = [fused.pop(path) for path in paths]
                fused[("layers", layer, module, name)] = _join(
                    arrays, config.num_key_value_heads, module == "self_attn"
                )
    return fused


def unfuse_params(params: Mapping[ParamPath, object]) -> dict[ParamPath, object]:
    """The model's parameters with fused arrays split back into HF-shaped ones."""
    out = {}
    for path, value in params.items():
        if path[0] == "layers" and tuple(path[2:]) in _FUSED:
            module = path[2]
            parts = _FUSED[tuple(path[2:])]
            for part, array in zip(parts, _split(value, module == "self_attn"), strict=True):
                out[(*path[:2], module, part)] = array
        else:
            out[path] = value
    return out


def _hf_shapes(model_params: Mapping[ParamPath, object]) -> dict[ParamPath, tuple[int, ...]]:
    unfused = jax.eval_shape(unfuse_params, dict(model_params))
    return {path: tuple(value.shape) for path, value in unfused.items()}


def param_shapes(config: LlamaConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every HF-shaped parameter path (q, k, v, gate and up apart) with its shape."""
    return _hf_shapes(_model_params(abstract_model(config, jnp.float32)))


def model_from_params(
    config: LlamaConfig,
    params: Mapping[ParamPath, np.ndarray | jax.Array],
    dtype,
    source: str,
    place: Callable[[ParamPath, np.ndarray], jax.Array] | None = None,
) -> Llama:
    """A `Llama` with the given HF-shaped parameters (`param_shapes`), cast to `dtype`.

    Raises `CheckpointError` naming `source` for a missing or surplus parameter or a shape
    mismatch. `place(path, array)` puts each of the model's (fused) arrays on device(s)
    (default: `jnp.asarray`).
    """
    graphdef, state = nnx.split(abstract_model(config, dtype))
    flat = nnx.to_flat_state(state)
    shapes = _hf_shapes({path: var.get_value() for path, var in flat})
    missing = sorted(set(shapes) - set(params), key=str)
    if missing:
        raise CheckpointError(f"{source}: missing tensors for {[_dotted(p) for p in missing]}")
    surplus = sorted(set(params) - set(shapes), key=str)
    if surplus:
        raise CheckpointError(f"{source}: unexpected parameters {[_dotted(p) for p in surplus]}")
    for path, want in shapes.items():
        if tuple(params[path].shape) != want:
            raise CheckpointError(
                f"{source}: parameter {_dotted(path)} has shape {tuple(params[path].shape)}, "
                f"the config needs {want}"
            )
    fused = fuse_params(config, params)
    place = place or (lambda path, array: jnp.asarray(array, dtype))
    filled = [(path, var.replace(place(path, fused[path]))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def params_of(model: Llama) -> dict[ParamPath, jax.Array]:
    """The model's parameters as a flat {path: array} dict, HF-shaped (`param_shapes`)."""
    return unfuse_params(_model_params(model))


def _dotted(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)
