"""Layer mapping: which draft layer's attention stands in for each verifier layer.

Calibration runs both models over the same token sequences and scores every pair of layers
by `S[i, j] = -KL(A_v[j] || A_d[i])`, the divergence between the head-mean attention rows of
verifier layer j and draft layer i, averaged over query positions and sequences. The map `f`
maximises `sum_j S[f(j), j]` subject to `f` non-decreasing, solved exactly by dynamic
programming in O(L_v * L_d).

A draft distilled with the attention loss (`distill`) learned, in each of its layers, the
attention of one contiguous group of verifier layers (`layer_groups`); `choose="groups"` maps
each verifier layer to the draft layer of its group instead (the scores are still measured,
for the heatmap). On the SmolLM2 pair's validation text that map read less and scored better
than the KL map (README, "The real pair").

`choose="mix"` goes beyond one draft layer per verifier layer: each verifier layer j reads
the weighted mix `sum_i W[j, i] A_d[i]` of the draft layers' attention, with the weights on the
simplex that minimise `KL(A_v[j] || sum_i W[j, i] A_d[i])` over sampled calibration rows (a
convex fit, `fit_layer_mix`; the KL map is one of its candidates). The mapping is then the
KL map, kept for the heatmap.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from specattn_jax.errors import SpecAttnError
from specattn_jax.model import Llama
from specattn_jax.progress import progress_bar

_LOG_FLOOR = 1e-30
MIX_ROWS = 64  # query rows per calibration sequence that the mix is fitted on
MIX_FLOOR = 0.02  # mix weights below this are dropped (and the row renormalised)
MIX_STEPS = 300


FINGERPRINT_ROWS = 16  # embedding rows sampled, evenly spread over the vocabulary


def model_fingerprint(model: Llama) -> str:
    """A short hash identifying a model: its config and the signs of a sample of its
    embedding rows. Rounding never flips a sign, so one checkpoint loaded in float32,
    bfloat16 or float16 has one fingerprint (a map calibrated in float32 on a CPU fits the
    bfloat16 load on a GPU)."""
    digest = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True).encode())
    embed = model.embed_tokens[...]  # [V, d]
    rows = np.linspace(0, embed.shape[0] - 1, FINGERPRINT_ROWS).round().astype(int)
    digest.update(np.packbits(np.asarray(embed[rows] > 0)).tobytes())
    return digest.hexdigest()[:16]


def layer_groups(num_verifier_layers: int, num_draft_layers: int) -> tuple[tuple[int, ...], ...]:
    """The verifier's layers cut into `num_draft_layers` contiguous groups as even as
    possible, in order: group d is the verifier layers whose attention draft layer d learns.
    Each group is non-empty, so the draft may not be deeper than the verifier."""
    if not 0 < num_draft_layers <= num_verifier_layers:
        raise SpecAttnError(
            f"the attention loss needs a draft of 1..{num_verifier_layers} layers (one group of "
            f"verifier layers each), not {num_draft_layers}"
        )
    bounds = np.linspace(0, num_verifier_layers, num_draft_layers + 1).round().astype(int)
    return tuple(tuple(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))


def group_layer_map(num_verifier_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """f(j) = the draft layer whose group (`layer_groups`) holds verifier layer j."""
    groups = layer_groups(num_verifier_layers, num_draft_layers)
    return tuple(draft_layer for draft_layer, group in enumerate(groups) for _ in group)


CHOICES = ("kl", "groups", "mix")


def monotone_layer_map(scores: np.ndarray) -> tuple[int, ...]:
    """The non-decreasing map f: verifier layer -> draft layer maximising sum_j S[f(j), j].

    Args:
      scores: f64[L_d, L_v] with `scores[i, j]` the score of mapping verifier layer j to
        draft layer i.
    Returns:
      f as a tuple of L_v draft-layer indices; ties go to the smallest index.
    """
    scores = np.asarray(scores, np.float64)
    num_draft, num_verifier = scores.shape
    best = np.empty((num_verifier, num_draft))  # best[j, i]: best total of layers 0..j, f(j)=i
    best[0] = scores[:, 0]
    for j in range(1, num_verifier):
        best[j] = scores[:, j] + np.maximum.accumulate(best[j - 1])
    mapping = [int(np.argmax(best[-1]))]
    for j in range(num_verifier - 2, -1, -1):
        mapping.append(int(np.argmax(best[j][: mapping[-1] + 1])))
    return tuple(reversed(mapping))


def attention_kl_scores(
    draft_attention: jax.Array,  # f32[L_d, T, S]
    verifier_attention: jax.Array,  # f32[L_v, T, S]
) -> jax.Array:
    """f32[L_d, L_v]: mean over the T query rows of -KL(A_v[j] || A_d[i])."""
    entropy_term = jnp.sum(
        verifier_attention * jnp.log(jnp.maximum(verifier_attention, _LOG_FLOOR)), axis=(1, 2)
    )  # [L_v]
    cross_term = jnp.einsum(
        "jts,its->ij", verifier_attention, jnp.log(jnp.maximum(draft_attention, _LOG_FLOOR))
    )
    return -(entropy_term[None, :] - cross_term) / verifier_attention.shape[1]


@functools.partial(jax.jit, static_argnames=("draft_graphdef", "verifier_graphdef"))
def _sequence_scores(draft_graphdef, draft_state, verifier_graphdef, verifier_state, tokens):
    """The KL scores f32[L_d, L_v] of one sequence i32[1, T], and the attention rows the mix
    is fitted on: f32[L_d, R, T] and f32[L_v, R, T], R = `MIX_ROWS` query rows evenly
    spread over the sequence (all of them if fewer)."""
    attention = {}
    for name, graphdef, state in (
        ("draft", draft_graphdef, draft_state),
        ("verifier", verifier_graphdef, verifier_state),
    ):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(1, tokens.shape[1])
        _, _, info = model(tokens, cache, return_attention=True)
        attention[name] = info.attention[:, 0]
    num_tokens = tokens.shape[1]
    rows = np.unique(np.linspace(0, num_tokens - 1, min(MIX_ROWS, num_tokens)).astype(int))
    return (
        attention_kl_scores(attention["draft"], attention["verifier"]),
        attention["draft"][:, rows],
        attention["verifier"][:, rows],
    )


def _stack_rows(rows: list[np.ndarray]) -> jax.Array:
    """f32[L, sum R_k, max T_k]: per-sequence rows f32[L, R_k, T_k] joined, those of shorter
    sequences padded with zeros (no mass, so no part of the fit's loss)."""
    width = max(r.shape[-1] for r in rows)
    return jnp.asarray(
        np.concatenate([np.pad(r, ((0, 0), (0, 0), (0, width - r.shape[-1]))) for r in rows], 1)
    )


def fit_layer_mix(
    draft_rows: jax.Array,  # f32[L_d, R, S] attention rows (each sums to 1)
    verifier_rows: jax.Array,  # f32[L_v, R, S] the verifier's rows of the same queries
    steps: int = MIX_STEPS,
) -> np.ndarray:
    """f64[L_v, L_d]: per verifier layer j, the weights on the simplex that minimise the mean
    `KL(A_v[j] || sum_i W[j, i] A_d[i])` over the rows (Adam on softmax logits), with weights
    below `MIX_FLOOR` dropped and each row renormalised."""
    num_verifier, num_draft = verifier_rows.shape[0], draft_rows.shape[0]

    def cross_entropy(logits):  # the KL up to the verifier rows' own entropy
        mixed = jnp.einsum("ji,irs->jrs", jax.nn.softmax(logits, axis=1), draft_rows)
        return -jnp.sum(verifier_rows * jnp.log(jnp.maximum(mixed, _LOG_FLOOR))) / (
            num_verifier * verifier_rows.shape[1]
        )

    optimizer = optax.adam(0.1)

    @jax.jit
    def update(logits, state):
        grads = jax.grad(cross_entropy)(logits)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(logits, updates), state

    logits = jnp.zeros((num_verifier, num_draft), jnp.float32)
    state = optimizer.init(logits)
    for _ in range(steps):
        logits, state = update(logits, state)
    weights = np.asarray(jax.nn.softmax(logits, axis=1), np.float64)
    weights = np.where(weights < MIX_FLOOR, 0.0, weights)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """A calibrated verifier-layer -> draft-layer map.

    Attributes:
      mapping: for each verifier layer j, the draft layer f(j) (non-decreasing).
      scores: L_d x L_v matrix of -KL(A_v[j] || A_d[i]).
      draft_fingerprint, verifier_fingerprint: `model_fingerprint` of the calibrated pair.
      calibration: what it was calibrated on (sequences, tokens per sequence, source).
      mix: L_v x L_d weights (each row on the simplex): verifier layer j reads the mix of
        the draft layers' attention (`choose="mix"`); None reads draft layer f(j) alone.
    """

    mapping: tuple[int, ...]
    scores: tuple[tuple[float, ...], ...]
    draft_fingerprint: str
    verifier_fingerprint: str
    calibration: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    mix: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        if self.mix is None:
            return
        weights = np.asarray(self.mix, np.float64)
        expected = (len(self.mapping), len(self.scores))
        if weights.shape != expected:
            raise SpecAttnError(
                f"the layer mix has shape {weights.shape} but the map is {expected[0]} "
                f"verifier x {expected[1]} draft layers"
            )
        if (weights < 0).any() or not np.allclose(weights.sum(axis=1), 1.0, atol=1e-6):
            raise SpecAttnError("each row of the layer mix must be non-negative and sum to 1")

    @property
    def num_verifier_layers(self) -> int:
        return len(self.mapping)

    def check_fits(self, draft: Llama, verifier: Llama) -> None:
        """Raises `SpecAttnError` unless the map was calibrated for this draft/verifier pair."""
        if len(self.mapping) != verifier.config.num_hidden_layers:
            raise SpecAttnError(
                f"the layer map has {len(self.mapping)} entries but the verifier has "
                f"{verifier.config.num_hidden_layers} layers"
            )
        if self.mix is not None and len(self.mix[0]) != draft.config.num_hidden_layers:
            raise SpecAttnError(
                f"the layer mix weighs {len(self.mix[0])} draft layers but the draft has "
                f"{draft.config.num_hidden_layers} layers"
            )
        if max(self.mapping) >= draft.config.num_hidden_layers or min(self.mapping) < 0:
            raise SpecAttnError(
                f"the layer map points at draft layers {sorted(set(self.mapping))} but the "
                f"draft has {draft.config.num_hidden_layers} layers"
            )
        if (self.draft_fingerprint, self.verifier_fingerprint) != (
            model_fingerprint(draft),
            model_fingerprint(verifier),
        ):
            raise SpecAttnError(
                "the layer map was calibrated for other models (fingerprints "
                f"{self.draft_fingerprint}/{self.verifier_fingerprint}, these models are "
                f"{model_fingerprint(draft)}/{model_fingerprint(verifier)}); recalibrate"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerMap:
        path = Path(path)
        if not path.is_file():
            raise SpecAttnError(f"layer map not found: {path}")
        try:
            data = json.loads(path.read_text())
            layer_map = cls(
                mapping=tuple(int(i) for i in data["mapping"]),
                scores=tuple(tuple(float(x) for x in row) for row in data["scores"]),
                draft_fingerprint=data["draft_fingerprint"],
                verifier_fingerprint=data["verifier_fingerprint"],
                calibration=data.get("calibration", {}),
                mix=None
                if data.get("mix") is None
                else tuple(tuple(float(x) for x in row) for row in data["mix"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SpecAttnError(f"{path} is not a valid layer map ({e})") from None
        if any(b < a for a, b in zip(layer_map.mapping, layer_map.mapping[1:], strict=False)):
            raise SpecAttnError(f"{path}: the mapping {layer_map.mapping} is not non-decreasing")
        return layer_map

    def plot(
        self, path: str | Path, title: str = "KL(A_v[j] || A_d[i]); squares: the map f(j)"
    ) -> Path:
        """Saves the KL heatmap (draft layers x verifier layers) with the chosen cells marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kl = -np.array(self.scores)
        num_draft, num_verifier = kl.shape
        fig, ax = plt.subplots(figsize=(2.5 + 0.55 * num_verifier, 1.5 + 0.55 * num_draft))
        image = ax.imshow(kl, cmap="viridis_r", aspect="auto", origin="lower")
        ax.scatter(
            range(num_verifier), self.mapping, marker="s", s=160, facecolors="none",
            edgecolors="red", linewidths=2,
        )  # fmt: skip
        ax.set_xlabel("verifier layer j")
        ax.set_ylabel("draft layer i")
        ax.set_xticks(range(num_verifier))
        ax.set_yticks(range(num_draft))
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="KL divergence (nats)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def calibrate(
    draft: Llama,
    verifier: Llama,
    sequences: Iterable[np.ndarray],
    *,
    progress: bool = False,
    source: str = "",
    choose: str = "kl",
) -> LayerMap:
    """Calibrates a `LayerMap` on token sequences (each i32[T], T >= 2, equal lengths compile
    once): the mean KL scores, and the map the monotone DP picks from them ("kl") or the
    distillation groups' map ("groups", `group_layer_map`); "mix" adds the layer mix
    (`fit_layer_mix`) to the KL map."""
    if choose not in CHOICES:
        raise SpecAttnError(f"choose={choose!r} must be one of {CHOICES}")
    sequences = [np.asarray(s, np.int32) for s in sequences]
    if not sequences or min(len(s) for s in sequences) < 2:
        raise SpecAttnError("calibration needs at least one sequence of 2 or more tokens")
    if draft.config.vocab_size != verifier.config.vocab_size:
        raise SpecAttnError("draft and verifier vocabularies differ; they cannot be calibrated")
    draft_graphdef, draft_state = nnx.split(draft)
    verifier_graphdef, verifier_state = nnx.split(verifier)
    total = np.zeros((draft.config.num_hidden_layers, verifier.config.num_hidden_layers))
    draft_rows, verifier_rows = [], []
    for tokens in progress_bar(sequences, desc="calibrating layer map", disable=not progress):
        sequence_scores, draft_sample, verifier_sample = _sequence_scores(
            draft_graphdef, draft_state, verifier_graphdef, verifier_state, tokens[None]
        )
        total += np.asarray(sequence_scores, np.float64)
        if choose == "mix":
            draft_rows.append(np.asarray(draft_sample))
            verifier_rows.append(np.asarray(verifier_sample))
    scores = total / len(sequences)
    mix = None
    if choose == "mix":
        weights = fit_layer_mix(_stack_rows(draft_rows), _stack_rows(verifier_rows))
        mix = tuple(tuple(float(x) for x in row) for row in weights)
    if choose == "groups":
        mapping = group_layer_map(verifier.config.num_hidden_layers, draft.config.num_hidden_layers)
    else:
        mapping = monotone_layer_map(scores)
    return LayerMap(
        mapping=mapping,
        scores=tuple(tuple(float(x) for x in row) for row in scores),
        draft_fingerprint=model_fingerprint(draft),
        verifier_fingerprint=model_fingerprint(verifier),
        calibration={
            "sequences": len(sequences),
            "tokens": int(sum(len(s) for s in sequences)),
            "source": source,
            "choose": choose,
        },
        mix=mix,
    )
