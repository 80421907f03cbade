"""Tensor and data parallelism with JAX's own SPMD machinery: a `("data", "model")` mesh,
`NamedSharding`s from logical-axis rules, and `jax.shard_map` for the attention.

The verifier is split over the `"model"` axis (Megatron-style): query, key and value
projections by head, the output projection by its head rows, the MLP column/row (gate and up
by FFN column, down by FFN row), the embedding and the LM head by vocabulary. Its KV cache is
split by KV head, so device `m` of the model axis holds KV heads
`[m * H_kv / M, (m + 1) * H_kv / M)` and the query heads that read them. The draft is small and
stays replicated. The `"data"` axis splits the batch of both models and caches.

Inside jit everything but attention is left to XLA's partitioner (the sharded parameters and
caches decide the layout; the two contractions over split dimensions, `o_proj` and
`down_proj`, end in one all-reduce each). Attention runs under `jax.shard_map`
(`HeadParallel`, the `attend` a sharded model's forward is given: the model itself knows
nothing of meshes): each device reads only its own KV heads, dense or through the sparse
verify kernel, with no communication. Selection indices are per (sequence, layer) and shared by all
heads, so every device uses the same list for its own heads; SpecAttn's top-p selection runs
on the replicated draft's attention and needs no communication either.

    mesh = make_mesh("model=2,data=1")
    verifier, tokenizer = loading.load_sharded("path/to/verifier", mesh, jnp.bfloat16)
    draft, _ = loading.load_sharded("path/to/draft", mesh, jnp.bfloat16, rules=REPLICATED)
    result = generate(draft, verifier, prompts, config, max_new_tokens=64, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from specattn_jax.attention import Attend, AttentionOutput, Read, attend
from specattn_jax.cache import KVCache, LayerCache
from specattn_jax.errors import SpecAttnError

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """{"data": N, "model": M} from "model=2,data=1" (either axis may be left out: size 1)."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",")):
            name, eq, size = part.partition("=")
            if not eq:
                raise SpecAttnError(f"mesh {spec!r}: {part!r} is not axis=size (e.g. model=2)")
            items.append((name.strip(), size.strip()))
    sizes = {DATA: 1, MODEL: 1}
    seen = set()
    for name, size in items:
        if name not in MESH_AXES:
            raise SpecAttnError(f"mesh {spec!r}: unknown axis {name!r}; use data and model")
        if name in seen:
            raise SpecAttnError(f"mesh {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(size)
        except (TypeError, ValueError):
            raise SpecAttnError(
                f"mesh {spec!r}: size {size!r} of {name} is not an integer"
            ) from None
        if sizes[name] < 1:
            raise SpecAttnError(f"mesh {spec!r}: {name}={sizes[name]} must be at least 1")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "model=1", devices=None) -> Mesh:
    """A `Mesh` of shape (data, model) over the first data * model devices.

    The model axis is the inner one, so tensor-parallel partners are adjacent devices (on one
    host: the NVLink-connected GPUs). Raises `SpecAttnError` when more devices are asked for
    than are present.
    """
    sizes = parse_mesh(spec)
    devices = jax.devices() if devices is None else list(devices)
    needed = sizes[DATA] * sizes[MODEL]
    if needed > len(devices):
        raise SpecAttnError(
            f"mesh data={sizes[DATA]} x model={sizes[MODEL]} needs {needed} devices, but only "
            f"{len(devices)} {devices[0].platform if devices else ''} device(s) are present"
        )
    grid = np.array(devices[:needed], dtype=object).reshape(sizes[DATA], sizes[MODEL])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Devices along `axis` of `mesh` (1 without a mesh or for an axis it lacks)."""
    return 1 if mesh is None else int(mesh.shape.get(axis, 1))


# Logical axes -> mesh axes.


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis each logical axis is split over (None: replicated).

    Logical axes: batch, seq (cache positions), embed, q_heads, kv_heads, head_dim, ffn,
    vocab. Heads must divide evenly (an error otherwise); an FFN or vocabulary size that the
    model axis does not divide is replicated instead.
    """

    batch: str | None = DATA
    q_heads: str | None = MODEL
    kv_heads: str | None = MODEL
    ffn: str | None = MODEL
    vocab: str | None = MODEL
    embed: str | None = None
    head_dim: str | None = None
    seq: str | None = None

    def mesh_axis(self, logical: str) -> str | None:
        return getattr(self, logical)

    def spec(self, logical_axes: tuple[str | None, ...]) -> P:
        """The `PartitionSpec` of an array with these logical axes (None: replicated)."""
        physical = [None if axis is None else self.mesh_axis(axis) for axis in logical_axes]
        used = [axis for axis in physical if axis is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"logical axes {logical_axes} map two dimensions to one mesh axis")
        return P(*physical)


TENSOR_PARALLEL = ShardingRules()
REPLICATED = ShardingRules(q_heads=None, kv_heads=None, ffn=None, vocab=None)

CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")  # [B, S, H_kv, D]
QUERY_AXES = ("batch", "seq", "q_heads", "head_dim")  # [B, T, H, D]

# Parameter path (dotted) -> logical axes of its array, in `model.py`'s layouts.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens", ("vocab", "embed")),
    (r"lm_head", ("embed", "vocab")),
    (r"norm\.weight|layers\.\d+\.\w+_layernorm\.weight", ("embed",)),
    (r"layers\.\d+\.self_attn\.qkv_proj", ("embed", "kv_heads", None, "head_dim")),
    (r"layers\.\d+\.self_attn\.o_proj", ("q_heads", "head_dim", "embed")),
    (r"layers\.\d+\.self_attn\.qkv_bias", ("kv_heads", None, "head_dim")),
    (r"layers\.\d+\.self_attn\.o_bias", ("embed",)),
    (r"layers\.\d+\.mlp\.gate_up_proj", ("embed", None, "ffn")),
    (r"layers\.\d+\.mlp\.gate_up_bias", (None, "ffn")),
    (r"layers\.\d+\.mlp\.down_proj", ("ffn", "embed")),
    (r"layers\.\d+\.mlp\.down_bias", ("embed",)),
)


def param_axes(path: tuple) -> tuple[str | None, ...]:
    """The logical axes of a parameter, by its path; raises for a path no rule covers."""
    dotted = ".".join(str(p) for p in path)
    for pattern, axes in PARAM_AXES:
        if re.fullmatch(pattern, dotted):
            return axes
    raise SpecAttnError(f"no sharding rule for parameter {dotted}")


def _divisible_spec(
    logical_axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: ShardingRules,
    what,
) -> P:
    """`rules.spec(logical_axes)`, checked against the shape: heads and batch must divide
    evenly (a `SpecAttnError` otherwise), other axes fall back to replicated."""
    spec = list(rules.spec(logical_axes))
    for dim, (logical, axis) in enumerate(zip(logical_axes, spec, strict=True)):
        size = axis_size(mesh, axis) if axis is not None else 1
        if size == 1 or shape[dim] % size == 0:
            continue
        if logical in ("q_heads", "kv_heads", "batch"):
            names = {"q_heads": "query heads", "kv_heads": "KV heads", "batch": "sequences"}
            raise SpecAttnError(
                f"mesh {axis}={size} does not divide the {shape[dim]} {names[logical]} of "
                f"{what}; pick a {axis} size that divides {shape[dim]}"
            )
        spec[dim] = None
    return P(*spec)


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, rules=TENSOR_PARALLEL) -> P:
    """The `PartitionSpec` of one parameter under `rules` on `mesh`."""
    return _divisible_spec(
        param_axes(path), tuple(shape), mesh, rules, ".".join(str(p) for p in path)
    )


def check_mesh(mesh: Mesh, config, batch_size: int | None = None) -> None:
    """Raises `SpecAttnError` unless the model axis divides the query and KV heads (and the
    data axis the batch, when given)."""
    model = axis_size(mesh, MODEL)
    for count, name in (
        (config.num_key_value_heads, "KV heads"),
        (config.num_attention_heads, "query heads"),
    ):
        if count % model:
            raise SpecAttnError(
                f"mesh model={model} does not divide the verifier's {count} {name}; pick a "
                f"model size that divides {count}"
            )
    if batch_size is not None:
        check_batch(mesh, batch_size)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    """Raises `SpecAttnError` unless the "data" axis divides the batch."""
    data = axis_size(mesh, DATA)
    if batch_size % data:
        raise SpecAttnError(
            f"mesh data={data} does not divide the batch of {batch_size} sequences; pass a "
            f"multiple of {data} prompts or a smaller data axis"
        )


# Parameters.


def param_placer(
    mesh: Mesh, dtype, rules: ShardingRules = TENSOR_PARALLEL
) -> Callable[[tuple, np.ndarray], jax.Array]:
    """A `place(path, array)` for `load_pretrained`: casts the host array to `dtype` and puts
    each device's slice on that device only (no full copy on one device first)."""
    dtype = jnp.dtype(dtype)

    def place(path, array):
        spec = param_spec(path, array.shape, mesh, rules)
        if not isinstance(array, jax.Array):
            array = np.asarray(array).astype(dtype, copy=False)
        return jax.device_put(array, NamedSharding(mesh, spec)).astype(dtype)

    return place


def shard_model(model, mesh: Mesh, rules: ShardingRules = TENSOR_PARALLEL):
    """A copy of `model` with its parameters placed on `mesh` under `rules`.

    With the default rules (heads over "model") run its attention head-parallel by passing
    `attend=HeadParallel(mesh)` to its forward; with `REPLICATED` (for the draft) it is a plain
    replicated copy. Parameters already placed that way (by `param_placer`) are not moved. The
    model's modules are not changed.
    """
    if rules.kv_heads is not None or rules.q_heads is not None:
        check_mesh(mesh, model.config)
    graphdef, state = nnx.split(model)
    placed = [
        (path, var.replace(_put(var.get_value(), NamedSharding(mesh, param_spec(
            path, var.get_value().shape, mesh, rules)))))
        for path, var in nnx.to_flat_state(state)
    ]  # fmt: skip
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def replicate_model(model, mesh: Mesh):
    """`shard_model` with `REPLICATED` rules: the draft, whole on every device."""
    return shard_model(model, mesh, REPLICATED)


def shard_pair(draft, verifier, mesh: Mesh, batch_size: int):
    """(draft replicated, verifier tensor-parallel) on `mesh`, for a batch of `batch_size`
    (a draft of None stays None).

    Raises `SpecAttnError` when the mesh does not divide the verifier's heads or the batch.
    Models already placed this way (e.g. by `loading.load_sharded`) are not moved again.
    """
    check_mesh(mesh, verifier.config, batch_size)
    draft = None if draft is None else replicate_model(draft, mesh)
    return draft, shard_model(verifier, mesh)


def put_batch(mesh: Mesh | None, array) -> jax.Array:
    """`array` [B, ...] placed with its batch over "data" (replicated over "model")."""
    if mesh is None:
        return jnp.asarray(array)
    check_batch(mesh, array.shape[0])
    spec = TENSOR_PARALLEL.spec(("batch",) + (None,) * (array.ndim - 1))
    return jax.device_put(array, NamedSharding(mesh, spec))


def _put(array, sharding: NamedSharding):
    if isinstance(array, jax.Array) and array.sharding.is_equivalent_to(sharding, array.ndim):
        return array
    return jax.device_put(array, sharding)


# KV caches and attention.


def cache_shardings(
    mesh: Mesh, num_layers: int, head_parallel: bool, rules=TENSOR_PARALLEL
) -> KVCache:
    """A `KVCache` of `NamedSharding`s: batch over "data", KV heads over "model" when
    `head_parallel` (the verifier), else replicated over "model" (the draft)."""
    rules = rules if head_parallel else REPLICATED
    heads = NamedSharding(mesh, rules.spec(CACHE_AXES))
    return KVCache(
        k=(heads,) * num_layers,
        v=(heads,) * num_layers,
        lengths=NamedSharding(mesh, rules.spec(("batch",))),
    )


def init_cache(
    model, batch_size: int, max_len: int, mesh: Mesh | None = None, head_parallel: bool = True
) -> KVCache:
    """`model.init_cache`, allocated sharded on `mesh` (each device allocates only its
    shard): by KV head for the verifier (`head_parallel`), replicated for the draft."""
    if mesh is None:
        return model.init_cache(batch_size, max_len)
    check_batch(mesh, batch_size)
    shardings = cache_shardings(mesh, model.config.num_hidden_layers, head_parallel)
    build = functools.partial(KVCache.init, model.config, batch_size, max_len, model.dtype)
    return jax.jit(build, out_shardings=shardings)()


def shard_cache(cache: KVCache, mesh: Mesh, head_parallel: bool = True) -> KVCache:
    """An existing cache placed on `mesh` (see `cache_shardings`)."""
    check_batch(mesh, cache.batch_size)
    return jax.device_put(cache, cache_shardings(mesh, cache.num_layers, head_parallel))


@dataclasses.dataclass(frozen=True)
class HeadParallel:
    """`attention.attend`, run by each device of `mesh` on its own heads: the `attend` of a
    model from `shard_model` (hashable, so it can be a static argument of a jitted step).

    `jax.shard_map` hands each device its batch rows ("data") and its contiguous slice of KV
    heads ("model") with the query heads that read them (heads are KV-head-major, so those
    are contiguous too), plus its rows of the per-sequence arguments (positions, lengths and
    every array of the read: block lists and counts, the same for every head). No KV entry
    crosses devices. Head-mean probabilities, when asked for, are averaged over "model"
    (equal head counts per device); every device reads the same positions for its own heads,
    so the read count needs no communication.
    """

    mesh: Mesh

    def __call__(
        self,
        q: jax.Array,  # [B, T, H, D]
        cache: LayerCache,  # [B, S, H_kv, D] each
        positions: jax.Array,  # i32[B, T]
        context_lengths: jax.Array,  # i32[B]
        read: Read,
        *,
        backend: str = "auto",
        return_summary: bool = False,
    ) -> AttentionOutput:
        heads, kv_heads = TENSOR_PARALLEL.spec(QUERY_AXES), TENSOR_PARALLEL.spec(CACHE_AXES)

        def by_row(tree):
            return jax.tree.map(lambda x: P(DATA, *(None,) * (x.ndim - 1)), tree)

        def per_device(q, cache, positions, context_lengths, read):
            result = attend(
                q, cache, positions, context_lengths, read,
                backend=backend, return_summary=return_summary,
            )  # fmt: skip
            if result.summary is None:
                return result
            return dataclasses.replace(result, summary=jax.lax.pmean(result.summary, MODEL))

        # check_vma=False: the Pallas kernel has no varying-manual-axes rule. The only
        # collective is the pmean above, whose output is replicated over "model" by
        # construction, as are the read counts (the same positions on every device).
        mapped = jax.shard_map(
            per_device,
            mesh=self.mesh,
            in_specs=(
                heads,
                LayerCache(kv_heads, kv_heads),
                by_row(positions),
                by_row(context_lengths),
                by_row(read),
            ),
            out_specs=AttentionOutput(heads, P(DATA), P(DATA) if return_summary else None),
            check_vma=False,
        )
        return mapped(q, cache, positions, context_lengths, read)


def attention_for(mesh: Mesh | None) -> Attend:
    """The verifier's `attend` on `mesh`: `HeadParallel` when the "model" axis splits its
    heads, else the plain `attention.attend` (XLA partitions a data-only mesh by itself)."""
    return HeadParallel(mesh) if axis_size(mesh, MODEL) > 1 else attend
