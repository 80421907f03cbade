"""The `specattn` command line: JSON output of each command on the bundled pair, the same
tokens as the API, and bad input as one `specattn: error: ...` line with exit status 2."""

import importlib.metadata
import json
import shutil

import jax
import numpy as np
import pytest

from specattn_jax.cli import _stats_line, build_parser, main
from specattn_jax.demo import default_prompt
from specattn_jax.errors import IncompatibleModelsError
from specattn_jax.layer_map import LayerMap, group_layer_map
from specattn_jax.loading import ASSETS, load_pair, load_pretrained
from specattn_jax.sampling import make_sampler
from specattn_jax.speculative import SpecConfig, generate

PROMPT = "It was late in the autumn when the old captain came back to the village."


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    """The one error line of a failed command; the run's header and notes may precede it."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("specattn: error: "), captured.err
    assert all(line.startswith(("specattn ", "note: ")) for line in lines[:-1]), captured.err
    return lines[-1]


def test_generate_speculative_json_matches_the_api(capsys):
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "12")
    verifier, tokenizer = load_pretrained("bundled:verifier")
    draft, _ = load_pretrained("bundled:draft")
    prompt = tokenizer(PROMPT)["input_ids"]
    expected = generate(draft, verifier, [prompt], SpecConfig(), max_new_tokens=12)
    assert out["tokens"] == expected.tokens[0]
    assert out["text"] == tokenizer.decode(expected.tokens[0], skip_special_tokens=True)
    assert out["stats"]["decoder"] == "speculative"
    assert 0 <= out["stats"]["acceptance_rate"] <= 1


def test_generate_autoregressive_and_specattn(capsys):
    common = ("generate", "--prompt", PROMPT, "--max-new-tokens", "10")
    plain = run_json(capsys, *common, "--draft", "none")
    assert plain["stats"]["decoder"] == "autoregressive"
    assert plain["stats"].get("acceptance_rate") is None  # nothing was drafted
    speculative = run_json(capsys, *common)
    assert speculative["tokens"] == plain["tokens"]  # greedy speculative decoding is exact
    chunked = run_json(capsys, *common, "--draft", "none", "--prefill-chunk", "4")
    assert chunked["tokens"] == plain["tokens"]
    sparse = run_json(
        capsys, *common, "--attn-p", "0.5", "--layer-map", str(ASSETS / "layer_map.json")
    )
    assert sparse["stats"]["decoder"] == "specattn"
    assert sparse["stats"]["kv_reduction"] > 0
    history = run_json(
        capsys, *common, "--attn-p", "0.5", "--history-p", "0.9",
        "--layer-map", str(ASSETS / "layer_map.json"),
    )  # fmt: skip
    assert 0 < history["stats"]["kv_reduction"] < sparse["stats"]["kv_reduction"]


def test_generate_sampling_options_match_the_api(capsys):
    options = ("--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05",
               "--repetition-penalty", "1.3", "--seed", "3")  # fmt: skip
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "12", *options)
    verifier, tokenizer = load_pretrained("bundled:verifier")
    draft, _ = load_pretrained("bundled:draft")
    sampler = make_sampler(0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.3)
    expected = generate(
        draft, verifier, [tokenizer(PROMPT)["input_ids"]], SpecConfig(), max_new_tokens=12,
        sampler=sampler, key=jax.random.key(3),
    )  # fmt: skip
    assert out["tokens"] == expected.tokens[0]
    line = run_error(capsys, "generate", "--prompt", PROMPT, "--min-p", "1.5")
    assert "min_p=1.5 must be in [0, 1]" in line


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (conftest asks for 4)")
def test_generate_on_a_mesh_returns_the_same_tokens(capsys):
    common = ("generate", "--prompt", PROMPT, "--max-new-tokens", "10")
    assert (
        run_json(capsys, *common, "--mesh", "model=2")["tokens"]
        == run_json(capsys, *common)["tokens"]
    )


def test_calibrate_and_eval_ppl(capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join([PROMPT] * 60))
    out = run_json(
        capsys, "calibrate", "--text", str(text), "--out", str(tmp_path / "map.json"),
        "--plot", str(tmp_path / "map.png"), "--seq-len", "64", "--num-sequences", "2",
    )  # fmt: skip
    assert len(out["mapping"]) == 8 and (tmp_path / "map.png").is_file()
    out = run_json(
        capsys, "eval-ppl", "--data", str(text), "--calibration-data", str(text),
        "--window", "128", "--prefix", "64", "--num-windows", "1", "--batch-size", "1",
        "--layer-map", str(tmp_path / "map.json"), "--attn-p", "0.9",
    )  # fmt: skip
    dense, specattn = out["rows"]
    assert dense["method"] == "dense" and specattn["method"] == "specattn"
    assert specattn["kv_reduction"] > 0 and dense["perplexity"] > 1
    draft_layers = load_pretrained("bundled:draft")[0].config.num_hidden_layers
    out = run_json(
        capsys, "calibrate", "--text", str(text), "--out", str(tmp_path / "groups.json"),
        "--seq-len", "64", "--num-sequences", "1", "--choose", "groups",
    )  # fmt: skip
    assert tuple(out["mapping"]) == group_layer_map(8, draft_layers)
    out = run_json(
        capsys, "calibrate", "--text", str(text), "--out", str(tmp_path / "mix.json"),
        "--seq-len", "64", "--num-sequences", "1", "--choose", "mix",
    )  # fmt: skip
    assert np.array(out["mix"]).shape == (8, draft_layers)
    assert LayerMap.load(tmp_path / "mix.json").mix == tuple(map(tuple, out["mix"]))


def test_convert_round_trip(capsys, tmp_path, stories260k_dir):
    out = run_json(
        capsys, "convert", str(stories260k_dir / "stories260K.bin"), str(tmp_path / "hf")
    )
    assert out["format"] == "hf" and (tmp_path / "hf" / "config.json").is_file()
    ids = "1,403,407,261,378"
    first = run_json(
        capsys, "generate", "--verifier", str(tmp_path / "hf"), "--draft", "none",
        "--prompt-ids", ids, "--max-new-tokens", "8",
    )  # fmt: skip
    assert first["tokens"] == [432, 383, 286, 261, 376, 298, 315, 421]  # DESIGN.md's oracle


def test_demo_json(capsys):
    out = run_json(capsys, "demo", "--prompt-tokens", "64", "--max-new-tokens", "8")
    assert set(out["rows"]) == {"autoregressive", "speculative", "specattn"}
    assert out["rows"]["speculative"]["same_as_autoregressive"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--verifier", "/nonexistent/model", "--prompt", "x"], "nonexistent"),
        (["generate", "--prompt", "x", "--attn-p", "1.5"], "attn_p=1.5 must be in (0, 1]"),
        (["generate", "--prompt", "x", "--attn-p", "0.9", "--history-p", "0"],
         "history_p=0.0 must be in (0, 1]"),
        (["generate", "--prompt", "x", "--history-p", "0.9"], "history_p adds to SpecAttn"),
        (["generate", "--prompt", "x", "--gamma", "0"], "gamma=0 must be an integer >= 1"),
        (
            ["generate", "--prompt", PROMPT, "--cache-size", "8", "--draft", "none"],
            "longer than the cache of 8 positions",
        ),
        (["generate", "--prompt", "x", "--mesh", "model=4"], "does not divide"),
        (["generate", "--prompt", "x", "--mesh", "model=64"], "needs 64 devices"),
        (["generate", "--prompt", "x", "--mesh", "tensor=2"], "unknown axis 'tensor'"),
        (["eval-ppl", "--method", "nope"], "invalid choice: 'nope'"),
        (["calibrate", "--text", "/nonexistent.txt", "--out", "m.json"], "text not found"),
        (["generate", "--prompt", "x", "--prefill-chunk", "0"], "prefill_chunk=0 must be"),
        (["generate", "--prompt-ids", "1,2,99999"], "[99999] are outside the verifier's"),
        (["generate", "--prompt-ids", "-3"], "[-3] are outside the verifier's vocabulary"),
        (["generate", "--prompt", " "], "--prompt is empty"),
        (["generate", "--prompt-ids", ""], "is not a comma-separated list"),
        (
            ["eval-ppl", "--method", "quest", "--attn-p", "0.9"],
            "--attn-p does not apply to quest: give --budget",
        ),
        (["eval-ppl", "--budget", "0.3"], "--budget does not apply to specattn: give --attn-p"),
        ([], "the following arguments are required: command"),
        (["generate", "--prompt", "x", "--stop", ""], "stop strings must be non-empty"),
        (["generate", "--prompt", "x", "--chat"], "has no chat template"),
        (["generate", "--prompt", "x", "--system", "s"], "--system needs --chat"),
        (["generate", "--prompt-ids", "1,2", "--chat"], "--chat needs --prompt"),
        (["generate"], "generate: one of the arguments --prompt --prompt-ids is required"),
    ],
    ids=[
        "missing-checkpoint", "attn-p", "history-p", "history-p-alone", "gamma",
        "prompt-too-long", "mesh-kv-heads",
        "mesh-devices", "mesh-axis", "method", "calibration-text", "prefill-chunk",
        "id-beyond-vocab", "negative-id", "empty-prompt", "empty-prompt-ids",
        "quest-with-attn-p", "specattn-with-budget", "no-command", "empty-stop",
        "chat-without-template", "system-without-chat", "chat-with-ids", "no-prompt",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert message in run_error(capsys, *argv)


def test_layer_map_for_other_models_is_refused(capsys, tmp_path, stories260k_dir):
    bundled = LayerMap.load(ASSETS / "layer_map.json")
    other = LayerMap(bundled.mapping[:-1], bundled.scores, "x", "y")
    other.save(tmp_path / "short.json")
    line = run_error(
        capsys, "generate", "--prompt", "x", "--attn-p", "0.9",
        "--layer-map", str(tmp_path / "short.json"),
    )  # fmt: skip
    assert "the layer map has 7 entries but the verifier has 8 layers" in line


def test_usage_errors_name_the_program_once(capsys):
    assert not run_error(capsys).startswith("specattn: error: specattn")


def test_errors_with_json_are_one_object_on_stderr(capsys):
    assert main(["generate", "--prompt-ids", "1,99999", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert "outside the verifier's vocabulary" in json.loads(line)["error"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("specattn 0.")


def test_runs_from_a_checkout_that_is_not_installed(monkeypatch, capsys):
    """On the GPU machine the package is a folder on PYTHONPATH, with no distribution
    metadata: every command must still parse (it once failed building the parser)."""

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr("specattn_jax.cli.distribution_version", missing)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "specattn (not installed: run from a checkout)"
    assert main(["generate", "--min-p", "1.5", "--prompt", "x"]) == 2
    assert "min_p" in capsys.readouterr().err


def test_help_shows_defaults_and_describes_every_option():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    generate_help = commands["generate"].format_help()
    assert "tokens to generate (default: 64)" in " ".join(generate_help.split())
    for name in ("demo", "generate", "calibrate", "eval-ppl", "convert"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_a_user_verifier_decodes_plainly_and_says_so(capsys, stories260k_dir):
    """No --draft: the bundled draft goes only with the bundled verifier; any other verifier
    decodes autoregressively, with one note saying so and how to add a draft."""
    verifier = str(stories260k_dir / "stories260K.bin")
    assert main(["generate", "--verifier", verifier, "--prompt", "Once upon a time",
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "has no default draft" in line]
    assert len(notes) == 1 and "--draft PATH" in notes[0]
    assert "autoregressive: 8 tokens, 7 steps" in err  # the prefill makes the first
    out = run_json(capsys, "generate", "--verifier", verifier, "--prompt-ids", "1,403,407",
                   "--max-new-tokens", "4")  # fmt: skip
    assert out["stats"]["decoder"] == "autoregressive"
    assert load_pair(verifier)[0] is None
    assert load_pair("bundled:verifier")[0] is not None


def test_a_draft_without_a_tokenizer_is_refused(tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(ASSETS / "draft", draft, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(IncompatibleModelsError, match="has no tokenizer"):
        load_pair("bundled:verifier", draft)


def test_zero_new_tokens(capsys):
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "0")
    assert out["tokens"] == [] and out["text"] == ""
    assert (out["stats"]["tokens"], out["stats"]["steps"]) == (0, 0)
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "0"]) == 0
    assert "speculative: 0 tokens, 0 steps" in capsys.readouterr().err


def test_stats_line_counts_in_the_singular():
    line = _stats_line({"decoder": "autoregressive", "tokens": 1, "steps": 1, "seconds": 0.5})
    assert line.startswith("[autoregressive: 1 token, 1 step,")


def test_header_line_and_warm_rate(capsys):
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "24", "--draft", "none"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("specattn generate: ")
    assert err[0].endswith("cpu (cpu), attention: jnp reference, dtype float32")
    assert "tokens/s after compiling" in err[-1]
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "24")
    assert out["device"].endswith("cpu (cpu)")
    assert (out["backend"], out["dtype"]) == ("jnp reference", "float32")
    assert out["stats"]["tokens_per_second"] > 0


def test_specattn_on_the_bundled_pair_uses_the_bundled_map(capsys):
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "6",
                   "--attn-p", "0.9")  # fmt: skip
    assert out["stats"]["layer_map"] == "given"


def test_missing_corpus_names_the_folder_and_the_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECATTN_DATA_DIR", str(tmp_path / "nowhere"))
    line = run_error(capsys, "calibrate", "--text", "validation", "--out", "m.json")
    assert "nowhere does not exist" in line and "SPECATTN_DATA_DIR" in line


def test_transformers_torch_notice_is_dropped_and_nothing_else():
    """The filter sits on transformers' own logger, before any of its handlers."""
    import logging

    from transformers.utils import logging as transformers_logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger = transformers_logging.get_logger("transformers")
    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning("PyTorch was not found. Models won't be available.")
        logger.warning("another warning")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["another warning"]


def test_the_demo_prompt_raises_no_length_warning(capfd):
    _, tokenizer = load_pretrained("bundled:verifier")
    text, _ = default_prompt(tokenizer, 1024)
    assert len(tokenizer(text, verbose=False)["input_ids"]) > tokenizer.model_max_length // 2
    assert "indexing errors" not in capfd.readouterr().err


def test_stop_text_ends_the_output_before_it(capsys):
    free = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "24")
    stop = free["text"].split()[3]
    out = run_json(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "24",
                   "--stop", "no such text", "--stop", stop)  # fmt: skip
    assert out["text"] == free["text"][: free["text"].index(stop)]
    assert len(out["tokens"]) < len(free["tokens"])


def test_chat_wraps_the_prompt_in_the_tokenizers_template(capsys, tmp_path):
    """A copy of the bundled verifier whose tokenizer carries a chat template; the expected
    prompt is that template rendered by hand, then tokenized."""
    verifier = tmp_path / "verifier"
    shutil.copytree(ASSETS / "verifier", verifier)
    config_path = verifier / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    out = run_json(capsys, "generate", "--verifier", str(verifier), "--draft", "bundled:draft",
                   "--chat", "--system", "Be brief.", "--prompt", "Who came back?",
                   "--max-new-tokens", "4")  # fmt: skip
    _, tokenizer = load_pretrained("bundled:verifier")
    rendered = "[system] Be brief.\n[user] Who came back?\n[assistant]"
    assert out["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert out["stats"]["decoder"] == "speculative"
