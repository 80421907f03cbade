"""Long contexts end to end at real model size: prompts of Gutenberg test text prefilled
through the library, then decoded, against HF transformers on the same GPU in the same run.

Models have the shapes of real checkpoints and random bf16 weights: a Llama-2-7B-shaped
verifier (32 heads, MHA) with a TinyLlama-1.1B-shaped draft, and a Llama-3-8B-shaped one
(32/8 heads, vocab 128256) with a Llama-3.2-1B-shaped draft (16 layers, 32/8 heads, head
dim 64). The prompts are test-book text tokenized by the bundled tokenizer (ids < 8192, valid
in both vocabularies).

Sections (`--sections`, each a table and a JSON part):
  prefill  time to first token: `generate`'s own prefill-and-first-token program, whole or in
           chunks, against `LlamaForCausalLM` (sdpa) on the same prompt, and peak memory;
  decode   autoregressive decoding of `--new-tokens` tokens after the prefill, timed per
           token as `generate`'s decode loop from a prefilled state less the same stopped at
           half the tokens (`time_generate`), against its byte limit (weights plus live KV
           per token over copy bandwidth) and HF's `generate` with a static cache (a whole
           call less one stopped at half: its prefill is in both);
  speculative  autoregressive, dense speculative and SpecAttn decoding end to end (one jitted
           `generate` each; both pairs at batch 1, the 7B pair also in a ragged batch of
           4), their step times, peak memory and the split of a step (draft, select,
           verify, accept, each timed alone where `generate` ended), and tokens/s derived
           at each measured pair's tokens/step (`--tokens-per-step-from`: the bundled pair,
           a real pair), SpecAttn at a p that keeps the fraction of the context it kept
           there;
  matmul   the projections of one layer at M = 1..9 rows, as three (q, k, v) or two (gate,
           up) matmuls and as one fused matmul, against their bytes at copy bandwidth.

    python benchmarks/bench_longctx.py --out longctx.json
        [--sections prefill,decode,speculative,matmul] [--tokens-per-step-from F.json ...]
        [--contexts 4096,16384,32768] [--gqa-contexts 131072] [--spec-contexts 32768]
        [--gqa-spec-contexts 32768,131072] [--budget SECONDS] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import _timing
import jax
import jax.numpy as jnp
from bench_generate import LLAMA2_7B, TINYLLAMA_1B, shrunk
from flax import nnx

from specattn_jax.config import LlamaConfig
from specattn_jax.model import Llama, linear
from specattn_jax.selection import SelectionInputs, SpecAttnSelector
from specattn_jax.speculative import (
    Pair,
    SpecConfig,
    SpecState,
    _generate,
    _jit_decode_loop,
    _jit_prefill,
    _merge,
    _Run,
    _setup,
    draft_tokens,
    spec_stats,
)

LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
    torch_dtype="bfloat16", max_position_embeddings=131072 + 1024,
)  # fmt: skip
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}


class Budget:
    """Seconds left for the whole run: a section that would start past it is skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


@functools.cache
def _test_book_ids(data_dir: str | None) -> tuple[int, ...]:
    """Every test book tokenized by the bundled tokenizer, joined in order (read once)."""
    from specattn_jax.data import load_split_texts
    from specattn_jax.loading import ASSETS, load_tokenizer

    tokenizer = load_tokenizer(ASSETS / "verifier")
    ids: list[int] = []
    for text in load_split_texts("test", data_dir):
        ids += tokenizer(text)["input_ids"]
    return tuple(ids)


def prompt_ids(length: int, data_dir: str | None, vocab_size: int) -> list[int]:
    """`length` token ids of test-book text (the bundled tokenizer), books joined in order
    (taken modulo the vocabulary for the toy shapes of `--tiny`)."""
    ids = _test_book_ids(data_dir)
    if len(ids) < length:
        raise SystemExit(f"the test books hold {len(ids)} tokens, fewer than {length}")
    return [i % vocab_size for i in ids[:length]]


def wall_median(fn, *, repeats: int, prepare=tuple, warm_up: bool = True) -> float:
    """Median wall seconds of `fn(*prepare())` (which blocks until its result is ready),
    after a warm-up call that compiles (unless `warm_up` is False: compiled already);
    `prepare` (untimed) makes fresh arguments each call."""
    if warm_up:
        fn(*prepare())
    times = []
    for _ in range(repeats):
        args = prepare()
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def random_model(config: LlamaConfig, seed: int) -> Llama:
    return Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))


# Prefill.


def time_to_first_token(model, prompt, *, chunk: int | None, repeats: int) -> float:
    """Median seconds of `generate`'s prefill-and-first-token program (`_jit_prefill`) on one
    prompt, caches fresh each call (set-up excluded)."""

    def setup():
        return (_setup(None, model, [prompt], SpecConfig(), 1, *[None] * 5, chunk),)

    def run(setup):
        jax.block_until_ready(_jit_prefill(*setup.prefill_args).progress.output)

    return wall_median(run, repeats=repeats, prepare=setup)


@contextlib.contextmanager
def hf_model(config: LlamaConfig):
    """A random bf16 `LlamaForCausalLM` of this shape on the GPU (sdpa attention)."""
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_hf(), attn_implementation="sdpa")
    hf_config.torch_dtype = torch.bfloat16
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = transformers.LlamaForCausalLM(hf_config).eval()
        torch.set_default_dtype(torch.float32)
    try:
        yield model
    finally:
        del model
        torch.cuda.empty_cache()


def hf_prefill_time(model, prompt, *, repeats: int) -> float:
    import torch

    ids = torch.tensor([prompt], device="cuda")

    def run():
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()

    return wall_median(run, repeats=repeats)


def bench_prefill(args, budget: Budget, report: dict, save) -> None:
    rows = report.setdefault("prefill", [])
    plan = [("llama2-7b", c) for c in args.contexts] + [("llama3-8b", c) for c in args.gqa_contexts]
    for shape, context in plan:
        if budget.left() < 60:
            rows.append({"shape": shape, "context": context, "skipped": "out of time"})
            continue
        config = args.shape(SHAPES[shape])
        prompt = prompt_ids(context, args.data_dir, config.vocab_size)
        model = random_model(config, 0)
        row = {"shape": shape, "context": context}
        repeats = 1 if context > 32768 else args.repeats
        for name, chunk in (("whole", None), (f"chunks_{args.chunk}", args.chunk)):
            if chunk is not None and not 0 < chunk < context:
                continue
            try:
                row[f"ttft_{name}_s"] = time_to_first_token(
                    model, prompt, chunk=chunk, repeats=repeats
                )
            except Exception as error:  # noqa: BLE001 (a failed run is reported, not fatal)
                row[f"ttft_{name}_error"] = f"{type(error).__name__}: {error}"[:400]
        row["jax_peak_gb_so_far"] = peak_gb()
        del model
        rows.append(row)
        save(report)
        if "prefill" in args.hf:
            try:
                import torch

                torch.cuda.reset_peak_memory_stats()
                with hf_model(config) as hf:
                    row["hf_sdpa_prefill_s"] = hf_prefill_time(hf, prompt, repeats=repeats)
                row["hf_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as error:  # noqa: BLE001
                row["hf_error"] = f"{type(error).__name__}: {error}"[:400]
        print(f"  prefill {row}", file=sys.stderr)
        save(report)


# Decode.


def byte_limit_s(config: LlamaConfig, context: int, bandwidth: float) -> float:
    """Seconds per autoregressive token to move the weights and the live KV once at
    `bandwidth`, the device-to-device copy rate (bytes read + written per second)."""
    weights = (
        config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        + config.num_hidden_layers
        * (
            config.hidden_size * config.head_dim
            * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
            + 3 * config.hidden_size * config.intermediate_size
        )
    ) * 2  # fmt: skip
    kv = 2 * config.num_hidden_layers * context * config.num_key_value_heads * config.head_dim * 2
    return (weights + kv) / bandwidth


def time_generate(
    draft, verifier, prompts, config, new_tokens: int, repeats: int
) -> tuple[dict, SpecState, _Run]:
    """Wall seconds of one jitted `generate` (prefill, then `new_tokens` greedy tokens per
    prompt, no EOS), and the time of a step: `generate`'s decode loop alone, from one
    prefilled state (copied for each call), run for all the tokens and stopped at half of
    them (a smaller token budget, which is traced); their difference over the steps between
    them is a step, with the loop's fixed costs cancelled and no prefill in either (at 128K,
    a prefill's run-to-run noise swamps the steps).

    Returns (the timings with the run's statistics, the full loop's final state, the
    `_Run`, whose caches are spent)."""
    run = _setup(draft, verifier, prompts, config, new_tokens, *[None] * 5)

    def fresh_caches():  # `generate` donates its caches; run.caches stay for the prefill
        args = run.prefill_args
        return ((*args[:4], jax.tree.map(jnp.copy, run.caches), *args[5:]),)

    def whole(args):
        jax.block_until_ready(_generate(*args, run.selector).progress.output)

    generate_s = wall_median(whole, repeats=repeats, prepare=fresh_caches)
    prefilled = _jit_prefill(*run.prefill_args)
    last = {}

    def loop_from_prefill(budget: int):  # a copy: the loop donates its state
        last.clear()  # the last call's final state: one cache fewer held (32K fits an H100)
        state = jax.tree.map(jnp.copy, prefilled)
        budgets = jnp.full_like(state.progress.budgets, budget)
        progress = dataclasses.replace(state.progress, budgets=budgets)
        return (dataclasses.replace(state, progress=progress),)

    def loop(state):
        final = _jit_decode_loop(run.decoder, run.params, run.rule, run.selector, state,
                                 run.max_new)  # fmt: skip
        jax.block_until_ready(final.progress.output)
        last["state"] = final

    half = wall_median(loop, repeats=repeats, prepare=lambda: loop_from_prefill(new_tokens // 2))
    half_steps = int(last["state"].step)
    total = wall_median(loop, repeats=repeats, prepare=lambda: loop_from_prefill(new_tokens),
                        warm_up=False)  # fmt: skip
    stats = spec_stats(last["state"], **run.stats_context)
    assert stats["tokens"] == new_tokens * len(prompts), stats["tokens"]
    timing = {
        "generate_s": generate_s,
        "loop_s": total,
        "half_loop_s": half,
        "steps": stats["steps"],
        "step_ms": 1e3 * (total - half) / (stats["steps"] - half_steps),
        "tokens_per_s_wall": stats["tokens"] / generate_s,
        "tokens_per_step": stats["tokens_per_step"],
        "kv_reduction": stats["kv_reduction"],
    }
    return timing, last["state"], run


def hf_decode(model, prompt, new_tokens: int) -> dict:
    """HF `generate` with a static cache, greedy, exactly `new_tokens` tokens, against the
    same stopped at half the tokens: wall seconds of both, and the difference per token (its
    prefill, in both, cancels)."""
    import torch

    ids = torch.tensor([prompt], device="cuda")

    def run(count):
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                cache_implementation="static", pad_token_id=0,
            )  # fmt: skip
        torch.cuda.synchronize()
        return out

    def timed(count):
        run(count)  # warm-up (and compile, where transformers compiles a static cache)
        start = time.perf_counter()
        run(count)
        return time.perf_counter() - start

    total, half = timed(new_tokens), timed(new_tokens // 2)
    return {
        "hf_generate_s": total,
        "hf_half_generate_s": half,
        "hf_decode_ms_per_token": 1e3 * (total - half) / (new_tokens - new_tokens // 2),
    }


def bench_decode(args, budget: Budget, report: dict, save) -> None:
    rows = report.setdefault("decode", [])
    bandwidth = report["copy_bandwidth"]["ceiling_Bps"]
    for context in args.decode_contexts:
        if budget.left() < 90:
            rows.append({"shape": "llama2-7b", "context": context, "skipped": "out of time"})
            continue
        config = args.shape(LLAMA2_7B)
        prompt = prompt_ids(context, args.data_dir, config.vocab_size)
        row = {"shape": "llama2-7b", "context": context, "new_tokens": args.new_tokens}
        model = random_model(config, 0)
        try:
            timing, _, _ = time_generate(
                None, model, [prompt], SpecConfig(), args.new_tokens, args.repeats
            )
            row.update(timing)
            row["decode_ms_per_token"] = row["step_ms"]
            # The timed steps are the second half: their mean context.
            limit = byte_limit_s(config, context + 3 * args.new_tokens // 4, bandwidth)
            row["byte_limit_ms"] = 1e3 * limit
            row["fraction_of_byte_limit"] = limit / (row["decode_ms_per_token"] / 1e3)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:400]
        del model
        rows.append(row)
        save(report)
        if "decode" in args.hf and budget.left() > 120:
            try:
                with hf_model(config) as hf:
                    row.update(hf_decode(hf, prompt, args.new_tokens))
            except Exception as error:  # noqa: BLE001
                row["hf_error"] = f"{type(error).__name__}: {error}"[:400]
        print(f"  decode {row}", file=sys.stderr)
        save(report)


# Speculative decoders end to end.

LLAMA32_1B = LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
    tie_word_embeddings=True, torch_dtype="bfloat16", max_position_embeddings=131072 + 1024,
)  # fmt: skip
PAIRS = {  # verifier shape: (verifier, draft)
    "llama2-7b": (LLAMA2_7B, TINYLLAMA_1B),
    "llama3-8b": (LLAMA3_8B, LLAMA32_1B),
}


# The parts of a step, each `state = part(*args, state)` for `_timing.threaded_loop_time`.
# Every part reads its state, so XLA cannot hoist it out of the timing loop.


def _draft_part(decoder, rule, layers, params, last_two, seq_lengths, key, state):
    caches, _ = state
    draft, _ = _merge(decoder, params)
    drafts = draft_tokens(
        draft, caches.draft.with_lengths(seq_lengths - 2), last_two, rule, key, decoder.gamma,
        layers,
    )  # fmt: skip
    return Pair(drafts.cache, caches.verifier), drafts


def _select_part(selector, num_layers, context_lengths, state):
    attention, plan = state
    if plan is not None:  # inside the timing loop
        attention = attention + 0.0 * plan.block_counts.sum()
    inputs = SelectionInputs(
        context_lengths=context_lengths,
        draft_attention=attention,
        num_layers=num_layers,
        cache_size=attention.shape[-1],
    )
    return attention, selector.plan(inputs)


def _verify_part(decoder, params, tokens, seq_lengths, plan, state):
    caches, _ = state
    _, verifier = _merge(decoder, params)
    cache = caches.verifier.with_lengths(seq_lengths - 1)
    logits, cache, _ = verifier(tokens, cache, plan=plan, backend=decoder.backend)
    return Pair(caches.draft, cache), logits


def _accept_part(rule, drafts, key, state):
    logits, (num_accepted, _) = state
    logits = logits + 0.0 * num_accepted.sum()
    return logits, rule.accept(drafts.tokens, drafts.logits, logits, key)


def step_split(run, state, calls: int) -> dict:
    """Milliseconds of a speculative step's parts from `state`, where `generate` of `run`'s
    prompts ended (a real prefill, then the decoded tokens): draft (with the summaries its
    selector uses), select, verify (through the plan) and accept, each `calls` times in one
    device loop (`_timing.threaded_loop_time`). Their sum leaves out the step's bookkeeping,
    which `generate` fuses with them."""
    decoder, params, rule, selector = run.decoder, run.params, run.rule, run.selector
    layers = () if selector is None else selector.draft_layers
    last_two, seq_lengths, key = state.last_two, state.seq_lengths, state.key
    num_layers = state.caches.verifier.num_layers

    def timed(name, part, args, initial):
        summary, final = _timing.threaded_loop_time(part, args, initial, iters=calls)
        times[f"{name}_ms"] = 1e3 * summary["median_s"]
        return final

    times = {}
    draft_part = functools.partial(_draft_part, decoder, rule, layers)
    draft_args = (params, last_two, seq_lengths, key)
    drafts = jax.jit(draft_part)(*draft_args, (state.caches, None))[1]  # the state's shape
    caches, drafts = timed("draft", draft_part, draft_args, (state.caches, drafts))
    plan = None
    if selector is not None:
        select = functools.partial(_select_part, selector, num_layers)
        plan = jax.jit(select)(seq_lengths - 1, (drafts.attention, None))[1]
        _, plan = timed("select", select, (seq_lengths - 1,), (drafts.attention, plan))
    tokens = jnp.concatenate([last_two[:, 1:], drafts.tokens], axis=1)
    verify = functools.partial(_verify_part, decoder)
    verify_args = (params, tokens, seq_lengths, plan)
    logits = jax.jit(verify)(*verify_args, (caches, None))[1]
    _, logits = timed("verify", verify, verify_args, (caches, logits))
    accept = functools.partial(_accept_part, rule)
    accepted = jax.jit(accept)(drafts, key, (logits, (seq_lengths, seq_lengths)))[1]
    timed("accept", accept, (drafts, key), (logits, accepted))
    return times


def _specattn_config(verifier, draft, *, attn_p: float, gamma: int, granularity: int):
    """SpecAttn at top-p `attn_p` on the mean of the gamma draft rows, verifier layer j
    mapped to draft layer j * L_draft // L (the layer map of evenly spread layers)."""
    num_layers = verifier.config.num_hidden_layers
    num_draft_layers = draft.config.num_hidden_layers
    selector = SpecAttnSelector(
        attn_p=jnp.float32(attn_p),
        mapping=tuple(j * num_draft_layers // num_layers for j in range(num_layers)),
        granularity=granularity,
        aggregate="mean",
    )
    return SpecConfig(gamma=gamma, selector=selector, granularity=granularity)


def tokens_per_step_source(path: str) -> dict:
    """A measured pair's tokens/step per decoder and SpecAttn's kept fraction, from a
    `bench_generate.py` JSON (the bundled pair) or a `draft_acceptance.py` JSON with SpecAttn
    rows (a real pair: dense rows greedy, SpecAttn the row of the smallest p)."""
    data = json.loads(Path(path).read_text())
    if "bundled" in data:
        rows = data["bundled"]["rows"]
        return {
            "label": "bundled pair",
            "file": path,
            "context": data["bundled"]["prompt_len"],
            "tokens_per_step": {name: row["tokens_per_step"] for name, row in rows.items()},
            "kept": 1 - rows["specattn"]["kv_reduction"],
        }
    sparse = [row for row in data["rows"] if row.get("attn_p")]
    if not sparse:
        raise SystemExit(f"{path}: no SpecAttn row (run draft_acceptance.py with --attn-p)")
    specattn = min(sparse, key=lambda row: row["attn_p"])
    greedy = next(row for row in data["rows"] if row["setting"] == "greedy")
    return {
        "label": "real pair",
        "file": path,
        "context": data["prompt_tokens"],
        "attn_p_there": specattn["attn_p"],
        "tokens_per_step": {
            "autoregressive": 1.0,
            "speculative": greedy["tokens_per_step"],
            "specattn": specattn["tokens_per_step"],
        },
        "kept": 1 - specattn["kv_reduction"],
    }


def speculative_decoders(args, draft, verifier, sources: list[dict]) -> dict:
    """Decoder name -> (draft or None, config, the source its derived tokens/s come from, or
    None for every source).

    A random draft attends almost uniformly. Its gamma queries pick nearly disjoint top-p
    sets, whose union (the paper's rule) is the whole context, so SpecAttn here selects on
    the mean of the gamma rows (`aggregate="mean"`, the same work): top-p then keeps about p
    of the positions, and p is set to the fraction a source's SpecAttn kept (one
    granularity-1 row per source). The kept positions are scattered, so at granularity 16
    nearly every block holds one and the read is dense: that row is SpecAttn's whole cost at
    a dense read. Each row reports the reduction it measured.
    """
    specattn = functools.partial(_specattn_config, verifier, draft, gamma=args.gamma)
    decoders = {  # most telling first: a run out of time loses the last
        "autoregressive": (None, SpecConfig(), None),
        "speculative": (draft, SpecConfig(gamma=args.gamma), None),
    }
    if not sources or args.attn_p:
        attn_p = args.attn_p or 0.97
        decoders["specattn_g1"] = (draft, specattn(attn_p=attn_p, granularity=1), None)
        if args.specattn_g16:
            decoders["specattn_g16"] = (draft, specattn(attn_p=attn_p, granularity=16), None)
        return decoders
    for source in sources:
        config = specattn(attn_p=source["kept"], granularity=1)
        decoders[f"specattn_g1 ({source['label']})"] = (draft, config, source)
    if args.specattn_g16:
        config = specattn(attn_p=sources[0]["kept"], granularity=16)
        decoders[f"specattn_g16 ({sources[0]['label']})"] = (draft, config, sources[0])
    return decoders


def bench_speculative(args, budget: Budget, report: dict, save) -> None:
    """Autoregressive, dense speculative and SpecAttn decoding of the same prompts, one
    jitted `generate` each, for both pairs of shapes. Random weights accept almost nothing,
    so a decoder's measured step time is what it costs; tokens/s at real acceptance is
    derived from the pairs of `--tokens-per-step-from` (`tokens_per_step_source`)."""
    rows = report.setdefault("speculative", [])
    sources = [tokens_per_step_source(path) for path in args.tokens_per_step_from]
    report["speculative_sources"] = sources
    cases = [("llama2-7b", context, [context]) for context in args.spec_contexts]
    if args.ragged_batch:
        cases.append(("llama2-7b", max(args.ragged_batch), args.ragged_batch))
    cases += [("llama3-8b", context, [context]) for context in args.gqa_spec_contexts]
    models = {}
    for shape, context, lengths in cases:
        if shape not in models:
            models.clear()  # free the other pair first
            verifier_config, draft_config = (args.shape(c) for c in PAIRS[shape])
            models[shape] = (random_model(verifier_config, 0), random_model(draft_config, 1))
        verifier, draft = models[shape]
        prompts = [prompt_ids(n, args.data_dir, verifier.config.vocab_size) for n in lengths]
        # Whole prompts: past the first chunk, chunked prefill reads the cache through the
        # blockwise jnp path, 57 s for 128K tokens of the 8B shape against 11 s whole on
        # an H200 (2026-12-02).
        long_prompt = max(lengths) > 32768
        repeats = 1 if long_prompt else args.repeats
        decoders = speculative_decoders(args, draft, verifier, sources)
        for name, (draft_model, config, source) in decoders.items():
            row = {"shape": shape, "decoder": name, "context": context, "prompt_lengths": lengths}
            if budget.left() < (150 if long_prompt else 90):
                rows.append({**row, "skipped": "time"})
                continue
            try:
                timing, state, run = time_generate(
                    draft_model, verifier, prompts, config, args.new_tokens, repeats
                )
                row.update(timing)
                row["jax_peak_gb_so_far"] = peak_gb()
                family = (
                    "autoregressive" if draft_model is None
                    else "specattn" if config.sparse else "speculative"
                )  # fmt: skip
                row["derived_tokens_per_s"] = {
                    other["label"]: len(prompts) * other["tokens_per_step"][family]
                    / (row["step_ms"] / 1e3)
                    for other in sources
                    if source is None or other is source
                }  # fmt: skip
                if draft_model is not None and args.split_calls:
                    row["split"] = step_split(run, state, args.split_calls)
                del state, run
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"[:400]
            rows.append(row)
            print(f"  speculative {row}", file=sys.stderr)
            save(report)


# Small-batch matmuls.


def bench_matmul(args, report: dict, save) -> None:
    """Projections of one layer at M rows: separate matmuls against one fused matmul."""
    rows = report.setdefault("matmul", [])
    bandwidth = report["copy_bandwidth"]["ceiling_Bps"]
    for name, config in (("tinyllama-1.1b", TINYLLAMA_1B), ("llama2-7b", LLAMA2_7B)):
        config = args.shape(config)
        embed, ffn = config.hidden_size, config.intermediate_size
        q_width = config.num_attention_heads * config.head_dim
        kv_width = config.num_key_value_heads * config.head_dim
        groups = {"qkv": (q_width, kv_width, kv_width), "gate_up": (ffn, ffn)}
        key = jax.random.key(0)
        for group, widths in groups.items():
            parts = [
                jax.random.normal(jax.random.fold_in(key, i), (embed, w), jnp.bfloat16)
                for i, w in enumerate(widths)
            ]
            fused = jnp.concatenate(parts, axis=1)
            weight_bytes = 2 * embed * sum(widths)
            for m in args.matmul_rows:
                x = jax.random.normal(key, (m, embed), jnp.bfloat16)
                separate = _timing.loop_time(
                    lambda x, *ws: [x @ w for w in ws], [(x, *parts)], iters=200
                )["median_s"]
                one = _timing.loop_time(lambda x, w: x @ w, [(x, fused)], iters=200)["median_s"]
                # As the model runs it (`model.linear`: one row as two, see its docstring).
                model_way = _timing.loop_time(
                    lambda x, w: linear("bte,en->btn", x[None], w), [(x, fused)], iters=200
                )["median_s"]
                limit = weight_bytes / bandwidth
                rows.append(
                    {
                        "model": name, "group": group, "rows": m,
                        "separate_us": 1e6 * separate, "fused_us": 1e6 * one,
                        "model_us": 1e6 * model_way,
                        "byte_limit_us": 1e6 * limit,
                        "separate_fraction": limit / separate, "fused_fraction": limit / one,
                    }
                )  # fmt: skip
                print(f"  matmul {rows[-1]}", file=sys.stderr)
    save(report)


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A markdown table: the first column left-aligned, the others right."""
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(report: dict) -> None:
    device = report["device"]
    print(f"\ndevice: {device}, jax {report['jax']}, copy {report['copy_tb_s']:.2f} TB/s")
    if report.get("prefill"):
        rows = []
        for r in report["prefill"]:
            whole, hf = r.get("ttft_whole_s"), r.get("hf_sdpa_prefill_s")
            chunked = next((v for k, v in r.items() if k.startswith("ttft_chunks")), None)
            ratio = f"{whole / hf:.2f}" if whole and hf else "-"
            rows.append(
                [r["shape"], str(r["context"]), _fmt(whole), _fmt(chunked), _fmt(hf), ratio,
                 _fmt(r.get("hf_peak_gb"), 1)]
            )  # fmt: skip
        _table(
            "Time to first token (s), random bf16 weights, batch 1",
            ["shape", "context", "ours, whole", "ours, chunks", "HF sdpa", "ours/HF", "HF GB"],
            rows,
        )
    if report.get("decode"):
        _table(
            "Autoregressive decode, Llama-2-7B shape, ms per token (the second half of the "
            "tokens: the decode loop from a prefilled state less one stopped at half)",
            ["context", "ours", "byte limit", "fraction", "HF static cache"],
            [
                [str(r["context"]), _fmt(r.get("decode_ms_per_token"), 2),
                 _fmt(r.get("byte_limit_ms"), 2), _fmt(r.get("fraction_of_byte_limit")),
                 _fmt(r.get("hf_decode_ms_per_token"), 2)]
                for r in report["decode"]
            ],
        )  # fmt: skip
    if report.get("speculative"):
        _table(
            "Decoders end to end, random weights (derived tokens/s: this step time at a "
            "measured pair's tokens/step, DERIVED); split: draft / select / verify / accept ms",
            ["verifier", "prompts", "decoder", "step ms", "wall tok/s", "derived tok/s",
             "KV reduction", "peak GB", "split"],
            [
                [r["shape"], ",".join(map(str, r["prompt_lengths"])), r["decoder"],
                 _fmt(r.get("step_ms"), 2), _fmt(r.get("tokens_per_s_wall"), 1),
                 _derived(r.get("derived_tokens_per_s")), _fmt(r.get("kv_reduction")),
                 _fmt(r.get("jax_peak_gb_so_far"), 1), _split(r.get("split"))]
                for r in report["speculative"]
            ],
        )  # fmt: skip
    if report.get("matmul"):
        _table(
            "Projections at M rows: microseconds, and fraction of their byte limit",
            ["model", "group", "M", "separate", "fused", "model.linear", "limit",
             "separate frac", "fused frac"],
            [
                [r["model"], r["group"], str(r["rows"]), _fmt(r["separate_us"], 1),
                 _fmt(r["fused_us"], 1), _fmt(r.get("model_us"), 1), _fmt(r["byte_limit_us"], 1),
                 _fmt(r["separate_fraction"], 2), _fmt(r["fused_fraction"], 2)]
                for r in report["matmul"]
            ],
        )  # fmt: skip


def _derived(derived: dict | None) -> str:
    if not derived:
        return "-"
    return "; ".join(f"{label} {value:.1f}" for label, value in derived.items())


def _split(split: dict | None) -> str:
    if not split:
        return "-"
    parts = ("draft", "select", "verify", "accept")
    return " / ".join(_fmt(split.get(f"{part}_ms"), 2) for part in parts)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_longctx.json")
    parser.add_argument("--sections", default="prefill,decode,speculative,matmul")
    parser.add_argument("--contexts", type=_ints, default=[4096, 16384, 32768])
    parser.add_argument("--gqa-contexts", type=_ints, default=[131072])
    parser.add_argument("--decode-contexts", type=_ints, default=[4096, 32768])
    parser.add_argument("--matmul-rows", type=_ints, default=[1, 2, 5, 9])
    parser.add_argument("--chunk", type=int, default=8192, help="0: no chunked prefill run")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--spec-contexts", type=_ints, default=[32768])
    parser.add_argument(
        "--gqa-spec-contexts", type=_ints, default=[32768, 131072],
        help="contexts of the Llama-3-8B / Llama-3.2-1B pair in the speculative section",
    )  # fmt: skip
    parser.add_argument(
        "--split-calls", type=int, default=10,
        help="calls per part of the per-step split, in one device loop (0: no split)",
    )  # fmt: skip
    parser.add_argument(
        "--ragged-batch", type=_ints, default=[16384, 12288, 8192, 4096],
        help="prompt lengths of one ragged batch ('' for none)",
    )  # fmt: skip
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument(
        "--attn-p", type=float,
        help="SpecAttn's p (default: the kept fraction of each --tokens-per-step-from pair, "
        "else 0.97)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-per-step-from", action="append", default=[],
        help="a bench_generate.py JSON (the bundled pair) or a draft_acceptance.py JSON with "
        "SpecAttn rows (a real pair); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--specattn-g16", action=argparse.BooleanOptionalAction, default=True,
        help="also run SpecAttn at granularity 16 (with a random draft, a dense read)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the run")
    parser.add_argument(
        "--hf", default="prefill,decode", help="sections that also run HF ('' for none)"
    )
    parser.add_argument("--data-dir", default=os.environ.get("SPECATTN_DATA_DIR"))
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a CPU smoke run")
    args = parser.parse_args(argv)
    args.shape = shrunk if args.tiny else (lambda config: config)
    budget = Budget(args.budget)
    bandwidth = _timing.copy_bandwidth()
    report = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "copy_bandwidth": bandwidth,
        "copy_tb_s": bandwidth["ceiling_Bps"] / 1e12,
        "shapes": {name: dataclasses.asdict(config) for name, config in SHAPES.items()},
        "drafts": {name: dataclasses.asdict(draft) for name, (_, draft) in PAIRS.items()},
        "weights": "random bf16 (Llama(config, rngs=nnx.Rngs(0)))",
        "prompts": "Gutenberg test books, bundled tokenizer",
    }

    def save(part: dict) -> None:
        Path(args.out).write_text(json.dumps(part, indent=1))

    sections = {
        "matmul": lambda: bench_matmul(args, report, save),
        "prefill": lambda: bench_prefill(args, budget, report, save),
        "decode": lambda: bench_decode(args, budget, report, save),
        "speculative": lambda: bench_speculative(args, budget, report, save),
    }
    for name in args.sections.split(","):  # in the order given: a run out of time skips the last
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}: not one of {', '.join(sections)}")
        sections[name]()
    save(report)
    print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
