"""Tensor and data parallelism on CPU devices (conftest asks XLA for 4 host devices): sharded
generation returns exactly the unsharded tokens, the compiled step never gathers a KV cache,
parameters land sharded as they load, and bad meshes are clear errors."""

import re

import jax
import numpy as np
import pytest

from specattn_jax import sharding
from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import calibrate
from specattn_jax.loading import load_pretrained
from specattn_jax.speculative import SpecConfig, _generate, _setup, generate
from specattn_jax.testing import perturbed_copy, tiny_llama

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the",
    "Tom had a big red ball. He",
    "The sun was hot and the birds sang. A little dog ran to the",
    "One day, a cat",
]
MESHES = ["model=2", "model=4", "data=2,model=2"]

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 4, reason="needs 4 devices (tests/conftest.py asks XLA for 4 on CPU)"
)


@pytest.fixture(scope="module")
def pair(stories260k_dir):
    """stories260K (8 query heads, 4 KV heads) as verifier, a noisy copy as draft."""
    verifier, tokenizer = load_pretrained(stories260k_dir / "stories260K.bin")
    draft = perturbed_copy(verifier)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    layer_map = calibrate(draft, verifier, [np.array(p) for p in prompts])
    return draft, verifier, prompts, layer_map


def _configs(layer_map):
    return {
        "dense": SpecConfig(gamma=3),
        "specattn": SpecConfig(gamma=3, attn_p=0.8, granularity=16, layer_map=layer_map),
    }


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("decoder", ["dense", "specattn"])
def test_sharded_generation_returns_the_unsharded_tokens(pair, mesh_spec, decoder):
    draft, verifier, prompts, layer_map = pair
    config = _configs(layer_map)[decoder]
    expected = generate(draft, verifier, prompts, config, max_new_tokens=24)
    mesh = sharding.make_mesh(mesh_spec)
    got = generate(draft, verifier, prompts, config, max_new_tokens=24, mesh=mesh)
    assert got.tokens == expected.tokens
    assert got.stats["accepted"] == expected.stats["accepted"]
    assert got.stats["kv_reduction"] == pytest.approx(expected.stats["kv_reduction"])
    if decoder == "specattn":
        assert got.stats["kv_reduction"] > 0


def test_sharded_autoregressive_returns_the_unsharded_tokens(pair):
    _, verifier, prompts, _ = pair
    expected = generate_autoregressive(verifier, prompts, max_new_tokens=16)
    mesh = sharding.make_mesh("data=2,model=2")
    got = generate_autoregressive(verifier, prompts, max_new_tokens=16, mesh=mesh)
    assert got.tokens == expected.tokens


def _collectives(hlo_text: str, op: str) -> list[str]:
    return [line for line in hlo_text.splitlines() if re.search(rf"= \S+ {op}(-start)?\(", line)]


@pytest.mark.parametrize("decoder", ["dense", "specattn"])
def test_compiled_step_never_gathers_the_kv_cache(pair, decoder):
    """The whole jitted generation (prefill + while_loop of spec_step) on model=2 x data=2:
    no all-gather produces an array with the cache's position axis, and the verifier's cache
    stays split by KV head in the output."""
    draft, verifier, prompts, layer_map = pair
    mesh = sharding.make_mesh("data=2,model=2")
    config = _configs(layer_map)[decoder]
    cache_size = 128
    models, args, eos_id, _ = _setup(
        draft, verifier, prompts, config, 24, cache_size, None, "config", None, mesh
    )
    compiled = _generate.lower(models, *args, 24, eos_id, config.gamma, config.backend).compile()
    hlo = compiled.as_text()
    gathers = _collectives(hlo, "all-gather")
    kv = verifier.config
    for line in gathers:
        shape = re.search(r"= \w+\[([\d,]*)\]", line)
        dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
        assert cache_size not in dims or kv.head_dim not in dims, line
    assert _collectives(hlo, "all-reduce"), "tensor parallelism must all-reduce o/down proj"
    verifier_cache = args[3][1]
    assert verifier_cache.k[0].sharding.spec == sharding.TENSOR_PARALLEL.spec(sharding.CACHE_AXES)


def test_parameters_are_placed_sharded_as_they_load(tmp_path):
    from convert.hf import save_hf_model

    model = tiny_llama(num_kv_heads=2)
    save_hf_model(model, tmp_path)
    mesh = sharding.make_mesh("model=2")
    placed, _ = sharding.load_sharded(tmp_path, mesh)
    q_proj = placed.layers[0].self_attn.q_proj[...]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert {s.data.shape for s in q_proj.addressable_shards} == {(32, 2, 8)}
    down = placed.layers[0].mlp.down_proj[...]
    assert down.sharding.spec == jax.sharding.PartitionSpec("model", None)
    np.testing.assert_array_equal(
        np.asarray(q_proj), np.asarray(model.layers[0].self_attn.q_proj[...])
    )
    draft = sharding.replicate_model(model, mesh)
    assert draft.layers[0].self_attn.q_proj[...].sharding.is_fully_replicated


def test_mesh_that_does_not_divide_the_kv_heads_is_an_error():
    verifier = tiny_llama(num_kv_heads=2)
    draft = tiny_llama(seed=1, num_kv_heads=2)
    with pytest.raises(SpecAttnError, match="model=4 does not divide the verifier's 2 KV heads"):
        generate(draft, verifier, [[1, 5, 7]], max_new_tokens=4, mesh=sharding.make_mesh("model=4"))


def test_mesh_that_does_not_divide_the_batch_is_an_error():
    verifier = tiny_llama(num_kv_heads=2)
    with pytest.raises(SpecAttnError, match="data=2 does not divide the batch of 3"):
        generate_autoregressive(
            verifier, [[1, 2], [1, 3], [1, 4]], max_new_tokens=2, mesh=sharding.make_mesh("data=2")
        )


def test_more_devices_than_present_is_an_error():
    count = len(jax.devices())
    with pytest.raises(SpecAttnError, match=f"needs {2 * count} devices, but only {count}"):
        sharding.make_mesh(f"model={2 * count}")


@pytest.mark.parametrize(
    "spec, message",
    [("model", "is not axis=size"), ("tensor=2", "unknown axis"), ("model=0", "at least 1")],
)
def test_malformed_mesh_specs_are_errors(spec, message):
    with pytest.raises(SpecAttnError, match=message):
        sharding.parse_mesh(spec)


def test_unsharded_model_has_no_attention_mesh():
    model = tiny_llama()
    assert sharding.attention_mesh(model) is None
    assert sharding.attention_mesh(sharding.shard_model(model, sharding.make_mesh("model=2")))
