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
from flax import nnx

from specattn_jax.errors import SpecAttnError
from specattn_jax.model import Llama
from specattn_jax.progress import progress_bar

_LOG_FLOOR = 1e-30


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


CHOICES = ("kl", "groups")


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
    """f32[L_d, L_v] KL scores of one sequence i32[1, T]."""
    attention = {}
    for name, graphdef, state in (
        ("draft", draft_graphdef, draft_state),
        ("verifier", verifier_graphdef, verifier_state),
    ):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(1, tokens.shape[1])
        _, _, info = model(tokens, cache, return_attention=True)
        attention[name] = info.attention[:, 0]
    return attention_kl_scores(attention["draft"], attention["verifier"])


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """A calibrated verifier-layer -> draft-layer map.

    Attributes:
      mapping: for each verifier layer j, the draft layer f(j) (non-decreasing).
      scores: L_d x L_v matrix of -KL(A_v[j] || A_d[i]).
      draft_fingerprint, verifier_fingerprint: `model_fingerprint` of the calibrated pair.
      calibration: what it was calibrated on (sequences, tokens per sequence, source).
    """

    mapping: tuple[int, ...]
    scores: tuple[tuple[float, ...], ...]
    draft_fingerprint: str
    verifier_fingerprint: str
    calibration: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)

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
    distillation groups' map ("groups", `group_layer_map`)."""
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
    for tokens in progress_bar(sequences, desc="calibrating layer map", disable=not progress):
        total += np.asarray(
            _sequence_scores(
                draft_graphdef, draft_state, verifier_graphdef, verifier_state, tokens[None]
            ),
            np.float64,
        )
    scores = total / len(sequences)
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
    )
