"""Selectors and the decode-time perplexity protocol: budgets, always-read positions, KV
reduction from what the attention read, exactness at full budget, the sweep end to end."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from specattn_jax.config import LlamaConfig
from specattn_jax.errors import SpecAttnError
from specattn_jax.eval import MethodFactory, PerplexityProtocol, decode_time_perplexity
from specattn_jax.eval.report import merge_reports
from specattn_jax.model import Llama
from specattn_jax.selection import SelectionInputs, SpecAttnSelector
from specattn_jax.selection.baselines import QUEST_PAGE
from specattn_jax.testing import tiny_hf_config
from tests.reference_llama import top_p_positions

SIZE = 128
BATCH = 3
NUM_NEW = 5


def _model(layers: int, seed: int) -> Llama:
    config = tiny_hf_config(num_kv_heads=2, num_layers=layers)
    config["head_dim"] = 16
    return Llama(LlamaConfig.from_hf(config), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def factory():
    draft, verifier = _model(2, seed=1), _model(4, seed=2)
    calibration = [np.random.default_rng(s).integers(0, 128, 64) for s in range(2)]
    return MethodFactory(draft, verifier, calibration)


@pytest.fixture(scope="module")
def step_inputs(factory):
    """A verifier cache of ragged context lengths, its next queries, a draft attention and
    the verifier's attention in a last verify (its two sparse layers)."""
    verifier = factory.verifier
    keys = jax.random.split(jax.random.key(0), 4)
    context = jnp.array([100, 37, 64], jnp.int32)
    cache = verifier.init_cache(BATCH, SIZE)
    tokens = jax.random.randint(keys[0], (BATCH, SIZE - NUM_NEW), 0, 128)
    _, cache, _ = verifier(tokens, cache, num_tokens=context)
    draft_attention = jax.random.dirichlet(keys[1], jnp.ones(SIZE), (NUM_NEW - 1, 2, BATCH))
    inputs = SelectionInputs(
        context_lengths=context,
        draft_attention=draft_attention.astype(jnp.float32),
        num_layers=4,
        cache_size=SIZE,
        verifier_attention=jax.random.dirichlet(keys[3], jnp.ones(SIZE), (2, BATCH)),
    )
    new_tokens = jax.random.randint(keys[2], (BATCH, NUM_NEW), 0, 128)
    return cache, inputs, new_tokens


def _layer_selections(factory, selector, step_inputs):
    """Per sparse layer: (indices, counts) as the verifier forward computes them, and the
    forward's reported KV reads."""
    cache, inputs, new_tokens = step_inputs
    plan = selector.plan(inputs)
    _, _, info = factory.verifier(new_tokens, cache, plan=plan, return_queries=True)
    selections = {}
    for layer, sparse in enumerate(plan.sparse_layers):
        if not sparse:
            continue
        if plan.query_selector is None:
            selections[layer] = plan.block_indices[layer], plan.block_counts[layer]
        else:
            layer_cache = _cache_after_write(factory.verifier, cache, new_tokens).layer(layer)
            read = plan.read(layer, info.queries[layer], layer_cache, inputs.context_lengths)
            selections[layer] = read.block_indices, read.block_counts
    return plan, selections, info


def _cache_after_write(model, cache, new_tokens):
    _, written, _ = model(new_tokens, cache)
    return written


SETTINGS = [
    ("specattn", 0.8),
    ("specattn_history", 0.8),
    ("oracle", 0.8),
    ("quest", 0.25),
    ("double_sparsity", 0.25),
    ("streaming_llm", 0.25),
]


@pytest.mark.parametrize("method,value", SETTINGS, ids=[m for m, _ in SETTINGS])
def test_selector_respects_budget_and_reports_what_it_read(factory, step_inputs, method, value):
    cache, inputs, new_tokens = step_inputs
    selector = factory.selector(method, value)
    plan, selections, info = _layer_selections(factory, selector, step_inputs)
    context = np.asarray(inputs.context_lengths)
    assert plan.sparse_layers == (False, False, True, True)
    for layer, (indices, counts) in selections.items():
        mask = pallas_kernels.selection_mask(
            indices, counts, inputs.context_lengths, NUM_NEW, SIZE, plan.granularity
        )
        mask = np.asarray(mask)
        # The new tokens are always read, causally, whatever the selection.
        for t in range(NUM_NEW):
            assert mask[np.arange(BATCH), t, context + t].all()
        # KV reduction comes from what attention read: the last query sees everything read.
        np.testing.assert_array_equal(info.kv_read[layer], mask[:, -1].sum(-1))
        read_context = mask[:, -1].sum(-1) - NUM_NEW
        assert np.all(read_context >= 1)
        if method in ("quest", "double_sparsity", "streaming_llm"):
            unit = QUEST_PAGE if method == "quest" else 1
            allowed = np.ceil(value * np.ceil(context / unit)) * unit
            assert np.all(read_context <= allowed)
    for layer in (0, 1):  # dense layers read the whole context
        np.testing.assert_array_equal(info.kv_read[layer], context + NUM_NEW)


def test_streaming_llm_keeps_sinks_and_the_recent_window(factory, step_inputs):
    _, inputs, _ = step_inputs
    plan = factory.selector("streaming_llm", 0.25).plan(inputs)
    context = np.asarray(inputs.context_lengths)
    mask = np.asarray(
        pallas_kernels.selection_mask(
            plan.block_indices[2], plan.block_counts[2], inputs.context_lengths, 1, SIZE, 1
        )
    )[:, 0]
    for row, length in enumerate(context):
        keep = int(np.ceil(0.25 * length))
        expected = set(range(4)) | set(range(length - (keep - 4), length + 1))
        assert set(np.flatnonzero(mask[row])) == expected


def test_specattn_sinks_are_always_read(factory, step_inputs):
    _, inputs, _ = step_inputs
    selector = factory.selector("specattn", 0.3)
    plan = dataclasses.replace(selector, sinks=8).plan(inputs)
    for layer in (2, 3):
        mask = np.asarray(
            pallas_kernels.selection_mask(
                plan.block_indices[layer], plan.block_counts[layer], inputs.context_lengths,
                1, SIZE, 1,
            )
        )  # fmt: skip
        assert mask[:, 0, :8].all()


def _positions_read(plan, layer: int, context_lengths) -> np.ndarray:
    """bool[B, S]: the context positions (and first new token) a layer's first query reads."""
    indices, counts = plan.block_indices[layer], plan.block_counts[layer]
    mask = pallas_kernels.selection_mask(indices, counts, context_lengths, 1, SIZE, 1)
    return np.array(mask[:, 0])


def test_specattn_history_adds_the_verifiers_last_top_p_set(factory, step_inputs):
    """Each sparse layer reads the draft's selection plus the top-p set (by sorting) of its
    own attention in the last verify; before any verify (all zero), the draft's alone."""
    _, inputs, _ = step_inputs
    context = np.asarray(inputs.context_lengths)
    draft_only = factory.selector("specattn", 0.8).plan(inputs)
    history = factory.selector("specattn_history", 0.8)
    plan = history.plan(inputs)
    assert history.verifier_layers == (2, 3)
    for layer in (2, 3):
        last = np.asarray(inputs.verifier_attention[layer - 2])
        expected = _positions_read(draft_only, layer, inputs.context_lengths)
        for row, length in enumerate(context):
            expected[row] |= top_p_positions(last[row], 0.8, length)
        np.testing.assert_array_equal(
            _positions_read(plan, layer, inputs.context_lengths), expected
        )
    first = dataclasses.replace(
        inputs, verifier_attention=jnp.zeros_like(inputs.verifier_attention)
    )
    first_plan = history.plan(first)
    for layer in (2, 3):
        np.testing.assert_array_equal(
            _positions_read(first_plan, layer, inputs.context_lengths),
            _positions_read(draft_only, layer, inputs.context_lengths),
        )


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(7).integers(0, 128, (3, 96)).astype(np.int32)


def _assert_same_perplexity(row: dict, dense: dict) -> None:
    """Full selections read exactly what dense attention reads, and score the same. The
    top-k searches of Quest and Double Sparsity, run inside each layer, change how XLA's CPU
    compiler fuses the surrounding model, which moves the last bits of some logits (7e-9
    relative in perplexity here, 1.2e-7 on CI's machine: the fusion depends on the CPU), so
    those two are held to 1e-6 instead of bit equality; the others are bit-exact."""
    assert row["kv_reduction"] == 0.0
    if row["method"] in ("quest", "double_sparsity"):
        assert row["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6, abs=0)
    else:
        assert row["perplexity"] == dense["perplexity"]


def test_full_budget_equals_dense_perplexity(factory, windows):
    protocol = PerplexityProtocol(window=96, prefix=48, gamma=3, batch_size=2)
    dense = decode_time_perplexity(factory.draft, factory.verifier, windows, protocol)
    assert dense["tokens"] == 3 * protocol.scored_tokens
    for method in ("specattn", "specattn_history", "oracle", "quest", "double_sparsity",
                   "streaming_llm"):  # fmt: skip
        full = decode_time_perplexity(
            factory.draft, factory.verifier, windows, protocol, factory.selector(method, 1.0)
        )
        _assert_same_perplexity({"method": method, **full}, dense)


def test_protocol_hands_each_verify_the_last_ones_attention(factory, windows):
    """The verifier's attention in each verify reaches the next selection: at the same p,
    specattn_history reads more than SpecAttn (its set adds to the draft's), and with every
    record held at zero (before any verify) it reads exactly what SpecAttn reads."""
    protocol = PerplexityProtocol(window=96, prefix=48, gamma=3, batch_size=3)

    def run(method):
        selector = factory.selector(method, 0.5)
        return decode_time_perplexity(factory.draft, factory.verifier, windows, protocol, selector)

    draft_only, history = run("specattn"), run("specattn_history")
    assert history["kv_reduction"] < draft_only["kv_reduction"] - 0.02
    with pytest.MonkeyPatch.context() as patch:  # every verify sees an all-zero record
        patch.setattr(SpecAttnSelector, "_history_blocks", _no_history_blocks)
        jax.clear_caches()
        forgetful = run("specattn_history")
    jax.clear_caches()
    assert forgetful["kv_reduction"] == draft_only["kv_reduction"]
    assert forgetful["perplexity"] == draft_only["perplexity"]


def _no_history_blocks(self, inputs, num):
    zero = dataclasses.replace(inputs, verifier_attention=jnp.zeros_like(inputs.verifier_attention))
    return ORIGINAL_HISTORY_BLOCKS(self, zero, num)


ORIGINAL_HISTORY_BLOCKS = SpecAttnSelector._history_blocks


def test_protocol_scores_the_same_tokens_as_a_plain_forward(factory, windows):
    """Dense decode-time perplexity equals the teacher-forced perplexity of one forward over
    the window, restricted to the scored positions."""
    protocol = PerplexityProtocol(window=96, prefix=48, gamma=3, batch_size=3)
    dense = decode_time_perplexity(factory.draft, factory.verifier, windows, protocol)
    verifier = factory.verifier
    logits, _, _ = verifier(jnp.asarray(windows), verifier.init_cache(3, 96))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = windows[:, 1:]
    nll = -np.take_along_axis(np.asarray(log_probs[:, :-1]), targets[..., None], -1)[..., 0]
    scored = nll[:, protocol.prefix - 1 : protocol.prefix - 1 + protocol.scored_tokens]
    assert dense["nll"] == pytest.approx(scored.mean(), rel=1e-5)


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_sweep_runs_end_to_end(tmp_path):
    """The sweep runs as users run it: a script, in its own interpreter."""
    script = BENCHMARKS / "ppl_vs_kv.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out-dir", str(tmp_path)], check=True)
    report = json.loads((tmp_path / "ppl_vs_kv.json").read_text())
    rows = report["rows"]
    dense = rows[0]
    assert dense["method"] == "dense"
    for row in rows:
        if row["value"] == 1.0:
            _assert_same_perplexity(row, dense)
        elif row["method"] != "dense":
            assert row["kv_reduction"] > 0
    assert "| specattn (p=0.9) |" in (tmp_path / "ppl_vs_kv.md").read_text()
    assert (tmp_path / "ppl_vs_kv.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "ppl_vs_kv.partial.json").exists()


def test_a_sweep_scores_the_split_it_is_given(monkeypatch):
    """--split validation scores validation books (for tuning); test is the default."""
    sweep = _benchmark_script("ppl_vs_kv")

    class Loaded(Exception):
        pass

    def load_split_texts(split, data_dir):
        raise Loaded(split)

    monkeypatch.setattr(sweep, "load_split_texts", load_split_texts)
    for argv, split in (([], "test"), (["--split", "validation"], "validation")):
        with pytest.raises(Loaded, match=split):
            sweep.main(["--quick", *argv])


def test_a_sweep_hands_over_its_rows_as_it_goes(monkeypatch):
    """`on_row` sees every row as soon as it is measured, so a run cut short keeps them."""
    import specattn_jax.eval.report as report

    perplexities = iter([10.0, 12.0, 11.0])
    monkeypatch.setattr(
        report,
        "decode_time_perplexity",
        lambda *args, **kwargs: {"perplexity": next(perplexities), "kv_reduction": 0.5},
    )
    factory = type("Factory", (), {"draft": None, "verifier": None})()
    factory.selector = lambda method, value: None
    seen = []
    rows = report.compare_methods(
        factory, None, None, [("quest", 0.3), ("oracle", 0.9)], on_row=seen.append
    )
    assert [[row["method"] for row in rows_so_far] for rows_so_far in seen] == [
        ["dense"], ["dense", "quest"], ["dense", "quest", "oracle"]
    ]  # fmt: skip
    assert seen[-1] == rows and rows[1]["relative_increase"] == pytest.approx(0.2)


def _benchmark_script(name: str):
    """A script of benchmarks/ as a module (they are not an installed package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_runs_a_chosen_subset_of_methods():
    """A long sweep is split over several runs by --methods; a wrong name is refused."""
    sweep = _benchmark_script("ppl_vs_kv")
    rows = sweep.settings((0.9,), (0.5,), (0.2, 0.3), ("quest", "oracle"))
    assert rows == [("oracle", 0.9), ("quest", 0.2), ("quest", 0.3)]
    assert len(sweep.settings((0.9,), (0.5,), (0.2,), history_p_values=(0.8,))) == 7
    with pytest.raises(SystemExit):
        sweep.main(["--methods", "quest,nonsense"])


def _report(rows: list[tuple[str, float | None, float]], **fields) -> dict:
    """A sweep report as ppl_vs_kv.py writes it, with (method, value, perplexity) rows."""
    protocol = {"caption": "c", "verifier": "v", "draft": "d", "window": 64, "prefix": 32}
    protocol |= {"gamma": 4, "granularity": 1, "dense_layers": 2, "windows": 2, "device": "cpu"}
    return {
        **protocol,
        "seconds": 1.0,
        **fields,
        "rows": [
            {
                "method": m,
                "value": v,
                "perplexity": ppl,
                "kv_reduction": 0.0 if v is None else 1 - v,
                "increase": ppl - rows[0][2],
                "relative_increase": ppl / rows[0][2] - 1,
            }
            for m, v, ppl in rows
        ],  # fmt: skip
    }


def test_split_sweeps_merge_into_one_report(tmp_path, capsys):
    """Runs that split a sweep join in table order, dense once; runs of another protocol,
    another dense result or a repeated setting are refused with one error."""
    sweep = _benchmark_script("ppl_vs_kv")
    first = _report([("dense", None, 10.0), ("quest", 0.3, 12.0), ("specattn", 0.9, 11.0)])
    second = _report([("dense", None, 10.0), ("specattn", 0.8, 11.5), ("oracle", 0.9, 10.1)])
    files = []
    for index, report in enumerate((first, second)):
        files.append(tmp_path / f"run{index}.json")
        files[-1].write_text(json.dumps(report))
    out = tmp_path / "merged"
    assert sweep.main(["--merge", *map(str, files), "--out-dir", str(out)]) == 0
    merged = json.loads((out / "ppl_vs_kv.json").read_text())
    order = [(row["method"], row["value"]) for row in merged["rows"]]
    assert order == [
        ("dense", None), ("specattn", 0.8), ("specattn", 0.9), ("oracle", 0.9), ("quest", 0.3)
    ]  # fmt: skip
    assert merged["seconds"] == 2.0 and merged["window"] == 64
    assert "| specattn (p=0.8) | 11.500 |" in (out / "ppl_vs_kv.md").read_text()

    with pytest.raises(SpecAttnError, match="run 1 differs from run 0 in window"):
        merge_reports([first, {**second, "window": 128}])
    with pytest.raises(SpecAttnError, match="run 1 has another dense row"):
        merge_reports([first, _report([("dense", None, 10.5), ("oracle", 0.9, 10.6)])])
    with pytest.raises(SpecAttnError, match=r"once: \[\('quest', 0.3\), \('specattn', 0.9\)\]"):
        merge_reports([first, first])


def test_sweeps_are_drawn_side_by_side(tmp_path):
    """--compare draws one panel per label; a panel joining two runs takes the second's
    methods only where the first ran none, or those it names."""
    sweep = _benchmark_script("ppl_vs_kv")
    draft_run = tmp_path / "draft.json"
    draft_run.write_text(json.dumps(_report([("dense", None, 10.0), ("specattn", 0.9, 11.0)])))
    baselines = tmp_path / "baselines.json"
    baselines.write_text(
        json.dumps(_report([("dense", None, 10.0), ("specattn", 0.8, 30.0), ("quest", 0.3, 12.0)]))
    )
    joined = sweep.panel_rows(f"{draft_run}+{baselines}")
    assert [(row["method"], row["value"]) for row in joined] == [
        ("dense", None), ("specattn", 0.9), ("quest", 0.3)
    ]  # fmt: skip
    chosen = sweep.panel_rows(f"{draft_run}+{baselines}:specattn")  # named: taken as well
    assert [(row["method"], row["value"]) for row in chosen] == [
        ("dense", None), ("specattn", 0.9), ("specattn", 0.8)
    ]  # fmt: skip
    plot = tmp_path / "pairs.png"
    argv = ["--compare", f"one={draft_run}", f"joined={draft_run}+{baselines}", "--plot", str(plot)]
    assert sweep.main(argv) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        sweep.main(["--compare", f"one={draft_run}"])


def test_attention_recall_sets():
    """The diagnostic's top-p set is the fewest entries reaching p (ties by position are
    irrelevant here: distinct values), and its top-k set the k largest, row by row."""
    recall = _benchmark_script("attention_recall")
    scores = np.array([[0.05, 0.5, 0.1, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    np.testing.assert_array_equal(
        recall.top_p_mask(scores, 0.8),
        [[False, True, False, True, False], [True, True, True, True, False]],
    )
    np.testing.assert_array_equal(recall.top_p_mask(scores[:1], 0.85)[0], [0, 1, 1, 1, 0])
    ranks = recall.descending_ranks(scores[:1])
    np.testing.assert_array_equal(
        recall.top_k_mask(ranks, np.array([2]))[0], [False, True, False, True, False]
    )
