"""`LlamaConfig`: the static description of a Llama-family model, read from and written back
to a HuggingFace `config.json`.

The config is a frozen, hashable dataclass registered as a static pytree node, so it can be
passed positionally into jitted functions without `static_argnums`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from specattn_jax.errors import CheckpointError, SpecAttnError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: "llama3"` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama model; the field names follow HF's `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = 1
    # One stop token or several (Llama-3-Instruct: end of text, end of message, end of turn).
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecAttnError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.torch_dtype not in _DTYPE_NAMES:
            raise SpecAttnError(f"torch_dtype={self.torch_dtype!r} is not one of {_DTYPE_NAMES}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every stop token, as a tuple (empty when there is none)."""
        return stop_token_ids(self.eos_token_id)

    @property
    def q_heads_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | Any) -> LlamaConfig:
        """Builds a config from an HF config dict (or `PretrainedConfig`)."""
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type={model_type!r} is not supported: specattn-jax loads Llama-family "
                f"checkpoints (model_type 'llama')"
            )
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"torch_dtype={dtype!r} is not one of {_DTYPE_NAMES}")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos_token_field(eos)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            torch_dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (`LlamaForCausalLM`)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"config file not found: {path}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        generation = path.parent / "generation_config.json"
        if generation.is_file():  # its stop tokens are the ones `generate` honours
            try:
                hf_eos = json.loads(generation.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{generation} is not valid JSON: {e}") from None
            if hf_eos is not None:
                hf = {**hf, "eos_token_id": hf_eos}
        try:
            return cls.from_hf(hf)
        except KeyError as e:
            raise CheckpointError(f"{path} lacks the field {e.args[0]!r}") from None


def eos_token_field(ids: Sequence[int]) -> int | tuple[int, ...] | None:
    """A list of stop tokens as `LlamaConfig.eos_token_id`: None, one id, or a tuple."""
    ids = tuple(int(token) for token in ids)
    return None if not ids else ids[0] if len(ids) == 1 else ids


def stop_token_ids(eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """One stop token, several, or none, as a tuple of ints."""
    if eos is None:
        return ()
    if isinstance(eos, int | np.integer):
        return (int(eos),)
    return tuple(int(token) for token in eos)


def _rope_theta(hf: dict[str, Any]) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling_from_hf(hf: dict[str, Any]) -> RopeScaling | None:
    scaling = hf.get("rope_scaling")
    if scaling is None:
        scaling = hf.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if rope_type == "default":
        return None
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
