"""Saving and restoring model parameters with `orbax-checkpoint`.

A checkpoint directory holds `config.json` (the HF config) and `params/` (an orbax
`StandardCheckpointer` tree of the NNX parameter state). Restoring is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.convert._params import abstract_model, model_from_params, params_of
from specattn_jax.errors import CheckpointError
from specattn_jax.model import Llama


def save_orbax(model: Llama, directory: str | Path) -> Path:
    """Writes the model's config and parameters to `directory` (created; must not exist)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, torch_dtype=jnp.dtype(model.dtype).name)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", state)
    return directory


def is_orbax_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / "params").is_dir() and (Path(directory) / "config.json").is_file()


def load_orbax(directory: str | Path, dtype=None) -> Llama:
    """Restores a model saved by `save_orbax`; `dtype` casts after restoring if given."""
    directory = Path(directory).absolute()
    if not is_orbax_checkpoint(directory):
        raise CheckpointError(f"{directory} is not an orbax checkpoint (config.json + params/)")
    config = LlamaConfig.from_json_file(directory / "config.json")
    stored_dtype = jnp.dtype(config.torch_dtype)
    graphdef, abstract_state = nnx.split(abstract_model(config, stored_dtype))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            state = checkpointer.restore(directory / "params", abstract_state)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{directory}: cannot restore parameters ({e})") from None
    model = nnx.merge(graphdef, state)
    if dtype is not None and jnp.dtype(dtype) != stored_dtype:
        model = model_from_params(config, params_of(model), dtype, source=str(directory))
    return model
