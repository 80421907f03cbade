"""The samplers' filters rebuilt from transformers' own logits processors (torch), a route
independent of `specattn_jax.sampling`: the reference of the sampling and chi-square tests."""

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specattn_jax.sampling import Sampling


def transformers_processors(sampling: Sampling) -> LogitsProcessorList:
    """The processors `generate(do_sample=True, ...)` builds for the same settings, in its
    order: the repetition penalty on the raw logits, then the warpers."""
    processors = LogitsProcessorList()
    if sampling.repetition_penalty is not None:
        processors.append(RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty)))
    processors.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(int(sampling.top_k)))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(float(sampling.top_p)))
    if sampling.min_p:
        processors.append(MinPLogitsWarper(float(sampling.min_p)))
    return processors


def transformers_filtered_logits(
    sampling: Sampling,
    history: np.ndarray,  # i[N, T] the tokens each row has seen
    logits: np.ndarray,  # f[N, V]
) -> np.ndarray:
    """f32[N, V]: transformers' processed scores, filtered-out tokens at -inf."""
    scores = torch.tensor(np.asarray(logits, np.float32))
    return transformers_processors(sampling)(torch.tensor(history), scores).numpy()


def transformers_probabilities(sampling, history, logits) -> np.ndarray:
    """f64[N, V]: the distribution transformers samples from."""
    filtered = transformers_filtered_logits(sampling, history, logits).astype(np.float64)
    weights = np.exp(filtered - filtered.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)
