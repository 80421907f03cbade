"""`load_pretrained`: one entry point for every checkpoint the project reads.

Accepted sources:
  "bundled:verifier", "bundled:draft"   the pair shipped in `specattn_jax/assets/`
  an HF checkpoint directory             config.json + safetensors or pytorch_model.bin
  an orbax checkpoint directory          config.json + params/ (written by `save_orbax`)
  a GGUF file (`.gguf`)                  llama.cpp's format, F32/F16/BF16 or quantised
  a llama2.c `.bin`                      with its `tok*.bin` tokenizer beside it
  a directory holding one llama2.c `.bin`
  a hub id ("org/name")                  downloaded through `huggingface_hub` when a network
                                          exists; a clear error when it does not
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from specattn_jax import sharding
from specattn_jax.convert.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer
from specattn_jax.convert.hf import load_hf_model
from specattn_jax.convert.llama2c import llama2c_tokenizer, load_llama2c_model
from specattn_jax.convert.orbax_io import is_orbax_checkpoint, load_orbax
from specattn_jax.errors import CheckpointError, IncompatibleModelsError
from specattn_jax.layer_map import LayerMap
from specattn_jax.speculative import check_compatible

ASSETS = Path(__file__).parent / "assets"
BUNDLED = ("verifier", "draft")
BUNDLED_LAYER_MAP = ASSETS / "layer_map.json"
# `load_pair`'s draft argument meaning "the verifier's own default draft".
DEFAULT_DRAFT = "default"
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


def resolve_source(source: str | Path) -> Path:
    """The local path for a source string (downloading hub ids when possible)."""
    text = str(source)
    if text.startswith("bundled:"):
        name = text.removeprefix("bundled:")
        if name not in BUNDLED:
            raise CheckpointError(f"unknown bundled model {text!r}; choose from {BUNDLED}")
        path = ASSETS / name
        if not (path / "config.json").is_file():
            raise CheckpointError(f"the bundled model {text!r} is not installed at {path}")
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(text):
        return _download(text)
    raise CheckpointError(f"checkpoint not found: {text}")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{hub_id!r} is not a local path and huggingface_hub is not installed"
        ) from None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, gated, or missing: all one message for the user
        raise CheckpointError(
            f"{hub_id!r} is not a local path and could not be downloaded from the "
            f"HuggingFace hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"without a network, pass a local checkpoint directory"
        ) from None


def _llama2c_files(path: Path) -> tuple[Path, Path]:
    """(checkpoint, tokenizer) for a llama2.c `.bin` or a directory holding one."""
    if path.is_dir():
        models = [p for p in sorted(path.glob("*.bin")) if not p.name.startswith("tok")]
        if len(models) != 1:
            raise CheckpointError(
                f"{path} holds no HF config.json and {len(models)} llama2.c checkpoints; "
                f"expected exactly one"
            )
        path = models[0]
    tokenizers = sorted(path.parent.glob("tok*.bin"))
    if len(tokenizers) != 1:
        raise CheckpointError(
            f"a llama2.c checkpoint needs exactly one tok*.bin tokenizer beside it; "
            f"found {len(tokenizers)} in {path.parent}"
        )
    return path, tokenizers[0]


def load_tokenizer(directory: Path):
    """The HF tokenizer saved in a checkpoint directory, or None if there is none."""
    if (
        not (directory / "tokenizer.json").is_file()
        and not (directory / "tokenizer_config.json").is_file()
    ):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({e})") from None


def load_pretrained(source: str | Path, dtype=jnp.float32, *, place=None):
    """Loads a model and its tokenizer.

    Args:
      source: a bundled name, a local path or a hub id (see the module docstring).
      dtype: parameter and activation dtype (`jnp.float32`, `jnp.bfloat16`, `jnp.float16`).
      place: optional `place(path, array) -> jax.Array` that puts each parameter on its
        devices as it is read (e.g. sharded placement); default: the default device.

    Returns:
      (model, tokenizer): a `Llama` and a `transformers` tokenizer (None if the checkpoint
      has none).

    Raises:
      CheckpointError: the source is missing, corrupt, or not a Llama checkpoint.
    """
    path = resolve_source(source)
    if path.is_dir() and is_orbax_checkpoint(path):
        return load_orbax(path, dtype), load_tokenizer(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_model(path, dtype, place=place), load_tokenizer(path)
    if path.suffix == ".gguf" or is_gguf(path):
        return load_gguf_model(path, dtype, place=place), load_gguf_tokenizer(path)
    if path.is_dir() or path.suffix == ".bin":
        checkpoint, tokenizer = _llama2c_files(path)
        return load_llama2c_model(checkpoint, dtype), llama2c_tokenizer(tokenizer)
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (config.json), a GGUF file nor a "
        f"llama2.c .bin file"
    )


def load_sharded(
    source: str | Path,
    mesh: Mesh,
    dtype=jnp.float32,
    rules: sharding.ShardingRules = sharding.TENSOR_PARALLEL,
):
    """`load_pretrained` with every parameter placed on `mesh` under `rules` as it is read,
    then `sharding.shard_model`. HF and GGUF checkpoints are placed tensor by tensor; orbax and
    llama2.c checkpoints load whole first and are placed after. Run the verifier's attention
    head-parallel with `attend=sharding.HeadParallel(mesh)` (`generate(..., mesh=mesh)` does)."""
    model, tokenizer = load_pretrained(
        source, dtype, place=sharding.param_placer(mesh, dtype, rules)
    )
    return sharding.shard_model(model, mesh, rules), tokenizer


def default_draft(verifier_source: str | Path) -> str | None:
    """The draft that goes with a verifier when none is named: the bundled draft for the
    bundled verifier, and none (plain decoding) for any other, since a draft must share the
    verifier's tokenizer."""
    return "bundled:draft" if str(verifier_source) == "bundled:verifier" else None


def default_layer_map(verifier_source: str | Path, draft_source: str | Path | None):
    """The shipped layer map for the bundled pair, else None (calibrate one)."""
    bundled = (str(verifier_source), str(draft_source)) == ("bundled:verifier", "bundled:draft")
    return LayerMap.load(BUNDLED_LAYER_MAP) if bundled and BUNDLED_LAYER_MAP.is_file() else None


def load_pair(
    verifier_source: str | Path,
    draft_source: str | Path | None = DEFAULT_DRAFT,
    dtype=jnp.float32,
):
    """Loads a verifier and its draft, checked to share one tokenizer.

    Args:
      verifier_source: as `load_pretrained`'s source.
      draft_source: as `load_pretrained`'s source; `DEFAULT_DRAFT` takes `default_draft`
        (the bundled draft for the bundled verifier, no draft for any other); None loads no
        draft (plain decoding).
      dtype: as `load_pretrained`'s.

    Returns:
      (draft or None, verifier, tokenizer): the tokenizer is the verifier's.

    Raises:
      IncompatibleModelsError: the vocabularies differ, or the draft has no tokenizer to
        compare while the verifier has one.
    """
    if draft_source == DEFAULT_DRAFT:
        draft_source = default_draft(verifier_source)
    verifier, tokenizer = load_pretrained(verifier_source, dtype)
    if draft_source is None:
        return None, verifier, tokenizer
    draft, draft_tokenizer = load_pretrained(draft_source, dtype)
    if draft_tokenizer is None and tokenizer is not None:
        raise IncompatibleModelsError(
            f"the draft {draft_source} has no tokenizer, so its token ids cannot be checked "
            f"against the verifier's; save the verifier's tokenizer beside it"
        )
    check_compatible(draft, verifier, draft_tokenizer, tokenizer)
    return draft, verifier, tokenizer
