"""A draft for any verifier: a small Llama distilled from the verifier's next-token
distributions on the Gutenberg train books (`specattn train --distill-from VERIFIER`).

- Data: the train and validation books, each tokenized whole by the verifier's own tokenizer
  (its special tokens as `tokenizer(text)` adds them, then its EOS), cut into windows as the
  recipe does (`train.train_windows`).
- Loss: `(1 - lm_weight) * KL(verifier || draft) + lm_weight * next-token cross-entropy`,
  per target token, plus `attention_weight` times the attention loss (`attention_kl`): on
  `attention_rows` query positions of each window, KL from the verifier's head-mean attention
  (averaged over a contiguous group of its layers) to the draft's, one group per draft layer.
  That term teaches the draft's attention to point where the verifier's does, which is what
  SpecAttn's selection reads. The verifier runs inside each step on the same windows (bf16, no
  gradient); its parameters are an argument of the step, not constants compiled into it.
- Initialisation: by default the draft's embedding starts as the verifier's, projected on
  its top principal directions (`embedding_from_verifier`); the rest as the recipe's.
- The loop, optimiser, checkpoints, time budget and progress bar are the recipe's
  (`train.train_model`); the draft shares the verifier's vocabulary, special tokens and
  RoPE base. The export is an HF folder with the verifier's tokenizer.

    specattn train --config configs/smollm2-draft/config.json \\
        --distill-from ~/.cache/specattn/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out-dir runs/smollm2-draft --export runs/smollm2-draft/hf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax import train
from specattn_jax.attention import head_mean_log_probabilities
from specattn_jax.config import LlamaConfig
from specattn_jax.convert.hf import save_hf_model
from specattn_jax.data import default_data_dir
from specattn_jax.errors import IncompatibleModelsError, SpecAttnError
from specattn_jax.layer_map import layer_groups
from specattn_jax.loading import load_pretrained
from specattn_jax.model import Llama, count_params

_EMBEDDING_INITS = ("verifier", "random")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The `"distill"` table of a run config.

    Attributes:
      lm_weight: weight of the plain next-token loss; the KL to the verifier gets
        `1 - lm_weight` (0: pure distillation, 1: the recipe's loss alone).
      embedding_init: "verifier" (the verifier's embedding on its top principal directions)
        or "random" (the recipe's initialisation).
      attention_weight: weight of the attention loss (`attention_kl`); 0 turns it off.
      attention_rows: query positions per window that the attention loss reads
        (`attention_rows`).
    """

    lm_weight: float = 0.0
    embedding_init: str = "verifier"
    attention_weight: float = 0.0
    attention_rows: int = 64

    def __post_init__(self):
        if not 0.0 <= self.lm_weight <= 1.0:
            raise SpecAttnError(f"lm_weight={self.lm_weight} must be in [0, 1]")
        if self.attention_weight < 0.0:
            raise SpecAttnError(f"attention_weight={self.attention_weight} must be >= 0")
        if self.attention_rows < 1:
            raise SpecAttnError(f"attention_rows={self.attention_rows} must be at least 1")
        if self.embedding_init not in _EMBEDDING_INITS:
            raise SpecAttnError(
                f"embedding_init={self.embedding_init!r} is not one of {_EMBEDDING_INITS}"
            )


def load_distill_config(path: str | Path) -> DistillConfig:
    """The `"distill"` table of a run config file (defaults where it has none)."""
    raw = json.loads(Path(path).read_text()).get("distill", {})
    try:
        return DistillConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    except TypeError as e:
        raise SpecAttnError(f"{path}: bad distill table ({e})") from None


def attention_rows(seq_len: int, count: int) -> tuple[int, ...]:
    """`count` query positions spread evenly over the last 7/8 of a window of `seq_len`
    (distinct, ascending): the attention loss reads these rows only, so it never forms
    [T, T] scores."""
    first = seq_len // 8
    return tuple(int(r) for r in np.unique(np.linspace(first, seq_len - 1, count).round()))


def attention_kl(
    draft_queries: jax.Array,  # [L_d, B, T, H_d, D_d]
    draft_keys: jax.Array,  # [L_d, B, T, H_kv_d, D_d]
    verifier_queries: jax.Array,  # [L_v, B, T, H_v, D_v]
    verifier_keys: jax.Array,  # [L_v, B, T, H_kv_v, D_v]
    rows: tuple[int, ...],
    groups: tuple[tuple[int, ...], ...],
) -> jax.Array:  # f32[]
    """Mean over draft layers d, sequences and `rows` of KL(target_d || draft_d) over the
    keys: draft_d is draft layer d's head-mean causal attention, target_d the mean of the
    verifier's head-mean attention over its layers `groups[d]` (no gradient through it)."""
    row_index = jnp.asarray(rows, jnp.int32)
    positions = jnp.broadcast_to(row_index, (draft_queries.shape[1], len(rows)))

    def log_attention(queries, keys, layer):  # f32[B, R, T]
        return head_mean_log_probabilities(queries[layer][:, row_index], keys[layer], positions)

    total = 0.0
    for draft_layer, group in enumerate(groups):
        target = sum(
            jnp.exp(log_attention(verifier_queries, verifier_keys, v)) for v in group
        ) / len(group)
        target = jax.lax.stop_gradient(target)
        log_draft = log_attention(draft_queries, draft_keys, draft_layer)
        kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_draft, axis=-1)
        total = total + kl.mean()
    return total / len(groups)


def validation_attention_kl(
    draft: Llama,
    verifier: Llama,
    windows: np.ndarray,  # i32[W, T + 1]
    rows: tuple[int, ...],
    groups: tuple[tuple[int, ...], ...],
    *,
    batch_size: int = 8,
) -> float:
    """`attention_kl` of the draft against the verifier (fp32 compute), averaged over
    `windows` (the inputs `windows[:, :-1]`, as in training)."""

    def queries_and_keys(graphdef, state, tokens):
        model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.float32), state))
        _, _, info = model(
            tokens[:, :-1], return_queries=True, return_keys=True, last_logits_only=True
        )  # only the queries and keys are read: skip the [B, T, V] logits
        return info.queries, info.keys

    @jax.jit
    def batch_kl(draft_state, verifier_state, tokens):
        draft_qk = queries_and_keys(draft_graph, draft_state, tokens)
        return attention_kl(*draft_qk, *queries_and_keys(verifier_graph, verifier_state, tokens),
                            rows, groups)  # fmt: skip

    draft_graph, draft_state = nnx.split(draft)
    verifier_graph, verifier_state = nnx.split(verifier)
    total = 0.0
    with jax.default_matmul_precision("highest"):
        for start in range(0, len(windows), batch_size):
            tokens = windows[start : start + batch_size]
            total += float(batch_kl(draft_state, verifier_state, tokens)) * len(tokens)
    return total / len(windows)


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
    """The objective of `train.train_model`: `(1 - lm_weight) * KL(verifier || draft) +
    lm_weight * CE + attention_weight * attention_kl`, token means. `inputs` holds the
    verifier's parameters (compute dtype)."""

    verifier_graphdef: Any
    inputs: Any
    lm_weight: float
    attention_weight: float = 0.0
    rows: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()

    def loss(self, model, tokens, inputs, attention):
        verifier = nnx.merge(self.verifier_graphdef, inputs)
        with_attention = self.attention_weight > 0
        forwards = [
            m(tokens[:, :-1], implementation=attention, return_queries=with_attention,
              return_keys=with_attention)
            for m in (model, verifier)
        ]  # fmt: skip
        (logits, _, draft), (target, _, teacher) = forwards
        kl = train.next_token_kl(logits, jax.lax.stop_gradient(target)).mean()
        ce = train.next_token_losses(logits, tokens).mean()
        loss = (1.0 - self.lm_weight) * kl + self.lm_weight * ce
        parts = {"kl": kl, "ce": ce}
        if with_attention:
            parts["attention_kl"] = attention_kl(
                draft.queries, draft.keys, teacher.queries, teacher.keys, self.rows, self.groups
            )
            loss = loss + self.attention_weight * parts["attention_kl"]
        return loss, parts


def embedding_from_verifier(
    verifier_embedding: np.ndarray,  # f32[V, H_verifier]
    width: int,
    std: float = 0.02,
) -> np.ndarray:  # f32[V, width]
    """The verifier's token embeddings projected on their `width` top principal directions
    (right singular vectors of the uncentred matrix), rescaled to standard deviation `std`:
    the draft starts with the verifier's similarities between tokens, at the recipe's scale."""
    embedding = np.asarray(verifier_embedding, np.float32)
    if width > embedding.shape[1]:
        raise SpecAttnError(
            f"embedding_init='verifier' needs hidden_size={width} <= the verifier's "
            f"{embedding.shape[1]}"
        )
    _, _, directions = np.linalg.svd(embedding, full_matrices=False)
    projected = embedding @ directions[:width].T
    return projected * (std / projected.std())


def verifier_token_stream(
    split: str,
    data_dir: str | Path,
    tokenizer,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """u16/i32[N] token stream of a split for a `transformers` tokenizer: each book as
    `tokenizer(book)` encodes it (with its BOS, if it adds one), then its EOS."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(texts: list[str]) -> list[list[int]]:
        return [ids + eos for ids in tokenizer(texts, verbose=False)["input_ids"]]

    fingerprint = json.dumps([tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id])
    return train.cached_token_stream(
        split, data_dir, encode, fingerprint=fingerprint.encode(), cache_dir=cache_dir
    )


def draft_config_for(verifier: Llama, model_config: LlamaConfig) -> LlamaConfig:
    """The draft's architecture with the verifier's vocabulary, special tokens and RoPE:
    `model_config`'s vocab_size must equal the verifier's."""
    if model_config.vocab_size != verifier.config.vocab_size:
        raise IncompatibleModelsError(
            f"the draft's vocab_size {model_config.vocab_size} differs from the verifier's "
            f"{verifier.config.vocab_size}"
        )
    return dataclasses.replace(
        model_config,
        bos_token_id=verifier.config.bos_token_id,
        eos_token_id=verifier.config.eos_token_id,
        rope_theta=verifier.config.rope_theta,
        rope_scaling=verifier.config.rope_scaling,
    )


def init_draft(
    model_config: LlamaConfig, verifier: Llama, distill_config: DistillConfig, seed: int
) -> Llama:
    """The recipe's initialisation (`train.init_model`), the embedding per `distill_config`."""
    draft = train.init_model(model_config, seed)
    if distill_config.embedding_init == "verifier":
        source = np.asarray(verifier.embed_tokens[...], np.float32)
        draft.embed_tokens[...] = jnp.asarray(
            embedding_from_verifier(source, model_config.hidden_size)
        )
    return draft


def distill(
    verifier: Llama,
    tokenizer,
    train_config: train.TrainConfig,
    model_config: LlamaConfig,
    out_dir: str | Path,
    distill_config: DistillConfig | None = None,
    data_dir: str | Path | None = None,
    *,
    token_cache_dir: str | Path | None = None,
    progress: bool = True,
) -> train.TrainResult:
    """Distils a draft of `model_config` from `verifier` on the train books of `data_dir`.

    Args:
      verifier: the teacher (any dtype; it runs in `train_config.compute_dtype`).
      tokenizer: the verifier's `transformers` tokenizer.
      train_config, model_config: as `train.train`'s; `model_config.vocab_size` must equal
        the verifier's (special tokens and RoPE are taken from the verifier).
      out_dir: checkpoints and `history.json`, as `train.train`'s.
      distill_config: the loss mix and the embedding initialisation.
      data_dir: the Gutenberg folder (default: `default_data_dir()`).
      token_cache_dir: where the tokenized splits are cached (default: `out_dir/tokens`).

    Returns:
      `train.TrainResult`; `metrics` adds the draft/verifier comparison on the validation
      windows (`train.compare_pair`: both losses, KL, greedy agreement), the attention
      loss there (`validation_attention_kl`, whatever `attention_weight`), and the
      parameter ratio.
    """
    distill_config = distill_config or DistillConfig()
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    tc = train_config
    if verifier.config.max_position_embeddings < tc.seq_len:
        raise SpecAttnError(
            f"seq_len={tc.seq_len} exceeds the verifier's max_position_embeddings="
            f"{verifier.config.max_position_embeddings}"
        )
    if len(tokenizer) > verifier.config.vocab_size:
        raise IncompatibleModelsError(
            f"the tokenizer has {len(tokenizer)} tokens, the verifier's vocab_size is "
            f"{verifier.config.vocab_size}"
        )
    model_config = draft_config_for(verifier, model_config)
    rows = attention_rows(tc.seq_len, distill_config.attention_rows)
    draft_layers = model_config.num_hidden_layers
    verifier_layers = verifier.config.num_hidden_layers
    groups = None
    if distill_config.attention_weight > 0 or draft_layers <= verifier_layers:
        groups = layer_groups(verifier_layers, draft_layers)
    cache = Path(token_cache_dir) if token_cache_dir is not None else out_dir / "tokens"
    train_stream = verifier_token_stream("train", data_dir, tokenizer, cache)
    val_stream = verifier_token_stream("validation", data_dir, tokenizer, cache)

    compute_dtype = jnp.dtype(tc.compute_dtype)
    verifier_graphdef, verifier_state = nnx.split(verifier)
    objective = DistillationLoss(
        verifier_graphdef,
        jax.tree.map(lambda p: p.astype(compute_dtype), verifier_state),
        distill_config.lm_weight,
        distill_config.attention_weight,
        rows,
        groups,
    )
    draft = init_draft(model_config, verifier, distill_config, tc.seed)
    result = train.train_model(
        draft, train_stream, val_stream, tc, out_dir, objective=objective, progress=progress
    )
    windows = train.eval_windows(val_stream, tc.seq_len, tc.final_eval_windows)
    comparison = train.compare_pair(result.model, verifier, windows, batch_size=tc.batch_size)
    verifier_params = count_params(verifier)
    result.metrics.update(
        comparison,
        attention_kl=None
        if groups is None
        else validation_attention_kl(
            result.model, verifier, windows, rows, groups, batch_size=tc.batch_size
        ),
        verifier_params=verifier_params,
        params_ratio=verifier_params / result.metrics["params"],
        distill_config=dataclasses.asdict(distill_config),
    )
    result.history["final"] = result.metrics
    (out_dir / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    return result


def export_draft(model: Llama, directory: str | Path, tokenizer) -> Path:
    """Writes the draft's HF folder: `config.json`, bf16 `model.safetensors`, and the
    verifier's tokenizer."""
    directory = Path(directory)
    save_hf_model(model, directory, dtype="bfloat16")
    tokenizer.save_pretrained(directory)
    return directory


def plot_distillation(history: dict, path: str | Path, title: str) -> Path:
    """A PNG of a distillation run against tokens seen: the draft's next-token loss (train
    windows, validation) beside the verifier's on validation; KL(verifier || draft) on the
    train windows with the final validation value; and, for a run with the attention loss,
    that loss likewise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = history["train_config"]["batch_size"] * history["train_config"]["seq_len"]
    train_rows, eval_rows, final = history["train"], history["eval"], history["final"]
    seen = [r["step"] * per_step / 1e6 for r in train_rows]
    final_seen = final["steps"] * per_step / 1e6
    kl_panels = [("kl", "kl_verifier_to_draft", "KL(verifier || draft) (nats)")]
    if "attention_kl" in train_rows[0]:
        kl_panels.append(("attention_kl", "attention_kl", "attention KL, verifier to draft (nats)"))
    fig, axes = plt.subplots(1, 1 + len(kl_panels), figsize=(5.5 * (1 + len(kl_panels)), 4.2),
                             dpi=120)  # fmt: skip
    lm_ax = axes[0]
    lm_ax.plot(seen, [r["ce"] for r in train_rows], lw=1, alpha=0.6, label="draft, train")
    lm_ax.plot(
        [r["step"] * per_step / 1e6 for r in eval_rows],
        [r["val_loss"] for r in eval_rows],
        "o-",
        ms=3,
        label="draft, validation",
    )
    lm_ax.axhline(final["verifier_val_loss"], color="black", ls="--", lw=1, label="verifier")
    lm_ax.set_ylabel("next-token loss (nats)")
    for ax, (train_key, final_key, label) in zip(axes[1:], kl_panels, strict=True):
        ax.plot(seen, [r[train_key] for r in train_rows], lw=1, label="train windows")
        ax.plot(final_seen, final[final_key], "*", ms=12,
                label=f"validation, final ({final[final_key]:.3f})")  # fmt: skip
        ax.set_ylabel(label)
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("tokens seen (millions)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`specattn train`'s distillation options."""
    parser.add_argument(
        "--distill-from",
        default=None,
        metavar="VERIFIER",
        help="distil a draft from this verifier (HF folder, GGUF, ...) instead of training "
        "from scratch; the config's vocab_size must equal the verifier's",
    )
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=None,
        help="override distill.lm_weight: the weight of the plain next-token loss",
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=None,
        help="override distill.attention_weight: the weight of the loss that teaches the "
        "draft's attention to follow the verifier's (0: off)",
    )


def run(args: argparse.Namespace) -> None:
    """Distils as `args` say (`train.add_arguments` and `add_arguments`), exports, prints
    the final metrics."""
    if args.tokenizer is not None:
        raise SpecAttnError("--tokenizer does not apply to --distill-from: the verifier's is used")
    train_config, model_config = train.run_config(args)
    distill_config = load_distill_config(args.config)
    overrides = {"lm_weight": args.lm_weight, "attention_weight": args.attention_weight}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    distill_config = dataclasses.replace(distill_config, **overrides)
    verifier, tokenizer = load_pretrained(args.distill_from)
    if tokenizer is None:
        raise SpecAttnError(f"{args.distill_from} has no tokenizer to read the books with")
    result = distill(
        verifier,
        tokenizer,
        train_config,
        model_config,
        args.out_dir,
        distill_config,
        args.data_dir,
        token_cache_dir=args.token_cache,
    )
    if args.export is not None:
        export_draft(result.model, args.export, tokenizer)
    print(json.dumps(result.metrics, indent=1))
