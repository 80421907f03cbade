"""The `specattn` command line: JSON output of each command on the bundled pair, the same
tokens as the API, and bad input as one `specattn: error: ...` line with exit status 2."""

import json

import jax
import pytest

from specattn_jax.cli import main
from specattn_jax.loading import ASSETS, load_pretrained
from specattn_jax.speculative import SpecConfig, generate

PROMPT = "It was late in the autumn when the old captain came back to the village."


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specattn: error: "), captured.err
    return lines[0]


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
    ],
    ids=[
        "missing-checkpoint", "attn-p", "gamma", "prompt-too-long", "mesh-kv-heads",
        "mesh-devices", "mesh-axis", "method", "calibration-text", "prefill-chunk",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert message in run_error(capsys, *argv)


def test_layer_map_for_other_models_is_refused(capsys, tmp_path, stories260k_dir):
    from specattn_jax.layer_map import LayerMap

    bundled = LayerMap.load(ASSETS / "layer_map.json")
    other = LayerMap(bundled.mapping[:-1], bundled.scores, "x", "y")
    other.save(tmp_path / "short.json")
    line = run_error(
        capsys, "generate", "--prompt", "x", "--attn-p", "0.9",
        "--layer-map", str(tmp_path / "short.json"),
    )  # fmt: skip
    assert "the layer map has 7 entries but the verifier has 8 layers" in line
