"""The recipe that trains the bundled draft/verifier pair: next-token prediction on the
Gutenberg train books.

- Data: each book of a split is tokenized as `<s> text </s>`, the books are concatenated in
  manifest order, and training windows of `seq_len + 1` tokens are cut from that stream at a
  random offset each epoch and shuffled (both from `seed`). Validation windows are the
  non-overlapping `seq_len` windows of the validation stream, so every token is scored once.
- Optimiser: AdamW (optax; `b1`, `b2`, decoupled weight decay on matrices only) after global-norm
  clipping, linear warmup then cosine decay to `min_lr_ratio * peak_lr`.
- Precision: fp32 master weights and optimiser state; the forward and backward run on a
  bf16 copy (`compute_dtype`), logits and the loss are fp32.
- Forward: the model's own forward without a cache (`model(tokens)`), whose attention is
  `jax.nn.dot_product_attention` with cuDNN's fused kernel on GPU (XLA's elsewhere or if
  cuDNN refuses); a test holds it equal to the cached forward.
- Determinism: initialisation and data order come from `seed` alone; with `time_budget_s`
  unset the run is fixed by the config. A budget measures the step time during warmup and
  fixes `steps` from it (the number is logged, so the run can be repeated with it).
- Output: orbax checkpoints of the model (`convert.orbax_io`), `history.json`, and the model
  itself; `export_model` writes the HF folder (bf16 safetensors, config, tokenizer).

    python -m specattn_jax.train --config configs/verifier.json --out-dir runs/verifier \\
        --tokenizer runs/tokenizer --export runs/verifier/hf
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.convert.hf import load_hf_model, save_hf_model
from specattn_jax.convert.orbax_io import save_orbax
from specattn_jax.data import default_data_dir, split_books
from specattn_jax.errors import SpecAttnError
from specattn_jax.model import Llama, count_params
from specattn_jax.progress import progress_bar

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_ATTENTION_CHOICES = ("auto", "cudnn", "xla")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of one training run (the `"train"` table of a config file).

    Attributes:
      seed: initialisation and data order.
      seq_len: tokens per training sequence (the model's context).
      batch_size: sequences per step.
      steps: optimiser steps (an upper bound when `time_budget_s` is set).
      time_budget_s: if set, the steps are capped to fit this many seconds of training steps,
        measured over the first `calibration_steps` (evaluation and compilation not counted).
      calibration_steps: steps timed for the budget; must not exceed `warmup_steps`.
      warmup_steps: linear warmup from 0 to `peak_lr`.
      peak_lr, min_lr_ratio: cosine decay from `peak_lr` to `min_lr_ratio * peak_lr`.
      weight_decay, b1, b2, eps, grad_clip: AdamW and global-norm clipping.
      compute_dtype: dtype of the forward/backward ("bfloat16" or "float32").
      attention: "auto" (cuDNN on GPU with a 16-bit compute dtype, else XLA), "cudnn", "xla".
      eval_every: steps between evaluations on `eval_windows` validation windows.
      eval_windows: validation windows of the periodic evaluation (spread over the split).
      final_eval_windows: windows of the final evaluation (None: the whole split).
      log_every: steps between progress-bar/loss-history updates.
      checkpoint_every: steps between orbax checkpoints (None: only the last step).
      select_best: keep the parameters of the best periodic evaluation, not the last step.
    """

    seed: int = 0
    seq_len: int = 2048
    batch_size: int = 16
    steps: int = 1000
    time_budget_s: float | None = None
    calibration_steps: int = 20
    warmup_steps: int = 100
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: str = "bfloat16"
    attention: str = "auto"
    eval_every: int = 200
    eval_windows: int = 64
    final_eval_windows: int | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    select_best: bool = False

    def __post_init__(self):
        if self.attention not in _ATTENTION_CHOICES:
            raise SpecAttnError(f"attention={self.attention!r} is not one of {_ATTENTION_CHOICES}")
        if self.compute_dtype not in ("bfloat16", "float32", "float16"):
            raise SpecAttnError(f"compute_dtype={self.compute_dtype!r} is not a float dtype")
        for name in ("seq_len", "batch_size", "steps", "log_every", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise SpecAttnError(f"{name}={getattr(self, name)} must be at least 1")
        if self.warmup_steps >= self.steps:
            raise SpecAttnError(
                f"warmup_steps={self.warmup_steps} must be below steps={self.steps}"
            )
        if self.time_budget_s is not None and not (0 < self.calibration_steps <= self.warmup_steps):
            raise SpecAttnError(
                f"a time budget needs 0 < calibration_steps={self.calibration_steps} <= "
                f"warmup_steps={self.warmup_steps}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def load_run_config(path: str | Path) -> tuple[TrainConfig, LlamaConfig]:
    """(TrainConfig, LlamaConfig) from a JSON file `{"model": {HF config}, "train": {...}}`."""
    path = Path(path)
    if not path.is_file():
        raise SpecAttnError(f"training config not found: {path}")
    try:
        raw = json.loads(path.read_text())
        train_fields = {k: v for k, v in raw["train"].items() if not k.startswith("_")}
        model_fields = {k: v for k, v in raw["model"].items() if not k.startswith("_")}
        return TrainConfig(**train_fields), LlamaConfig.from_hf(model_fields)
    except json.JSONDecodeError as e:
        raise SpecAttnError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError) as e:
        raise SpecAttnError(f"{path}: bad training config ({e})") from None


# ----------------------------------------------------------------------------- data


def _load_bpe(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.is_file():
        raise SpecAttnError(f"no tokenizer.json in {tokenizer_dir}")
    return Tokenizer.from_file(str(file))


def tokenize_split(
    split: str,
    data_dir: str | Path,
    tokenizer_dir: str | Path,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """u16/i32[N] token stream of a split: `<s> book </s>` per book, in manifest order.

    With `cache_dir`, the stream is stored as `<split>-<key>.npy`, the key hashing the
    tokenizer file and the books' sha256s, and read back on later calls.
    """
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SpecAttnError(f"no tokenizer.json in {tokenizer_dir}")

    def encode(texts: list[str]) -> list[list[int]]:
        tokenizer = _load_bpe(Path(tokenizer_dir))
        bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        if bos is None or eos is None:
            raise SpecAttnError(f"the tokenizer in {tokenizer_dir} lacks <s> or </s>")
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[bos, *e.ids, eos] for e in encodings]

    return cached_token_stream(
        split, data_dir, encode, fingerprint=tokenizer_file.read_bytes(), cache_dir=cache_dir
    )


def cached_token_stream(
    split: str,
    data_dir: str | Path,
    encode: Callable[[list[str]], list[list[int]]],
    *,
    fingerprint: bytes,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """u16/i32[N]: the split's books encoded by `encode` (each book's ids, special tokens
    included), concatenated in manifest order, in the narrower dtype that holds them; cached
    under `cache_dir` by a key hashing `fingerprint` (the tokenizer) and the books' sha256s.
    `encode` runs only on a cache miss."""
    books = split_books(split, data_dir)
    key = hashlib.sha256(fingerprint)
    for book in books:
        key.update(book.sha256.encode())
    cache = Path(cache_dir) / f"{split}-{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        return np.load(cache)
    encoded = encode([book.read() for book in books])
    stream = np.concatenate([np.asarray(ids, np.int64) for ids in encoded])
    stream = stream.astype(np.uint16 if stream.max(initial=0) < 2**16 else np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, stream)
    return stream


def train_windows(
    stream: np.ndarray, seq_len: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless i32[batch_size, seq_len + 1] training batches.

    Each epoch cuts the stream into windows of `seq_len + 1` tokens from a random offset in
    `[0, seq_len)`, and visits them in a random order (all from `seed` and the epoch number).
    """
    window = seq_len + 1
    if len(stream) < window + seq_len:
        raise SpecAttnError(f"{len(stream)} training tokens are too few for seq_len={seq_len}")
    pending: list[int] = []
    epoch = 0
    while True:
        while len(pending) < batch_size:
            rng = np.random.default_rng([seed, epoch])
            offset = int(rng.integers(0, seq_len))
            starts = offset + seq_len * np.arange((len(stream) - offset - 1) // seq_len)
            pending.extend(rng.permutation(starts).tolist())
            epoch += 1
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield np.stack([stream[s : s + window] for s in batch]).astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """i32[W, seq_len + 1]: the stream's non-overlapping windows (each token a target once).

    With `count`, `count` windows evenly spread over the stream (all books represented).
    """
    total = (len(stream) - 1) // seq_len
    if total < 1:
        raise SpecAttnError(f"{len(stream)} validation tokens are too few for seq_len={seq_len}")
    picks = np.arange(total)
    if count is not None and count < total:
        picks = np.linspace(0, total - 1, count).round().astype(np.int64)
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in picks]).astype(
        np.int32
    )


# ---------------------------------------------------------------------------- model


def causal_lm_logits(
    model: Llama,
    tokens: jax.Array,  # i32[B, T]
    *,
    attention: str = "xla",
) -> jax.Array:
    """f32[B, T, V] logits of a full causal forward without a KV cache (training, scoring):
    the inference forward itself, `model(tokens)`, whose attention is then
    `jax.nn.dot_product_attention` (`attention` = "xla" or "cudnn")."""
    logits, _, _ = model(tokens, implementation=attention)
    return logits


def init_model(config: LlamaConfig, seed: int) -> Llama:
    """A fp32 `Llama` with GPT-2 style init: std 0.02, residual outputs scaled by 1/sqrt(2L)."""
    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(params=seed))
    scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
    for layer in model.layers:
        layer.self_attn.o_proj[...] = layer.self_attn.o_proj[...] * scale
        layer.mlp.down_proj[...] = layer.mlp.down_proj[...] * scale
    return model


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine to `min_lr_ratio * peak_lr`."""
    if step < config.warmup_steps:
        return config.peak_lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.peak_lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW without the learning-rate scaling (the step applies `-lr` itself)."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(
            config.weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
        ),
    )


def _attention_impl(config: TrainConfig, dtype) -> str:
    """The attention of a training forward in `dtype`: the config's, or for "auto" cuDNN's
    on GPU with a 16-bit dtype and XLA's otherwise."""
    if config.attention != "auto":
        return config.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


def _cast(params, dtype):
    return jax.tree.map(lambda p: p.astype(dtype), params)


class Objective(Protocol):
    """What a training step minimises, given the model (its compute-dtype copy) and windows
    i32[B, T + 1], whose inputs are `tokens[:, :-1]`.

    `inputs` (a pytree of arrays, or None) is handed to every step as an argument rather
    than compiled into it: a teacher's parameters, say. `attention` is the step's attention
    implementation (`causal_lm_logits`'), for every forward the objective runs.
    """

    inputs: Any

    def loss(
        self, model: Llama, tokens: jax.Array, inputs: Any, attention: str
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, named scalar parts to log)."""
        ...


def next_token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """f32[B, T]: cross-entropy of each next token `tokens[:, 1:]` under `logits` f32[B, T, V]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def next_token_kl(
    draft_logits: jax.Array,  # [B, T, V]
    verifier_logits: jax.Array,  # [B, T, V]
) -> jax.Array:  # f32[B, T]
    """KL(verifier || draft) of each position's next-token distributions, in nats."""
    return optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(draft_logits.astype(jnp.float32)),
        jax.nn.log_softmax(verifier_logits.astype(jnp.float32)),
    )


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The recipe's objective: the mean next-token cross-entropy."""

    inputs: None = None

    def loss(self, model, tokens, inputs, attention):
        logits = causal_lm_logits(model, tokens[:, :-1], attention=attention)
        return next_token_losses(logits, tokens).mean(), {}


class _Steps:
    """The jitted train and eval steps of one model, compiled once."""

    def __init__(self, graphdef, train_config: TrainConfig, attention: str, objective: Objective):
        self.graphdef = graphdef
        self.config = train_config
        self.attention = attention
        self.objective = objective
        self.compute_dtype = jnp.dtype(train_config.compute_dtype)
        self.tx = _optimizer(train_config)
        self.train_step = jax.jit(self._train_step)
        self.eval_step = jax.jit(self._eval_step, static_argnames=("dtype", "attention"))

    def _loss(self, params, tokens, inputs):  # tokens: i32[B, T + 1]
        model = nnx.merge(self.graphdef, _cast(params, self.compute_dtype))
        return self.objective.loss(model, tokens, inputs, self.attention)

    def _train_step(self, params, opt_state, tokens, lr, inputs):
        (loss, parts), grads = jax.value_and_grad(self._loss, has_aux=True)(params, tokens, inputs)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm, **parts}

    def _eval_step(self, params, tokens, weights, *, dtype, attention):
        """(sum of token losses, token count, greedy tokens i32[B, T]) of weighted windows."""
        model = nnx.merge(self.graphdef, _cast(params, dtype))
        logits = causal_lm_logits(model, tokens[:, :-1], attention=attention)
        losses = next_token_losses(logits, tokens)
        total = (losses.sum(axis=1) * weights).sum()
        return total, weights.sum() * losses.shape[1], jnp.argmax(logits, axis=-1)

    def compile(self, params, opt_state):
        """Compiles the train step, falling back from cuDNN to XLA attention if refused."""
        tokens = jax.ShapeDtypeStruct((self.config.batch_size, self.config.seq_len + 1), jnp.int32)
        lr = jax.ShapeDtypeStruct((), jnp.float32)
        inputs = self.objective.inputs
        try:
            self.train_step = self.train_step.lower(params, opt_state, tokens, lr, inputs).compile()
        except Exception as e:  # cuDNN rejects some shapes, dtypes and versions
            if self.attention != "cudnn" or self.config.attention == "cudnn":
                raise
            print(f"cuDNN attention unavailable ({type(e).__name__}: {e}); using XLA's", flush=True)
            self.attention = "xla"
            self.train_step = (
                jax.jit(self._train_step).lower(params, opt_state, tokens, lr, inputs).compile()
            )


def evaluate(
    steps: _Steps,
    params,
    windows: np.ndarray,  # i32[W, T + 1]
    *,
    batch_size: int,
    dtype=None,
    attention: str | None = None,
) -> float:
    """Mean next-token loss (nats) over all targets of `windows`."""
    dtype = jnp.dtype(dtype or steps.compute_dtype)
    attention = attention or (steps.attention if dtype.itemsize == 2 else "xla")
    total = count = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[: len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        loss_sum, n, _ = steps.eval_step(
            params, chunk, weights, dtype=dtype.name, attention=attention
        )
        total += float(loss_sum)
        count += float(n)
    return total / count


# ---------------------------------------------------------------------------- train


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained fp32 model, its loss history and final metrics."""

    model: Llama
    history: dict[str, Any]
    metrics: dict[str, Any]


def train(
    train_config: TrainConfig,
    model_config: LlamaConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    *,
    token_cache_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains a `Llama` of `model_config` from scratch on the train split of `data_dir`.

    Args:
      train_config: the recipe's hyperparameters.
      model_config: the architecture; its `vocab_size` must cover the tokenizer.
      out_dir: receives `checkpoints/step_<n>/` (orbax, via `convert.orbax_io.save_orbax`),
        and `history.json`.
      data_dir: the Gutenberg folder with `MANIFEST.tsv` (default: `default_data_dir()`).
      tokenizer_dir: folder with `tokenizer.json` (default: the bundled verifier's).
      token_cache_dir: where the tokenized splits are cached (default: `out_dir/tokens`).
      progress: show a tqdm progress bar (loss, tokens/s) on stderr.

    Returns:
      A `TrainResult`; `metrics` holds steps, tokens seen, the final train loss (mean of the
      last `log_every` steps) and the validation loss and perplexity of the returned model
      (its parameters rounded to bf16, the export dtype, then scored in fp32).
    """
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else ASSETS / "verifier"
    tc = train_config
    vocab = _load_bpe(tokenizer_dir).get_vocab_size()
    if vocab > model_config.vocab_size:
        raise SpecAttnError(
            f"the tokenizer has {vocab} tokens, the model's vocab_size is {model_config.vocab_size}"
        )

    cache = Path(token_cache_dir) if token_cache_dir is not None else out_dir / "tokens"
    train_stream = tokenize_split("train", data_dir, tokenizer_dir, cache)
    val_stream = tokenize_split("validation", data_dir, tokenizer_dir, cache)
    model = init_model(model_config, tc.seed)
    return train_model(model, train_stream, val_stream, tc, out_dir, progress=progress)


def train_model(
    model: Llama,
    train_stream: np.ndarray,  # u16/i32[N]
    val_stream: np.ndarray,  # u16/i32[M]
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    objective: Objective | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains `model` (fp32) on windows of `train_stream`: the loop behind `train`.

    `objective` is what each step minimises (default: `NextTokenLoss`); its named parts are
    logged beside the loss. The periodic and final evaluations score the next-token loss of
    `val_stream`. Outputs as `train`'s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = train_config
    objective = objective if objective is not None else NextTokenLoss()
    if model.config.max_position_embeddings < tc.seq_len:
        raise SpecAttnError(
            f"seq_len={tc.seq_len} exceeds max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    periodic_windows = eval_windows(val_stream, tc.seq_len, tc.eval_windows)
    batches = train_windows(train_stream, tc.seq_len, tc.batch_size, tc.seed)

    graphdef, params = nnx.split(model)
    steps = _Steps(graphdef, tc, _attention_impl(tc, tc.compute_dtype), objective)
    opt_state = steps.tx.init(params)
    t0 = time.perf_counter()
    steps.compile(params, opt_state)
    compile_s = time.perf_counter() - t0

    history: dict[str, Any] = {
        "train_config": dataclasses.asdict(tc),
        "model_config": model.config.to_hf(),
        "params": count_params(model),
        "train_tokens": int(len(train_stream)),
        "validation_tokens": int(len(val_stream)),
        "out_dir": str(out_dir),
        "device": str(jax.devices()[0].device_kind),
        "attention": steps.attention,
        "compile_s": round(compile_s, 2),
        "train": [],
        "eval": [],
    }
    total_steps = tc.steps
    best = (math.inf, params, 0)
    bar = progress_bar(
        total=total_steps,
        unit="step",
        disable=not progress,
        mininterval=2.0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    interval_losses, interval_start, calib_start = [], time.perf_counter(), None
    train_time = 0.0
    step = 0
    while step < total_steps:
        lr = learning_rate(step, total_steps, tc)
        params, opt_state, stats = steps.train_step(
            params, opt_state, next(batches), np.float32(lr), objective.inputs
        )
        interval_losses.append(stats["loss"])
        step += 1
        if tc.time_budget_s is not None and step == 1:
            jax.block_until_ready(stats["loss"])
            calib_start = time.perf_counter()
        if tc.time_budget_s is not None and step == tc.calibration_steps + 1:
            jax.block_until_ready(stats["loss"])
            step_s = (time.perf_counter() - calib_start) / tc.calibration_steps
            fits = int(tc.time_budget_s / step_s)
            total_steps = max(tc.warmup_steps + 1, min(tc.steps, fits))
            history["step_s_calibrated"] = step_s
            bar.total = total_steps
            bar.write(f"{step_s * 1e3:.1f} ms/step: training for {total_steps} steps")
        if step % tc.log_every == 0 or step == total_steps:
            losses = np.asarray(jax.device_get(interval_losses), np.float64)
            elapsed = time.perf_counter() - interval_start
            train_time += elapsed
            tokens_per_s = len(losses) * tc.tokens_per_step / elapsed
            history["train"].append(
                {
                    "step": step,
                    "loss": float(losses.mean()),
                    "lr": lr,
                    "grad_norm": float(stats["grad_norm"]),
                    **{name: float(stats[name]) for name in stats.keys() - {"loss", "grad_norm"}},
                    "tokens_per_s": tokens_per_s,
                    "time_s": round(train_time, 3),
                }
            )
            bar.set_postfix(loss=f"{losses.mean():.3f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(step - bar.n)
            interval_losses = []
            interval_start = time.perf_counter()
        if step % tc.eval_every == 0 or step == total_steps:
            val_loss = evaluate(steps, params, periodic_windows, batch_size=tc.batch_size)
            history["eval"].append({"step": step, "val_loss": val_loss})
            bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})")
            if val_loss < best[0]:
                best = (val_loss, params, step)
            _write_json(out_dir / "history.json", history)
            interval_start = time.perf_counter()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != total_steps:
            save_orbax(nnx.merge(graphdef, params), out_dir / "checkpoints" / f"step_{step:06d}")
            interval_start = time.perf_counter()
    bar.close()

    chosen_step = step
    if tc.select_best and best[2] != step:
        params, chosen_step = best[1], best[2]
    model = nnx.merge(graphdef, params)
    save_orbax(model, out_dir / "checkpoints" / f"step_{chosen_step:06d}")

    final_windows = eval_windows(val_stream, tc.seq_len, tc.final_eval_windows)
    exported = _cast(_cast(params, jnp.bfloat16), jnp.float32)
    with jax.default_matmul_precision("highest"):
        val_loss = evaluate(
            steps, exported, final_windows, batch_size=tc.batch_size, dtype=jnp.float32
        )
    last = history["train"][-1]
    metrics = {
        "params": count_params(model),
        "steps": step,
        "chosen_step": chosen_step,
        "tokens_seen": step * tc.tokens_per_step,
        "epochs": step * tc.tokens_per_step / len(train_stream),
        "final_train_loss": last["loss"],
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_windows": len(final_windows),
        "train_time_s": round(train_time, 1),
        "tokens_per_s": step * tc.tokens_per_step / max(train_time, 1e-9),
    }
    history["final"] = metrics
    _write_json(out_dir / "history.json", history)
    return TrainResult(model=model, history=history, metrics=metrics)


def export_model(model: Llama, directory: str | Path, tokenizer_dir: str | Path | None = None):
    """Writes the HF folder: `config.json`, bf16 `model.safetensors`, the tokenizer files."""
    directory = Path(directory)
    save_hf_model(model, directory, dtype="bfloat16")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, directory / name)
    return directory


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------- reports


def compare_pair(
    draft: Llama,
    verifier: Llama,
    windows: np.ndarray,  # i32[W, T + 1]
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Scores both models on the same windows (fp32 compute): each one's mean next-token loss,
    the mean KL(verifier || draft) of their next-token distributions, and the greedy
    agreement, the fraction of positions where the draft's and the verifier's argmax agree
    reading the same text (a first look at the greedy acceptance rate)."""

    def logits_of(graphdef, state, tokens):
        return causal_lm_logits(nnx.merge(graphdef, _cast(state, jnp.float32)), tokens[:, :-1])

    @jax.jit
    def batch_scores(draft_state, verifier_state, tokens):
        draft_logits = logits_of(draft_graph, draft_state, tokens)
        verifier_logits = logits_of(verifier_graph, verifier_state, tokens)
        return (
            next_token_losses(draft_logits, tokens).sum(),
            next_token_losses(verifier_logits, tokens).sum(),
            next_token_kl(draft_logits, verifier_logits).sum(),
            (jnp.argmax(draft_logits, -1) == jnp.argmax(verifier_logits, -1)).sum(),
        )

    draft_graph, draft_state = nnx.split(draft)
    verifier_graph, verifier_state = nnx.split(verifier)
    totals = np.zeros(4)
    count = 0
    with jax.default_matmul_precision("highest"):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start : start + batch_size]
            totals += [float(x) for x in batch_scores(draft_state, verifier_state, tokens)]
            count += tokens[:, 1:].size
    draft_loss, verifier_loss, kl, agree = totals / count
    return {
        "draft_val_loss": draft_loss,
        "verifier_val_loss": verifier_loss,
        "draft_val_ppl": math.exp(draft_loss),
        "verifier_val_ppl": math.exp(verifier_loss),
        "kl_verifier_to_draft": kl,
        "greedy_agreement": agree,
        "tokens": count,
    }


def report_pair(
    verifier_dir: str | Path,
    draft_dir: str | Path,
    data_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    *,
    split: str = "validation",
    seq_len: int = 2048,
    windows: int | None = None,
    token_cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """`compare_pair` on exported HF folders (the shipped weights) over a split's windows."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(verifier_dir)
    stream = tokenize_split(split, data_dir, tokenizer_dir, token_cache_dir)
    report = compare_pair(
        load_hf_model(draft_dir),
        load_hf_model(verifier_dir),
        eval_windows(stream, seq_len, windows),
    )
    return {"split": split, "seq_len": seq_len, **report}


def plot_history(
    histories: dict[str, dict],
    path: str | Path,
    title: str = "Bundled pair: training on the Gutenberg train books",
) -> Path:
    """A PNG of train and validation loss against tokens seen, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (name, history), color in zip(histories.items(), ("C0", "C1", "C2", "C3"), strict=False):
        per_step = history["train_config"]["batch_size"] * history["train_config"]["seq_len"]
        train_rows, eval_rows = history["train"], history["eval"]
        ax.plot(
            [r["step"] * per_step / 1e6 for r in train_rows],
            [r["loss"] for r in train_rows],
            color=color,
            alpha=0.6,
            lw=1,
            label=f"{name} train",
        )
        ax.plot(
            [r["step"] * per_step / 1e6 for r in eval_rows],
            [r["val_loss"] for r in eval_rows],
            "o-",
            color=color,
            ms=3,
            label=f"{name} val",
        )
        chosen = [r for r in eval_rows if r["step"] == history.get("final", {}).get("chosen_step")]
        if chosen:
            ax.plot(
                chosen[0]["step"] * per_step / 1e6,
                chosen[0]["val_loss"],
                "*",
                color=color,
                ms=14,
                mec="black",
                label=f"{name} shipped (step {chosen[0]['step']})",
            )
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's options of `specattn train`."""
    parser.add_argument(
        "--config", required=True, type=Path, help="JSON {model, train} (and distill)"
    )
    parser.add_argument("--out-dir", required=True, type=Path, help="checkpoints, history")
    parser.add_argument("--data-dir", type=Path, default=None, help="the Gutenberg folder")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="folder of tokenizer.json (from scratch)"
    )
    parser.add_argument("--token-cache", type=Path, default=None, help="tokenized splits")
    parser.add_argument("--export", type=Path, default=None, help="HF folder to write")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of steps")
    parser.add_argument("--no-time-budget", action="store_true", help="run exactly `steps`")
    parser.add_argument(
        "--attention", choices=_ATTENTION_CHOICES, default=None, help="override train.attention"
    )


def run_config(args: argparse.Namespace) -> tuple[TrainConfig, LlamaConfig]:
    """The config file's (TrainConfig, LlamaConfig), with the command line's overrides."""
    train_config, model_config = load_run_config(args.config)
    overrides = {
        "steps": args.steps,
        "seed": args.seed,
        "time_budget_s": args.time_budget,
        "attention": args.attention,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_time_budget:
        overrides["time_budget_s"] = None
    return dataclasses.replace(train_config, **overrides), model_config


def run(args: argparse.Namespace) -> None:
    """Trains from scratch as `args` say, exports, and prints the final metrics."""
    train_config, model_config = run_config(args)
    result = train(
        train_config,
        model_config,
        args.out_dir,
        args.data_dir,
        args.tokenizer,
        token_cache_dir=args.token_cache,
    )
    if args.export is not None:
        export_model(result.model, args.export, args.tokenizer or ASSETS / "verifier")
    print(json.dumps(result.metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m specattn_jax.train",
        description="Train a Llama on the Gutenberg train books.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
