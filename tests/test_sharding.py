"""Tensor and data parallelism on CPU devices (conftest asks XLA for 4 host devices): sharded
generation returns exactly the unsharded tokens, the compiled step never gathers a KV cache,
parameters land sharded as they load, and bad meshes are clear errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specattn_jax import sharding
from specattn_jax.attention import attend
from specattn_jax.autoregressive import generate_autoregressive
from specattn_jax.errors import SpecAttnError
from specattn_jax.layer_map import calibrate
from specattn_jax.loading import load_pretrained, load_sharded
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


COLLECTIVE = re.compile(
    r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|"
    r"collective-broadcast)(?:-start)?\("
)


def _collectives(hlo_text: str) -> list[tuple[str, str, str]]:
    """(kind, result shape, op_name) of every collective in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            name = re.search(r'op_name="([^"]+)"', line)
            found.append((match.group(2), match.group(1), name.group(1) if name else ""))
    return found


def _dims(shape: str) -> list[int]:
    return [int(d) for d in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if d]


@pytest.mark.parametrize("decoder", ["dense", "specattn"])
def test_compiled_generation_has_exactly_the_designed_collectives(pair, decoder):
    """The whole jitted generation (prefill + while_loop of spec_step) on data=2 x model=2.

    Named by the design (sharding.py): per verifier forward, one all-reduce after o_proj
    and one after down_proj in every layer. The listed others, each justified:
      * one all-reduce per verifier forward for the embedding lookup (the table is split by
        vocabulary: each device contributes the rows it holds);
      * one all-reduce of the loop condition (are all sequences done; the batch is split);
      * two all-gathers per greedy choice (the prefill's first token, each step's
        acceptance): the argmax over vocabulary-split logits gathers each device's best
        value and index, [B / data, T, model].
    Nothing else: the draft is replicated, attention and cache writes are per device, and
    the selection runs on replicated data."""
    draft, verifier, prompts, layer_map = pair
    mesh = sharding.make_mesh("data=2,model=2")
    config = _configs(layer_map)[decoder]
    cache_size = 128
    run = _setup(draft, verifier, prompts, config, 24, cache_size, None, "config", None, mesh)
    compiled = _generate.lower(*run.prefill_args, run.selector).compile()
    collectives = _collectives(compiled.as_text())
    layers = verifier.config.num_hidden_layers
    local_batch, model_size = len(prompts) // 2, 2

    def count(kind, scope, suffix=""):
        return sum(1 for k, _, n in collectives if k == kind and scope in n and n.endswith(suffix))

    for forward in ("/prefill/", "/while/body/verify/"):
        assert count("all-reduce", forward, "bthd,hde->bte/dot_general") == layers  # o_proj
        assert count("all-reduce", forward, "/dot_general") == 2 * layers  # + down_proj
        assert count("all-reduce", forward, "_take)/gather") == 1  # embedding lookup
        assert count("all-reduce", forward) == 2 * layers + 1, forward
    assert count("all-reduce", "/while/cond/") == 1
    assert sum(k == "all-reduce" for k, _, _ in collectives) == 2 * (2 * layers + 1) + 1
    gathers = [(shape, name) for k, shape, name in collectives if k == "all-gather"]
    assert len(gathers) == 4, gathers
    for shape, name in gathers:  # argmax over the vocabulary shards
        dims = _dims(shape)
        assert name.endswith("/reduce") and dims[0] == local_batch and dims[-1] == model_size
        assert cache_size not in dims and verifier.config.head_dim not in dims
    others = [c for c in collectives if c[0] not in ("all-reduce", "all-gather")]
    assert not others, others
    cache_spec = sharding.TENSOR_PARALLEL.spec(sharding.CACHE_AXES)
    assert run.caches.verifier.k[0].sharding.spec == cache_spec


def test_parameters_are_placed_sharded_as_they_load(tmp_path):
    from specattn_jax.convert.hf import save_hf_model

    model = tiny_llama(num_kv_heads=2)
    save_hf_model(model, tmp_path)
    mesh = sharding.make_mesh("model=2")
    placed, _ = load_sharded(tmp_path, mesh)
    # The fused [E, H_kv, G + 2, D] projections split with the KV heads: each device holds
    # its KV head's query heads, key and value.
    qkv = placed.layers[0].self_attn.qkv_proj[...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "model", None, None)
    assert {s.data.shape for s in qkv.addressable_shards} == {(32, 1, 4, 8)}
    gate_up = placed.layers[0].mlp.gate_up_proj[...]
    assert gate_up.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    down = placed.layers[0].mlp.down_proj[...]
    assert down.sharding.spec == jax.sharding.PartitionSpec("model", None)
    np.testing.assert_array_equal(
        np.asarray(qkv), np.asarray(model.layers[0].self_attn.qkv_proj[...])
    )
    draft = sharding.replicate_model(model, mesh)
    assert draft.layers[0].self_attn.qkv_proj[...].sharding.is_fully_replicated


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


def test_sharding_wraps_the_model_from_outside():
    """`shard_model` places parameters and changes no module; head-parallel attention is the
    `attend` a forward is given, and it equals the unsharded forward."""
    model = tiny_llama(num_kv_heads=2)
    mesh = sharding.make_mesh("model=2")
    before = nnx.graphdef(model)
    placed = sharding.shard_model(model, mesh)
    assert nnx.graphdef(placed) == before == nnx.graphdef(model)
    assert sharding.attention_for(None) is attend
    assert sharding.attention_for(sharding.make_mesh("data=2")) is attend
    head_parallel = sharding.attention_for(mesh)
    assert head_parallel == sharding.HeadParallel(mesh)  # hashable: a static jit argument
    tokens = jnp.array([[1, 5, 9, 2, 7]], jnp.int32)
    expected, _, _ = model(tokens, model.init_cache(1, 8), return_attention=True)
    got, _, info = placed(
        tokens, model.init_cache(1, 8), return_attention=True, attend=head_parallel
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert info.attention.shape == (model.config.num_hidden_layers, 1, 5, 8)
