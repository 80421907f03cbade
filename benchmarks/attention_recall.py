"""How well a draft's attention points at what the verifier reads.

For sequences of validation text: both models prefill all but the last `--queries` tokens,
then read those tokens in one forward that returns each layer's head-mean attention
probabilities over the live context. For each query row, p and source of guidance:

- the guidance's top-p set (the fewest context tokens holding mass p);
- its size, as a share of the context;
- its recall: the verifier's attention mass that falls inside it, per verifier layer;
- the recall of the guidance's top k, k the size of the verifier's own top-p set in that
  row and layer: how well the guidance ranks, whatever its spread.

The sources are each draft layer alone, and the mean over draft layers. The verifier's own
top-p set (the oracle) has recall >= p by construction; its size is the floor. A selector can
only read what its guidance ranks first, so a layer map is as good as the recall of the
draft layers it picks. Prints a table per p and writes every number to JSON.

    python benchmarks/attention_recall.py --verifier SmolLM2-135M-Instruct.Q4_1.gguf \\
        --draft runs/smollm2-draft/hf --layer-map configs/smollm2-draft/layer_map.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specattn_jax import LayerMap, load_pair
from specattn_jax.data import load_split_texts
from specattn_jax.eval import make_windows
from specattn_jax.progress import progress_bar


def head_mean_attention(model, tokens: np.ndarray, queries: int) -> np.ndarray:
    """f32[L, Q, S]: each layer's head-mean attention of the last `queries` tokens of
    `tokens` (i32[S]) over the whole sequence (one compiled program per model and shape)."""
    graphdef, state = nnx.split(model)
    attention = _head_mean_attention(graphdef, state, jnp.asarray(tokens[None]), queries)
    return np.asarray(attention, np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "queries"))
def _head_mean_attention(graphdef, state, tokens, queries):  # tokens: i32[1, S]
    model = nnx.merge(graphdef, state)
    size = tokens.shape[1]
    _, cache, _ = model(tokens[:, : size - queries], model.init_cache(1, size))
    _, _, info = model(tokens[:, size - queries :], cache, return_attention=True)
    return info.attention[:, 0]


def descending_ranks(scores: np.ndarray) -> np.ndarray:
    """i64[..., S]: each entry's place in its row, largest first (0 for the largest)."""
    return np.argsort(np.argsort(-scores, axis=-1), axis=-1)


def top_k_mask(ranks: np.ndarray, k: np.ndarray) -> np.ndarray:
    """bool[..., S]: the k[...] largest entries of each row, from `descending_ranks`."""
    return ranks < k[..., None]


def top_p_mask(scores: np.ndarray, p: float) -> np.ndarray:
    """bool[..., S]: the fewest entries of each row (descending) whose mass reaches p."""
    order = np.argsort(-scores, axis=-1)
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    before = np.cumsum(sorted_scores, axis=-1) - sorted_scores
    keep_sorted = before < p * scores.sum(axis=-1, keepdims=True)
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--layer-map", default=None, help="a map to score (JSON)")
    parser.add_argument("--data-dir", default=None, help="the Gutenberg folder")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=16, help="rows read at the end")
    parser.add_argument("--p", default="0.8,0.9,0.95")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    p_values = [float(p) for p in args.p.split(",")]

    draft, verifier, tokenizer = load_pair(args.verifier, args.draft, args.dtype)
    mapping = LayerMap.load(args.layer_map).mapping if args.layer_map else None
    windows = make_windows(
        tokenizer, load_split_texts("validation", args.data_dir), args.seq_len, args.sequences
    )
    draft_layers = draft.config.num_hidden_layers
    sources = [f"draft layer {i}" for i in range(draft_layers)] + ["draft layers' mean"]
    # Sums over rows: recall[p][verifier layer][source], size[p][source], oracle[p][layer].
    recall = np.zeros((len(p_values), verifier.config.num_hidden_layers, len(sources)))
    size = np.zeros((len(p_values), len(sources)))
    oracle = np.zeros((len(p_values), verifier.config.num_hidden_layers))
    ranked = np.zeros_like(recall)  # recall of the guidance's top k, k = the oracle's size
    rows = 0
    for tokens in progress_bar(windows, desc="sequences", unit="seq"):
        target = head_mean_attention(verifier, tokens, args.queries)  # [Lv, Q, S]
        guide = head_mean_attention(draft, tokens, args.queries)  # [Ld, Q, S]
        guide = np.concatenate([guide, guide.mean(axis=0, keepdims=True)])  # [Ld + 1, Q, S]
        context = len(tokens) - args.queries + 1 + np.arange(args.queries)  # live per row
        guide_ranks = descending_ranks(guide)
        for k, p in enumerate(p_values):
            masks = top_p_mask(guide, p)  # [Ld + 1, Q, S]
            size[k] += (masks.sum(-1) / context).sum(-1)
            recall[k] += np.einsum("lqs,dqs->ld", target, masks)
            oracle_counts = top_p_mask(target, p).sum(-1)  # [Lv, Q]
            oracle[k] += (oracle_counts / context).sum(-1)
            for j, counts in enumerate(oracle_counts):
                ranked[k, j] += np.einsum("qs,dqs->d", target[j], top_k_mask(guide_ranks, counts))
        rows += args.queries
    recall, size, oracle, ranked = recall / rows, size / rows, oracle / rows, ranked / rows

    device = jax.devices()[0].device_kind
    print(
        f"{len(windows)} validation sequences of {args.seq_len} tokens, the last "
        f"{args.queries} read, {args.dtype}, {device}; recall: the verifier's attention mass "
        f"inside the guidance's top-p set; size: that set's share of the context"
    )
    report = {"sources": sources, "mapping": mapping, "rows": rows, "by_p": []}
    labels = [str(i) for i in range(draft_layers)] + ["mean"]
    for k, p in enumerate(p_values):
        best = recall[k].argmax(axis=1)
        mapped = [recall[k, j, m] for j, m in enumerate(mapping)] if mapping else None
        sizes = " ".join(f"{label}: {s:.2f}" for label, s in zip(labels, size[k], strict=True))
        print(f"\np = {p}: the guidance's top-p set size, by source: {sizes}")
        print(
            "| verifier layer | oracle size | best source: recall | mean: recall | mean: "
            "top-k recall |" + (" mapped layer: recall, top-k recall |" if mapping else "")
        )
        print("| ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if mapping else ""))
        for j in range(recall.shape[1]):
            line = (
                f"| {j} | {oracle[k, j]:.2f} | {labels[best[j]]}: {recall[k, j, best[j]]:.3f} | "
                f"{recall[k, j, -1]:.3f} | {ranked[k, j, -1]:.3f} |"
            )
            if mapping:
                line += f" {mapping[j]}: {mapped[j]:.3f}, {ranked[k, j, mapping[j]]:.3f} |"
            print(line)
        report["by_p"].append(
            {
                "p": p,
                "draft_set_size": size[k].tolist(),
                "oracle_set_size": oracle[k].tolist(),
                "recall": recall[k].tolist(),
                "top_k_recall": ranked[k].tolist(),
                "mapped_recall": mapped,
            }
        )
    if args.out:
        report.update(
            verifier=args.verifier,
            draft=args.draft,
            sequences=len(windows),
            seq_len=args.seq_len,
            queries=args.queries,
            dtype=args.dtype,
            device=device,
        )
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
