"""Kernel benchmark: sparse and dense verify attention and top-p selection against peers.

Prints a table and writes JSON (never pass/fail). Device-timed (`benchmarks/_timing.py`): a
`fori_loop` of calls inside one jit for JAX code (every output element consumed), CUDA events
around back-to-back calls for torch, rotating up to 4 input sets so that small working sets
do not sit in L2. Bandwidth is reported on the bytes
each implementation must read (K/V rows it touches plus index lists; queries and outputs are
negligible), against a device-to-device copy measured in the same run.

  python benchmarks/bench_kernels.py --out results.json            # on a GPU
  python benchmarks/bench_kernels.py --smoke                        # CPU, tiny, interpret mode

Sections, in priority order (each skipped once --budget seconds have passed): copy, topp
(selection vs sort-based top-p and lax.top_k), attention (Q=5 at 16K/32K, then Q=1/9, 128K,
4K, more kept fractions), sweep (tiling of the dense kernel on a few shapes).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import argparse
import dataclasses
import functools
import json
import math
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import _timing  # this folder's helper: benchmarks run as scripts
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import verify_attention_mgpu as mgpu

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

MODELS = {  # H, H_kv, D
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "tinyllama-1.1b": (32, 4, 64),  # the draft of bench_generate and bench_longctx
}
L2_BYTES = 50 << 20
ROTATE_BYTES = 256 << 20  # aim for this much distinct data per loop iteration
MAX_SETS = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    context: int
    num_queries: int

    @property
    def heads(self):
        return MODELS[self.model]

    def name(self):
        return f"{self.model}_B{self.batch}_ctx{self.context // 1024}K_Q{self.num_queries}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.records = []
        self.errors = []
        self.smoke = args.smoke
        self.interpret = args.smoke
        self.copy = None
        self._inputs_key = None
        self._inputs = None

    # -- bookkeeping -------------------------------------------------------------------------

    def elapsed(self):
        return time.perf_counter() - self.start

    def over_budget(self):
        return self.elapsed() > self.args.budget

    def log(self, msg):
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def record(self, **rec):
        if self.copy and rec.get("bytes") and rec.get("median_s"):
            rec["Bps"] = rec["bytes"] / rec["median_s"]
            rec["frac_copy"] = rec["Bps"] / self.copy["ceiling_Bps"]
        self.records.append(rec)
        self.save()
        keys = ("section", "shape", "impl", "kept", "granularity", "config")
        label = " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k) is not None)
        us = rec.get("median_s", float("nan")) * 1e6
        self.log(f"{label}: {us:9.1f} us  frac_copy={rec.get('frac_copy', float('nan')):.3f}")

    def fail(self, where, exc):
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-1500:]
        self.errors.append({"where": where, "error": text})
        self.save()
        self.log(f"ERROR in {where}: {text[:400]}")

    def save(self):
        if not self.args.out:
            return
        out = {
            "device": str(jax.devices()[0].device_kind),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "copy": self.copy,
            "records": self.records,
            "errors": self.errors,
            "elapsed_s": self.elapsed(),
        }
        try:
            import torch

            out["torch"] = torch.__version__
        except ImportError:
            pass
        Path(self.args.out).write_text(json.dumps(out, indent=1))

    # -- timing ------------------------------------------------------------------------------

    def iters_for(self, est_s, num_sets):
        if self.smoke:
            return 1
        return int(np.clip(0.04 / max(est_s, 1e-6) / num_sets, 3, 400))

    def time_jax(self, fn, arg_sets, est_bytes, perturb=0):
        est = est_bytes / 2.5e12 + 10e-6
        iters = self.iters_for(est, len(arg_sets))
        return _timing.loop_time(
            fn, arg_sets, iters=iters, reps=1 if self.smoke else 5, perturb=perturb
        )

    # -- inputs ------------------------------------------------------------------------------

    def inputs(self, shape: Shape, num_sets: int):
        """q and `num_sets` distinct K/V caches of [B, context + Q, H_kv, D] bf16."""
        key = (shape, num_sets)
        if self._inputs_key != key:
            self._inputs = None  # free the previous shape first
            num_heads, num_kv_heads, head_dim = shape.heads
            seq_len = shape.context + shape.num_queries
            keys = jax.random.split(jax.random.key(hash(shape.name()) % 2**31), 2 * num_sets + 1)
            q = jax.random.normal(
                keys[0], (shape.batch, shape.num_queries, num_heads, head_dim), jnp.bfloat16
            )
            kv = [
                tuple(
                    jax.random.normal(
                        k, (shape.batch, seq_len, num_kv_heads, head_dim), jnp.bfloat16
                    )
                    for k in keys[1 + 2 * i : 3 + 2 * i]
                )
                for i in range(num_sets)
            ]
            lengths = jnp.full((shape.batch,), shape.context, jnp.int32)
            jax.block_until_ready(kv)
            self._inputs = (q, kv, lengths)
            self._inputs_key = key
        return self._inputs

    def kv_bytes(self, shape: Shape, rows_per_seq):
        _, num_kv_heads, head_dim = shape.heads
        return shape.batch * rows_per_seq * num_kv_heads * head_dim * 2 * 2

    def num_sets(self, bytes_read, total_bytes):
        wanted = math.ceil(ROTATE_BYTES / max(bytes_read, 1))
        fit = max(1, int((8 << 30) // max(total_bytes, 1)))
        return int(max(1, min(wanted, MAX_SETS, fit)))

    def selection(self, shape: Shape, kept: float, granularity: int, seed: int):
        """Random selected blocks (ascending, like top_p_select) covering `kept` of the
        context, in slots for every block of the cache."""
        seq_len = shape.context + shape.num_queries
        num_blocks = -(-seq_len // granularity)
        context_blocks = shape.context // granularity
        count = max(1, int(round(kept * context_blocks)))
        keys = jax.random.split(jax.random.key(seed), shape.batch)
        rows = [jnp.sort(jax.random.permutation(k, context_blocks)[:count]) for k in keys]
        indices = jnp.zeros((shape.batch, num_blocks), jnp.int32)
        indices = indices.at[:, :count].set(jnp.stack(rows).astype(jnp.int32))
        counts = jnp.full((shape.batch,), count, jnp.int32)
        return indices, counts, count * granularity

    # -- implementations ---------------------------------------------------------------------

    def ours(self, granularity, block_sizes=None, contiguous=False):
        return functools.partial(
            pk.sparse_verify_attention,
            granularity=granularity,
            block_sizes=block_sizes,
            contiguous=contiguous,
            interpret=self.interpret,
        )

    @staticmethod
    def verify_mask(shape: Shape):
        seq_len = shape.context + shape.num_queries
        t = jnp.arange(shape.num_queries)[:, None]
        s = jnp.arange(seq_len)[None, :]
        return (s <= shape.context + t)[None, None]  # [1, 1, T, S]: bottom-right causal

    # -- sections ----------------------------------------------------------------------------

    def run_copy(self):
        if self.smoke:
            self.copy = {"ceiling_Bps": 1e10, "note": "smoke"}
            return
        self.copy = _timing.copy_bandwidth(2 << 30)
        self.copy["read_only_Bps"] = _timing.read_bandwidth(2 << 30)
        self.copy["dispatch_floor_s"] = _timing.dispatch_floor()
        self.copy["loop_overhead_s"] = _timing.loop_overhead()
        self.log(f"copy: {json.dumps(self.copy)}")
        self.save()

    def run_sweep(self, groups=("verify",)):
        """Tilings of the dense kernel: `verify` shapes (Q = 5) and `draft` shapes (the
        TinyLlama draft's one and two new tokens, batch 1)."""
        shapes = {
            "verify": [
                Shape("llama3-8b", 1, 32768, 5),
                Shape("llama3-8b", 8, 32768, 5),
                Shape("llama2-7b", 1, 32768, 5),
                Shape("llama2-7b", 8, 32768, 5),
            ],
            "draft": [Shape("tinyllama-1.1b", 1, 32768, 1), Shape("tinyllama-1.1b", 1, 32768, 2)],
        }
        shapes = [shape for group in groups for shape in shapes[group]]
        configs = [  # (block_k, num_warps, num_stages, splits relative to the default);
            # None: the default for the shape
            (None, None, None, 1),
            (None, None, None, 0.5),
            (None, None, None, 0.25),
            (None, None, None, 2),
            (None, None, None, 4),
            (64, 4, 3, 1),
            (128, 8, 3, 1),
            (128, 4, 3, 2),
            (32, 4, 3, 4),
        ]
        if self.smoke:
            shapes, configs = [Shape("llama3-8b", 1, 512, 5)], configs[:2]
        for shape in shapes:
            if self.over_budget():
                return
            q, kv, lengths = self.inputs(shape, 1)
            seq_len = shape.context + shape.num_queries
            best = None
            num_heads, num_kv_heads, head_dim = shape.heads
            rows = num_heads // num_kv_heads * shape.num_queries
            default = pk.SparseVerifyBlockSizes.get_default(
                rows_per_head=max(16, 1 << (rows - 1).bit_length()), head_dim=head_dim
            )
            for block_k, warps, stages, split_scale in configs:
                if self.over_budget():
                    return
                block_k = block_k or default.block_k
                warps = warps or default.num_warps
                stages = stages or default.num_stages
                splits = _default_splits(shape, block_k, -(-seq_len // 16) * 16)
                splits = max(1, int(splits * split_scale))
                cfg = pk.SparseVerifyBlockSizes(
                    block_k=block_k, num_splits=splits, num_warps=warps, num_stages=stages
                )
                indices, counts = pk.dense_block_list(lengths, seq_len, 16)
                bytes_read = self.kv_bytes(shape, seq_len)
                for contiguous in (True, False):  # rows in order, or ids looked up
                    try:
                        t = self.time_jax(
                            self.ours(16, cfg, contiguous),
                            [(q, *kv[0], indices, counts, lengths)],
                            bytes_read,
                        )
                    except Exception as e:  # noqa: BLE001
                        self.fail(f"sweep {shape.name()} {cfg} {contiguous=}", e)
                        continue
                    config = {**dataclasses.asdict(cfg), "contiguous": contiguous}
                    self.record(
                        section="sweep",
                        shape=shape.name(),
                        impl="dense_kernel",
                        config=config,
                        bytes=bytes_read,
                        **t,
                    )
                    if best is None or t["median_s"] < best[1]:
                        best = (config, t["median_s"])
            self.log(f"sweep best {shape.name()}: {best}")

    def attention_shape(self, shape: Shape, kept_list, granularities, peers=True):
        """Dense kernel, sparse kernel at each (kept, g), and the dense peers on one shape."""
        num_heads, num_kv_heads, head_dim = shape.heads
        seq_len = shape.context + shape.num_queries
        dense_bytes = self.kv_bytes(shape, seq_len)
        smallest = self.kv_bytes(shape, int(min(kept_list) * shape.context) + shape.num_queries)
        num_sets = self.num_sets(smallest, dense_bytes)
        q, kv, lengths = self.inputs(shape, num_sets)
        name = shape.name()

        def sets_for(bytes_read):
            return kv[: self.num_sets(bytes_read, dense_bytes)]

        # Dense kernel (all blocks at g = 16), read as the model reads it (in order or through
        # the block ids, `pk.reads_in_order`), then the other way.
        indices, counts = pk.dense_block_list(lengths, seq_len, 16)
        arg_sets = [(q, k, v, indices, counts, lengths) for k, v in sets_for(dense_bytes)]
        in_order = pk.reads_in_order(shape.batch, num_heads, num_kv_heads)
        other = "dense_kernel_lookup" if in_order else "dense_kernel_in_order"
        for impl, contiguous in (("dense_kernel", in_order), (other, not in_order)):
            if self.over_budget():
                return
            try:
                t = self.time_jax(self.ours(16, contiguous=contiguous), arg_sets, dense_bytes)
                self.record(
                    section="attention",
                    shape=name,
                    impl=impl,
                    kept=1.0,
                    granularity=16,
                    bytes=dense_bytes,
                    sets=len(arg_sets),
                    **t,
                )
            except Exception as e:  # noqa: BLE001
                self.fail(f"{impl} {name}", e)

        self.mosaic_dense(shape, q, sets_for(dense_bytes), lengths, dense_bytes)

        for granularity in granularities:
            for kept in kept_list:
                if kept >= 1.0 or self.over_budget():
                    continue
                try:
                    indices, counts, rows = self.selection(shape, kept, granularity, seed=1)
                    index_bytes = shape.batch * num_kv_heads * counts[0].item() * 4
                    bytes_read = self.kv_bytes(shape, rows + shape.num_queries) + index_bytes
                    arg_sets = []
                    for i, (k, v) in enumerate(sets_for(bytes_read)):
                        indices, counts, _ = self.selection(shape, kept, granularity, seed=1 + i)
                        arg_sets.append((q, k, v, indices, counts, lengths))
                    t = self.time_jax(self.ours(granularity), arg_sets, bytes_read)
                    self.record(
                        section="attention",
                        shape=name,
                        impl="sparse_kernel",
                        kept=kept,
                        granularity=granularity,
                        bytes=bytes_read,
                        sets=len(arg_sets),
                        l2_risk=len(arg_sets) * bytes_read < 2 * L2_BYTES,
                        **t,
                    )
                except Exception as e:  # noqa: BLE001
                    self.fail(f"sparse_kernel {name} kept={kept} g={granularity}", e)

        if not peers:
            return
        mask = self.verify_mask(shape)
        jax_peers = {
            "xla": functools.partial(jax.nn.dot_product_attention, mask=mask, implementation="xla"),
        }
        if not self.smoke:
            jax_peers["cudnn"] = functools.partial(
                jax.nn.dot_product_attention, mask=mask, implementation="cudnn"
            )
        for impl, fn in jax_peers.items():
            if self.over_budget():
                return
            arg_sets = [(q, k, v) for k, v in sets_for(dense_bytes)]
            try:
                t = self.time_jax(fn, arg_sets, dense_bytes)
                self.record(
                    section="attention",
                    shape=name,
                    impl=impl,
                    kept=1.0,
                    bytes=dense_bytes,
                    sets=len(arg_sets),
                    **t,
                )
            except Exception as e:  # noqa: BLE001
                self.fail(f"{impl} {name}", e)
                if impl == "cudnn":  # retry without the mask (same bytes, no causal offset)
                    try:
                        fn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
                        t = self.time_jax(fn, arg_sets, dense_bytes)
                        self.record(
                            section="attention",
                            shape=name,
                            impl="cudnn_nomask",
                            kept=1.0,
                            bytes=dense_bytes,
                            sets=len(arg_sets),
                            **t,
                        )
                    except Exception as e2:  # noqa: BLE001
                        self.fail(f"cudnn_nomask {name}", e2)
        if shape.num_queries == 1 and not self.smoke and not self.over_budget():
            try:
                from jax.experimental.pallas.ops.gpu import decode_attention

                # gqa needs the cache length to divide into k_splits (16) blocks of
                # block_k (128): pad the capacity; kv_seq_len keeps the reads to the context.
                seq_len = shape.context + shape.num_queries
                pad = ((0, 0), (0, -seq_len % 2048), (0, 0), (0, 0))
                kv_seq_len = jnp.full((shape.batch,), seq_len, jnp.int32)
                fn = jax.jit(
                    lambda q, k, v: decode_attention.gqa(q[:, 0], k, v, kv_seq_len=kv_seq_len)
                )
                arg_sets = [(q, jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in sets_for(dense_bytes)]
                t = self.time_jax(fn, arg_sets, dense_bytes)
                self.record(
                    section="attention",
                    shape=name,
                    impl="jax_pallas_decode_gqa",
                    kept=1.0,
                    bytes=dense_bytes,
                    sets=len(arg_sets),
                    **t,
                )
            except Exception as e:  # noqa: BLE001
                self.fail(f"jax_pallas_decode_gqa {name}", e)
        if not self.smoke and not self.over_budget():
            self.torch_sdpa(shape, q, sets_for(dense_bytes), dense_bytes)
            import torch

            torch.cuda.empty_cache()

    def mosaic_dense(self, shape: Shape, q, kv_sets, lengths, dense_bytes):
        """The dense read through the Mosaic GPU kernel (TMA and wgmma), on Hopper (or in
        interpret mode with --smoke), where it takes the shape."""
        takes = mgpu.supports(q.shape, kv_sets[0][0].shape, q.dtype)
        if not (takes and (mgpu.on_hopper() or self.interpret)) or self.over_budget():
            return
        run = functools.partial(mgpu.verify_attention_mgpu, interpret=self.interpret)
        try:
            t = self.time_jax(run, [(q, k, v, lengths) for k, v in kv_sets], dense_bytes)
            self.record(
                section="attention", shape=shape.name(), impl="dense_kernel_mosaic", kept=1.0,
                bytes=dense_bytes, sets=len(kv_sets), **t,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            self.fail(f"dense_kernel_mosaic {shape.name()}", e)

    def torch_sdpa(self, shape: Shape, q, kv_sets, dense_bytes):
        name = shape.name()
        try:
            import torch
            import torch.nn.functional as F
            from torch.nn.attention.bias import causal_lower_right

            seq_len = shape.context + shape.num_queries
            tq = torch.from_dlpack(q).transpose(1, 2)  # [B, H, T, D]
            tkv = [
                (torch.from_dlpack(k).transpose(1, 2), torch.from_dlpack(v).transpose(1, 2))
                for k, v in kv_sets
            ]
            for label, mask in (
                ("torch_sdpa", causal_lower_right(shape.num_queries, seq_len)),
                ("torch_sdpa_nomask", None),
            ):
                try:

                    def call(mask=mask):
                        for k, v in tkv:
                            F.scaled_dot_product_attention(
                                tq, k, v, attn_mask=mask, enable_gqa=True
                            )

                    t = _timing.torch_time(call, calls=max(2, 20 // len(tkv)))
                    t["median_s"] /= len(tkv)
                    t["min_s"] /= len(tkv)
                    t["max_s"] /= len(tkv)
                    self.record(
                        section="attention",
                        shape=name,
                        impl=label,
                        kept=1.0,
                        bytes=dense_bytes,
                        sets=len(tkv),
                        **t,
                    )
                    break
                except Exception as e:  # noqa: BLE001
                    self.fail(f"{label} {name}", e)
        except Exception as e:  # noqa: BLE001
            self.fail(f"torch {name}", e)

    def attention_plan(self):
        """(group, shape, kept fractions, granularities, with peers), in priority order."""
        if self.smoke:
            return [
                ("core", Shape("llama3-8b", 2, 512, 5), [1.0, 0.3], [1, 16], True),
                ("queries", Shape("llama2-7b", 1, 256, 1), [0.3], [16], True),
            ]
        models = ("llama3-8b", "llama2-7b")
        plan = []
        for context in (16384, 32768):
            for batch in (1, 8):
                for model in models:
                    plan.append(
                        ("core", Shape(model, batch, context, 5), [1.0, 0.3, 0.1], [1, 16], True)
                    )
        for num_queries in (1, 9):
            for batch in (1, 8):
                for model in models:
                    plan.append(
                        ("queries", Shape(model, batch, 32768, num_queries), [1.0, 0.3], [16], True)
                    )
        for batch in (1, 8):
            for model in models:
                plan.append(
                    ("long", Shape(model, batch, 131072, 5), [1.0, 0.3, 0.1], [1, 16], True)
                )
        for batch in (1, 8):
            for model in models:
                plan.append(("short", Shape(model, batch, 4096, 5), [1.0, 0.3], [16], True))
        for batch in (1, 8):
            for model in models:
                plan.append(("kept", Shape(model, batch, 32768, 5), [0.5], [1, 16], False))
        return plan

    def run_attention(self, groups=None):
        groups = groups or self.args.groups.split(",")
        for group, shape, kept, granularities, peers in self.attention_plan():
            if group not in groups:
                continue
            if self.over_budget():
                self.log("attention: budget spent, stopping")
                return
            self.attention_shape(shape, kept, granularities, peers)
        self._inputs = None

    def run_topp(self):
        cases = [(32, 1, 32768), (8, 5, 32768), (8, 1, 131072), (2, 1, 262144)]
        if self.smoke:
            cases = [(4, 1, 1024), (2, 3, 700)]
        for rows, draft_rows, seq_len in cases:
            if self.over_budget():
                return
            self.topp_case(rows, draft_rows, seq_len)

    def topp_case(self, rows, draft_rows, seq_len):
        name = f"R{rows}_A{draft_rows}_S{seq_len // 1024}K"
        key = jax.random.key(seq_len + rows)
        logits = jax.random.normal(key, (rows, draft_rows, seq_len), jnp.float32) * 3.0
        weights = jax.nn.softmax(logits, axis=-1)
        p = jnp.full((rows,), 0.9, jnp.float32)
        lengths = jnp.full((rows,), seq_len, jnp.int32)
        in_bytes = weights.size * 4
        ref_counts = pk.top_p_exact_reference(weights, p, lengths, granularity=1)[2]
        k = max(1, int(jnp.median(ref_counts)))

        def sort_mask(w, p, lengths):
            ordered = -jnp.sort(-w, axis=-1)
            mass = jnp.cumsum(ordered, axis=-1)
            cut = jnp.argmax(mass >= p[:, None, None] * mass[..., -1:], axis=-1)
            theta = jnp.take_along_axis(ordered, cut[..., None], axis=-1)
            return (w >= theta).any(axis=1)

        def top_k_mask(w, p, lengths):
            values, _ = jax.lax.top_k(w, k)
            return (w >= values[..., -1:]).any(axis=1)

        tp = sys.modules["pallas_kernels.top_p_select"]
        block_sizes = tp.BlockSizes.get_default(seq_len)
        theta = pk.top_p_select(weights, p, lengths, granularity=1, interpret=self.interpret)[0]

        def threshold_only(w, p, lengths):
            return tp._top_p_thresholds(
                w.reshape(rows * draft_rows, seq_len),
                jnp.repeat(p, draft_rows),
                jnp.repeat(lengths, draft_rows),
                block_sizes=block_sizes,
                interpret=self.interpret,
                debug=False,
            )

        def compact_only(w, p, lengths):
            return tp._top_p_compact(
                w,
                theta + 0.0 * p[:, None],
                lengths,
                granularity=1,
                block_c=block_sizes.block_c,
                num_warps=block_sizes.num_warps_compact,
                interpret=self.interpret,
                debug=False,
            )

        impls = {
            "ours_g1": functools.partial(pk.top_p_select, granularity=1, interpret=self.interpret),
            "ours_threshold_kernel": threshold_only,
            "ours_compact_kernel_g1": compact_only,
            "ours_g16": functools.partial(
                pk.top_p_select, granularity=16, interpret=self.interpret
            ),
            "sort_mask": sort_mask,
            "sort_top_p_compacted": functools.partial(pk.top_p_exact_reference, granularity=1),
            "lax_top_k_mask": top_k_mask,
            "ours_reference_xla": functools.partial(pk.top_p_select_reference, granularity=1),
        }
        for impl, fn in impls.items():
            if self.over_budget():
                return
            try:
                t = self.time_jax(fn, [(weights, p, lengths)], in_bytes, perturb=1)
                self.record(
                    section="topp",
                    shape=name,
                    impl=impl,
                    bytes=in_bytes,
                    top_k=k if "top_k" in impl else None,
                    **t,
                )
            except Exception as e:  # noqa: BLE001
                self.fail(f"topp {impl} {name}", e)
        try:
            got = pk.top_p_select(weights, p, lengths, granularity=1, interpret=self.interpret)
            ref = pk.top_p_select_reference(weights, p, lengths, granularity=1)
            same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, ref, strict=True))
            self.record(
                section="topp_check",
                shape=name,
                impl="kernel_vs_reference",
                bit_exact=same,
                mean_count=float(got[2].mean()),
            )
        except Exception as e:  # noqa: BLE001
            self.fail(f"topp check {name}", e)

    # -- report ------------------------------------------------------------------------------

    def table(self):
        lines = []
        if self.copy:
            lines.append(
                f"device {jax.devices()[0].device_kind}; copy ceiling "
                f"{self.copy['ceiling_Bps'] / 1e12:.2f} TB/s"
            )
        by_shape = {}
        for r in self.records:
            if r.get("section") == "attention":
                by_shape.setdefault(r["shape"], []).append(r)
        lines.append(
            f"{'shape':34s} {'impl':22s} {'kept':>5s} {'g':>3s} {'us':>9s} "
            f"{'TB/s':>6s} {'copy%':>6s} {'vs best dense peer':>18s}"
        )
        for shape, recs in by_shape.items():
            peers = [r["median_s"] for r in recs if r["impl"] not in OUR_KERNELS]
            best_peer = min(peers) if peers else None
            for r in recs:
                speed = f"{best_peer / r['median_s']:.2f}x" if best_peer else ""
                lines.append(
                    f"{shape:34s} {r['impl']:22s} {r.get('kept', 1.0):5.2f} "
                    f"{r.get('granularity') or '':>3} {r['median_s'] * 1e6:9.1f} "
                    f"{r.get('Bps', 0) / 1e12:6.2f} {100 * r.get('frac_copy', 0):6.1f} "
                    f"{speed:>18s}"
                )
        for r in self.records:
            if r.get("section") == "topp":
                lines.append(f"topp {r['shape']:16s} {r['impl']:22s} {r['median_s'] * 1e6:9.1f} us")
            if r.get("section") == "topp_check":
                lines.append(f"topp {r['shape']:16s} bit_exact={r['bit_exact']}")
        for e in self.errors:
            lines.append(f"ERROR {e['where']}: {e['error'][:200]}")
        lines.extend(self.targets())
        return "\n".join(lines)

    def targets(self):
        """The issue's targets, on shapes with context >= 16K, from this run's records."""
        att = [
            r for r in self.records if r.get("section") == "attention" and "ctx4K" not in r["shape"]
        ]
        out = ["targets (context >= 16K):"]
        by_shape = {}
        for r in att:
            by_shape.setdefault(r["shape"], []).append(r)
        for shape, recs in by_shape.items():
            peers = [r["median_s"] for r in recs if r["impl"] not in OUR_KERNELS]
            dense = [r for r in recs if r["impl"] == "dense_kernel"]
            if not dense or not peers:
                continue
            d = dense[0]
            line = (
                f"  {shape}: dense {d.get('frac_copy', 0):.2f} of copy, "
                f"{min(peers) / d['median_s']:.2f}x best peer"
            )
            for r in recs:
                if r["impl"] == "dense_kernel_mosaic":
                    line += (
                        f"; mosaic {r.get('frac_copy', 0):.2f} of copy, "
                        f"{min(peers) / r['median_s']:.2f}x best peer"
                    )
                if r["impl"] == "sparse_kernel":
                    line += (
                        f"; kept {r['kept']} g{r['granularity']}: "
                        f"{r.get('frac_copy', 0):.2f} of copy, "
                        f"{min(peers) / r['median_s']:.2f}x best peer"
                    )
            out.append(line)
        return out


# The rows of this project's kernels (the rest of a shape's rows are peers).
OUR_KERNELS = (
    "dense_kernel",
    "dense_kernel_lookup",
    "dense_kernel_in_order",
    "dense_kernel_mosaic",
    "sparse_kernel",
)


def _default_splits(shape: Shape, block_k: int, max_rows: int) -> int:
    from pallas_kernels.sparse_verify_attention import default_num_splits

    return default_num_splits(shape.batch, shape.heads[1], max_rows, block_k)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON results path")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before skipping")
    parser.add_argument(
        "--sections",
        default="copy,topp,attention:core,sweep,attention:queries+long+short+kept",
        help="comma-separated, in order; attention:<group>+<group> picks groups",
    )
    parser.add_argument(
        "--groups",
        default="core,queries,long,short,kept",
        help="attention groups to run, in priority order",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode")
    args = parser.parse_args(argv)
    bench = Bench(args)
    bench.log(f"devices: {jax.devices()}  jax {jax.__version__}")
    for section in args.sections.split(","):
        if bench.over_budget() and section != "copy":
            bench.log(f"{section}: skipped (budget)")
            continue
        name, _, groups = section.partition(":")  # e.g. attention:core+queries
        try:
            if groups:
                getattr(bench, f"run_{name}")(groups.split("+"))
            else:
                getattr(bench, f"run_{name}")()
        except Exception as e:  # noqa: BLE001
            bench.fail(section, e)
    bench.save()
    print(bench.table(), flush=True)


if __name__ == "__main__":
    main()
