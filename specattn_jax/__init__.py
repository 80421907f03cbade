"""specattn-jax: SpecAttn (draft-guided sparse attention in speculative decoding) in JAX.

The public API: models and checkpoints (`load_pretrained`, `Llama`, `forward`, `KVCache`),
decoding (`generate` with a `SpecConfig`, `generate_autoregressive`, samplers and acceptance
rules), layer mapping (`calibrate`, `LayerMap`) and KV selection (`SpecAttnSelector` and the
baselines `Quest`, `DoubleSparsity`, `StreamingLLM`, `OracleTopP`).
"""

import logging
import warnings

from specattn_jax.acceptance import GreedyAcceptance, SpeculativeSampling
from specattn_jax.attention import AttentionPlan, ForwardInfo
from specattn_jax.autoregressive import generate_autoregressive, stream_autoregressive
from specattn_jax.cache import KVCache
from specattn_jax.config import LlamaConfig, RopeScaling
from specattn_jax.decoding import GenerationResult
from specattn_jax.errors import CheckpointError, IncompatibleModelsError, SpecAttnError
from specattn_jax.layer_map import LayerMap, calibrate, monotone_layer_map
from specattn_jax.loading import load_pair, load_pretrained
from specattn_jax.model import Llama, forward
from specattn_jax.sampling import Greedy, Sampling, make_sampler
from specattn_jax.selection import SelectionInputs, Selector, SpecAttnSelector
from specattn_jax.selection.baselines import DoubleSparsity, OracleTopP, Quest, StreamingLLM
from specattn_jax.speculative import SpecConfig, generate, generate_stream, spec_step

__all__ = [
    "AttentionPlan",
    "CheckpointError",
    "DoubleSparsity",
    "ForwardInfo",
    "GenerationResult",
    "Greedy",
    "GreedyAcceptance",
    "IncompatibleModelsError",
    "KVCache",
    "LayerMap",
    "Llama",
    "LlamaConfig",
    "OracleTopP",
    "Quest",
    "RopeScaling",
    "Sampling",
    "SelectionInputs",
    "Selector",
    "SpecAttnError",
    "SpecAttnSelector",
    "SpecConfig",
    "SpeculativeSampling",
    "StreamingLLM",
    "calibrate",
    "forward",
    "generate",
    "generate_autoregressive",
    "generate_stream",
    "load_pair",
    "load_pretrained",
    "make_sampler",
    "monotone_layer_map",
    "spec_step",
    "stream_autoregressive",
]


class _DropTransformersNotices(logging.Filter):
    """Drops transformers' import-time notice that PyTorch is absent: this project needs
    only its tokenizers, configs and GGUF reader, so the notice is wrong here. Nothing else
    of transformers' logging is touched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


# transformers is imported lazily, inside functions, so this runs before it.
logging.getLogger("transformers").addFilter(_DropTransformersNotices())
# In a notebook without ipywidgets, transformers' import of `tqdm.auto` warns that it falls
# back to the text bar; the text bar is what this project's bars use there (`progress`).
warnings.filterwarnings("ignore", message="IProgress not found", module=r"tqdm\.auto")
