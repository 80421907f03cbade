"""`specattn demo`: the three decoders side by side on the bundled pair.

Generates the same greedy continuation of a long prompt with autoregressive decoding, dense
speculative decoding and SpecAttn, and reports for each: tokens/s (warm), acceptance rate,
tokens per step, the measured KV reduction, and whether its tokens equal autoregressive
decoding's (dense speculative decoding's always do; SpecAttn's verifier reads less, so its
tokens may drift from the dense verifier's).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from specattn_jax.data import split_books
from specattn_jax.errors import SpecAttnError
from specattn_jax.loading import default_layer_map, load_pair
from specattn_jax.model import count_params
from specattn_jax.speculative import SpecConfig, generate

FALLBACK_PROMPT = (
    "It was late in the autumn when the old captain came back to the village. The harbour was "
    "empty, the boats drawn up on the shingle, and the wind from the north had already "
    "stripped the elms along the church road. He walked slowly, for the journey had been long, "
    "and he stopped at every gate as if he expected to be known."
)


def default_prompt(tokenizer, num_tokens: int) -> tuple[str, str]:
    """(text, where it came from): an excerpt of a test book if the corpus is beside the
    checkout, else a short built-in paragraph."""
    try:
        book = split_books("test")[0]
        text = book.read()
    except SpecAttnError:
        return FALLBACK_PROMPT, "a built-in paragraph (the Gutenberg corpus is not beside us)"
    excerpt = text[len(text) // 3 : len(text) // 3 + 12 * num_tokens]
    ids = tokenizer(excerpt, verbose=False)["input_ids"][1 : num_tokens + 1]
    return tokenizer.decode(ids), f'{len(ids)} tokens from the test book "{book.title}"'


def run_demo(
    verifier_source: str,
    draft_source: str | None,
    *,
    prompt: str | None,
    prompt_tokens: int,
    max_new_tokens: int,
    gamma: int,
    attn_p: float,
    dtype,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Runs the decoders; returns a dict with the models, prompt, continuation and rows.
    `log` receives a line before each decoder compiles and runs."""
    draft, verifier, tokenizer = load_pair(verifier_source, draft_source, dtype)
    if prompt is None:
        prompt, prompt_origin = default_prompt(tokenizer, prompt_tokens)
    else:
        prompt_origin = "given"
    ids = list(tokenizer(prompt, verbose=False)["input_ids"])
    configs = {"autoregressive": None}
    if draft is not None:
        layer_map = default_layer_map(verifier_source, draft_source)
        configs["speculative"] = SpecConfig(gamma=gamma)
        configs["specattn"] = SpecConfig(gamma=gamma, attn_p=attn_p, layer_map=layer_map)
    rows, outputs = {}, {}
    for name, config in configs.items():
        log(f"{name}: compiling, then timing a warm run")
        run = lambda config=config: generate(  # noqa: E731
            None if config is None else draft, verifier, [ids], config,
            max_new_tokens=max_new_tokens, eos_id=None,
        )  # fmt: skip
        run()  # compile
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        outputs[name] = result.tokens[0]
        stats = result.stats
        rows[name] = {
            "tokens_per_s": len(result.tokens[0]) / seconds,
            "acceptance_rate": stats.get("acceptance_rate"),
            "tokens_per_step": stats.get("tokens_per_step", 1.0),
            "kv_reduction": stats.get("kv_reduction", 0.0),
            "same_as_autoregressive": result.tokens[0] == outputs["autoregressive"],
        }
    shown = "specattn" if "specattn" in outputs else "autoregressive"
    return {
        "verifier": verifier_source,
        "draft": draft_source,
        "verifier_params": count_params(verifier),
        "draft_params": count_params(draft) if draft is not None else None,
        "prompt_origin": prompt_origin,
        "prompt_tokens": len(ids),
        "prompt_tail": tokenizer.decode(ids[-60:]),
        "continuation_of": shown,
        "continuation": tokenizer.decode(outputs[shown]),
        "tokens": outputs[shown],
        "rows": rows,
    }


def format_report(report: dict) -> list[str]:
    lines = [
        f"verifier: {report['verifier']} ({report['verifier_params'] / 1e6:.1f}M parameters)",
    ]
    if report["draft"]:
        millions = report["draft_params"] / 1e6
        lines.append(f"draft:    {report['draft']} ({millions:.1f}M parameters)")
    lines += [
        f"prompt:   {report['prompt_origin']}, ending ...{report['prompt_tail']!r}",
        "",
        f"continuation ({report['continuation_of']}, greedy):",
        report["continuation"],
        "",
        "| decoder | tokens/s | acceptance | tokens/step | KV reduction | = autoregressive |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in report["rows"].items():
        acceptance = row["acceptance_rate"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:.1f} | "
            + (f"{acceptance:.1%}" if acceptance is not None else "-")
            + f" | {row['tokens_per_step']:.2f} | {row['kv_reduction']:.1%} | "
            + ("yes" if row["same_as_autoregressive"] else "no")
            + " |"
        )
    lines.append(
        "(tokens/s: warm, one run, this machine; the tiny bundled models are far from "
        "memory-bound here, see benchmarks/ for GPU numbers)"
    )
    return lines
