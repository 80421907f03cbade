"""The exactness invariants on the GPU, through the Pallas kernels, on the bundled pair:
greedy speculative decoding equals the verifier's own greedy decoding (float32 and
bfloat16, ragged batch of 2), `attn_p=1.0` equals dense speculative decoding, and the
kernel path's sparse tokens equal the jnp reference path's for the same plan.

Where the tokens differ, the test finds the first difference, measures the verifier's logit
margin between the two candidates there, and passes only if every margin is within the
dtype's tolerance (a near tie that the order of arithmetic may break either way). Counts and
margins are printed (`pytest -s`) and collected in `EXACTNESS_REPORT`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax.acceptance import GreedyAcceptance
from specattn_jax.layer_map import LayerMap
from specattn_jax.loading import ASSETS, load_pretrained
from specattn_jax.speculative import (
    SpecConfig,
    _jit_prefill,
    _jit_step,
    _setup,
    draft_and_plan,
    generate,
)
from tests.kernels.base import KernelTestBase
from tests.tolerances import tolerance

PROMPTS = [
    "It was a dark and stormy night, and the wind howled over the moor. The old house",
    "When I came into the room, she",
]
MAX_NEW = 64
EXACTNESS_REPORT: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    """Writes EXACTNESS_REPORT to $SPECATTN_REPORT_DIR/gpu_exactness.json when set."""
    yield
    directory = os.environ.get("SPECATTN_REPORT_DIR")
    if directory and EXACTNESS_REPORT:
        with open(os.path.join(directory, "gpu_exactness.json"), "w") as f:
            json.dump(EXACTNESS_REPORT, f, indent=1)


def _margin_tolerance(dtype, logit: float) -> float:
    tol = tolerance(dtype)
    return tol["atol"] + tol["rtol"] * abs(logit)


@dataclasses.dataclass
class Mismatch:
    sequence: int
    index: int  # generated token index of the first difference
    margin: float  # |logit(a) - logit(b)| of the two candidates
    allowed: float


def _first_mismatches(verifier, prompts, got, expected) -> list[Mismatch]:
    """The first differing token of each sequence, with the verifier's (dense) logit margin
    between the two candidates after the common prefix."""
    graphdef, state = nnx.split(verifier)
    found = []
    for row, (prompt, a, b) in enumerate(zip(prompts, got, expected, strict=True)):
        index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if index is None:
            assert len(a) == len(b)
            continue
        prefix = jnp.asarray([list(prompt) + a[:index]], jnp.int32)
        model = nnx.merge(graphdef, state)
        logits, _, _ = model(prefix, model.init_cache(1, prefix.shape[1]), last_logits_only=True)
        logits = np.asarray(logits[0, 0], np.float64)
        found.append(
            Mismatch(
                row,
                index,
                abs(logits[a[index]] - logits[b[index]]),
                _margin_tolerance(verifier.dtype, logits.max()),
            )
        )
    return found


def _report(name, dtype, tokens, mismatches):
    entry = {
        "check": name,
        "dtype": jnp.dtype(dtype).name,
        "tokens_compared": sum(len(t) for t in tokens),
        "mismatches": [dataclasses.asdict(m) for m in mismatches],
    }
    EXACTNESS_REPORT.append(entry)
    print(entry)
    for mismatch in mismatches:
        assert mismatch.margin <= mismatch.allowed, mismatch


@pytest.mark.gpu
class GpuExactnessTest(KernelTestBase):
    __test__ = True  # collected despite the jax-style name
    KERNEL = "pallas"

    @pytest.fixture(scope="class", params=["float32", "bfloat16"])
    @classmethod
    def pair(cls, request):
        dtype = jnp.dtype(request.param)
        verifier, tokenizer = load_pretrained("bundled:verifier", dtype)
        draft, _ = load_pretrained("bundled:draft", dtype)
        prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
        assert len(set(map(len, prompts))) == 2  # ragged
        return draft, verifier, prompts, LayerMap.load(ASSETS / "layer_map.json")

    def test_greedy_speculative_equals_verifier_greedy(self, pair):
        draft, verifier, prompts, _ = pair
        spec = generate(
            draft, verifier, prompts, SpecConfig(gamma=4), max_new_tokens=MAX_NEW, eos_id=None
        )
        plain = generate(None, verifier, prompts, max_new_tokens=MAX_NEW, eos_id=None)
        assert spec.stats["accepted"] > 0
        mismatches = _first_mismatches(verifier, prompts, spec.tokens, plain.tokens)
        _report("greedy speculative == verifier greedy", verifier.dtype, plain.tokens, mismatches)

    @pytest.mark.parametrize("granularity", [1, 16])
    def test_p_one_equals_dense_speculative_decoding(self, pair, granularity):
        draft, verifier, prompts, layer_map = pair
        config = SpecConfig(gamma=4, attn_p=1.0, granularity=granularity, layer_map=layer_map)
        sparse = generate(draft, verifier, prompts, config, max_new_tokens=MAX_NEW, eos_id=None)
        dense = generate(
            draft, verifier, prompts, SpecConfig(gamma=4), max_new_tokens=MAX_NEW, eos_id=None
        )
        assert sparse.stats["kv_reduction"] == 0.0
        mismatches = _first_mismatches(verifier, prompts, sparse.tokens, dense.tokens)
        _report(f"p=1 (g={granularity}) == dense", verifier.dtype, dense.tokens, mismatches)

    def test_kernel_path_equals_reference_path_for_the_same_plan(self, pair):
        """Step by step from the same state: one step through the Pallas kernels, one through
        the jnp references; the kernel path goes on. At a step whose tokens differ, the
        verifier's logits under the same plan are computed both ways, and the reference's
        margin between the two choices at the first differing position is checked."""
        draft, verifier, prompts, layer_map = pair
        config = SpecConfig(gamma=4, attn_p=0.7, granularity=16, layer_map=layer_map)
        run = _setup(draft, verifier, prompts, config, MAX_NEW, None, None, None, None, None)
        state = _jit_prefill(*run.prefill_args)
        selector = run.selector

        def step(backend, state):
            decoder = dataclasses.replace(run.decoder, backend=backend)
            return _jit_step(decoder, run.params, run.rule, selector, jax.tree.map(jnp.copy, state))

        mismatches, steps = [], 0
        while not bool(np.all(np.asarray(state.progress.done))):
            kernel = step(self.KERNEL, state)
            reference = step("reference", state)
            got, want = np.asarray(kernel.progress.output), np.asarray(reference.progress.output)
            if not np.array_equal(got, want):
                found = _verify_mismatches(draft, verifier, selector, state, config, self.KERNEL)
                assert found, f"step {steps}: the tokens differ but no verify choice does"
                mismatches += found
            state, steps = kernel, steps + 1
        _report(
            "sparse kernel path == reference path (same plan)",
            verifier.dtype,
            np.asarray(state.progress.output).tolist(),
            mismatches,
        )
        assert steps > 5


def _verify_mismatches(draft, verifier, selector, state, config, kernel) -> list[Mismatch]:
    """The verify of `state`'s next step under its plan, through the kernel and the
    reference: the first position per sequence where their greedy choices differ, with the
    reference logits' margin between the two."""
    drafts, cache, plan = draft_and_plan(
        draft,
        verifier.config,
        selector,
        state.caches,
        state.last_two,
        state.seq_lengths,
        GreedyAcceptance(),
        jax.random.key(0),
        config.gamma,
    )
    tokens = jnp.concatenate([state.last_two[:, 1:], drafts.tokens], axis=1)
    logits = {
        backend: np.asarray(
            verifier(tokens, jax.tree.map(jnp.copy, cache), plan=plan, backend=backend)[0],
            np.float64,
        )
        for backend in (kernel, "reference")
    }
    choice = {backend: value.argmax(-1) for backend, value in logits.items()}
    kernel_choice, reference_choice = choice[kernel], choice["reference"]
    found = []
    for row in range(tokens.shape[0]):
        if bool(state.progress.done[row]):
            continue
        differ = np.flatnonzero(kernel_choice[row] != reference_choice[row])
        if len(differ):
            t = int(differ[0])
            ref = logits["reference"][row, t]
            a, b = kernel_choice[row, t], reference_choice[row, t]
            found.append(
                Mismatch(
                    row,
                    int(state.progress.num_generated[row]) + t,
                    abs(ref[a] - ref[b]),
                    _margin_tolerance(verifier.dtype, ref.max()),
                )
            )
    return found
