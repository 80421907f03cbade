"""Device-side timing helpers for benchmarks (never one host-synchronised call at a time).

* `loop_time`: a `lax.fori_loop` of calls inside one jit. One (small) argument of each call
  is perturbed by the loop carry (`+ 0 * carry`), so XLA cannot hoist the call out of the loop,
  and several argument sets can be rotated (one call each per iteration) so that repeated
  calls do not find their inputs in L2.
* `back_to_back_time`: many asynchronous dispatches and one sync (host dispatch must stay
  ahead of the device for this to measure the device; `dispatch_floor` says how fast it is).
* `torch_time`: a CUDA graph of many calls, replayed and timed with CUDA events.
* `copy_bandwidth`: the measured device-to-device ceiling (bytes read + bytes written per
  second), through JAX and through torch.

Times are seconds per call, medians over repetitions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _first_scalar(tree) -> jax.Array:
    leaf = jax.tree_util.tree_leaves(tree)[0]
    return leaf.reshape(-1)[0].astype(jnp.float32)


def _perturb(x, carry):
    return x + (carry * 0.0).astype(x.dtype)


def loop_time(
    fn: Callable,
    arg_sets: Sequence[tuple],
    *,
    iters: int,
    reps: int = 5,
    perturb: int = 0,
) -> dict:
    """Seconds per call of `fn(*args)`, run `iters` times per argument set inside one jit.

    fn must be traceable; args[perturb] must be a small float array: it carries the loop
    dependency (an extra elementwise pass over it is part of the time).
    """
    num_sets = len(arg_sets)

    @jax.jit
    def run(arg_sets):
        def body(_, carry):
            for args in arg_sets:
                args = list(args)
                args[perturb] = _perturb(args[perturb], carry)
                out = fn(*args)
                carry = carry + _first_scalar(out)
            return carry

        return lax.fori_loop(0, iters, body, jnp.float32(0.0))

    arg_sets = tuple(tuple(a) for a in arg_sets)
    run(arg_sets).block_until_ready()  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(arg_sets).block_until_ready()
        times.append((time.perf_counter() - start) / (iters * num_sets))
    return _summary(times, iters=iters * num_sets, method="fori_loop")


def back_to_back_time(fn: Callable, arg_sets: Sequence[tuple], *, iters: int, reps: int = 5) -> dict:
    """Seconds per call of a jitted `fn`, from `iters` asynchronous calls and one sync."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return _summary(times, iters=iters, method="back_to_back")


def dispatch_floor(iters: int = 2000) -> float:
    """Seconds per back-to-back dispatch of a trivial jitted op: below this, back-to-back
    timings measure the host, not the device."""
    x = jnp.zeros((8,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return back_to_back_time(f, [(x,)], iters=iters, reps=3)["median_s"]


def loop_overhead(iters: int = 200) -> float:
    """Seconds per iteration that `loop_time` adds around a call (a trivial fn)."""
    x = jnp.zeros((8,), jnp.float32)
    return loop_time(lambda x: x * 2.0, [(x,)], iters=iters, reps=3)["median_s"]


def torch_time(fn: Callable[[], object], *, calls: int = 20, reps: int = 5) -> dict:
    """Seconds per call of a torch CUDA callable: a CUDA graph of `calls` calls, replayed
    `reps` times between CUDA events (falls back to eager calls if capture fails)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    method = "cuda_graph"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        replay = graph.replay
    except Exception:  # noqa: BLE001 - some kernels cannot be captured; time them eagerly
        method = "cuda_events"

        def replay():
            for _ in range(calls):
                fn()

    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return _summary(times, iters=calls, method=method)


def copy_bandwidth(num_bytes: int = 2 << 30) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second.

    jax: `x + 1` on a bf16 buffer (one read, one write, nothing else); torch: `dst.copy_(src)`
    timed as a CUDA graph. Returns both and their max ("ceiling").
    """
    n = num_bytes // 2
    x = jnp.ones((n,), jnp.bfloat16)
    jax_s = loop_time(lambda x: x + 1, [(x,)], iters=20, reps=5)["median_s"]
    out = {"bytes": 2 * num_bytes, "jax_s": jax_s, "jax_Bps": 2 * num_bytes / jax_s}
    del x
    try:
        import torch

        src = torch.ones(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        torch_s = torch_time(lambda: dst.copy_(src), calls=20)["median_s"]
        out.update(torch_s=torch_s, torch_Bps=2 * num_bytes / torch_s)
        del src, dst
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - torch is optional for the ceiling
        out["torch_error"] = repr(e)[:200]
    out["ceiling_Bps"] = max(v for k, v in out.items() if k.endswith("_Bps"))
    return out


def _summary(times: list[float], *, iters: int, method: str) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
        "calls_per_rep": iters,
        "method": method,
    }
