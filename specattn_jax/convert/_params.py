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


def param_shapes(config: LlamaConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter path of the model with its shape."""
    _, state = nnx.split(abstract_model(config, jnp.float32))
    return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def model_from_params(
    config: LlamaConfig,
    params: Mapping[ParamPath, np.ndarray | jax.Array],
    dtype,
    source: str,
    place: Callable[[ParamPath, np.ndarray], jax.Array] | None = None,
) -> Llama:
    """A `Llama` with the given parameters, cast to `dtype`.

    Raises `CheckpointError` naming `source` for a missing or surplus parameter or a shape
    mismatch. `place` puts each array on device(s) (default: `jnp.asarray`).
    """
    graphdef, state = nnx.split(abstract_model(config, dtype))
    flat = nnx.to_flat_state(state)
    expected = {path for path, _ in flat}
    missing = sorted(expected - set(params), key=str)
    if missing:
        raise CheckpointError(f"{source}: missing tensors for {[_dotted(p) for p in missing]}")
    surplus = sorted(set(params) - expected, key=str)
    if surplus:
        raise CheckpointError(f"{source}: unexpected parameters {[_dotted(p) for p in surplus]}")
    place = place or (lambda path, array: jnp.asarray(array, dtype))
    filled = []
    for path, var in flat:
        array = params[path]
        want = var.get_value().shape
        if tuple(array.shape) != tuple(want):
            raise CheckpointError(
                f"{source}: parameter {_dotted(path)} has shape {tuple(array.shape)}, "
                f"the config needs {tuple(want)}"
            )
        filled.append((path, var.replace(place(path, array))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def params_of(model: Llama) -> dict[ParamPath, jax.Array]:
    """The model's parameters as a flat {path: array} dict."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _dotted(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)
