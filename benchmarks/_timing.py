"""Device-side timing helpers for benchmarks (never one host-synchronised call at a time).

* `loop_time`: a `lax.fori_loop` of calls inside one jit. One (small) argument of each call
  is perturbed by the loop carry (`+ 0 * carry`) and every output element feeds the carry, so
  XLA can neither hoist the call out of the loop nor skip part of it,
  and several argument sets can be rotated (one call each per iteration) so that repeated
  calls do not find their inputs in L2.
* `threaded_loop_time`: a `lax.fori_loop` of `state = fn(*args, state)` inside one jit, the
  state (a cache, say) donated and updated in place, for steps too big to checksum.
* `back_to_back_time`: many asynchronous dispatches and one sync (host dispatch must stay
  ahead of the device for this to measure the device; `dispatch_floor` says how fast it is).
* `torch_time`: many eager calls between CUDA events.
* `copy_bandwidth`: the measured device-to-device ceiling (bytes read + bytes written per
  second), through JAX and through torch.

Times are seconds per call, medians over repetitions.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _checksum(tree) -> jax.Array:
    """Sum of every output element: consuming only a slice would let XLA slice through the
    producer and skip work. (A small extra reduction per call, the same for every peer.)"""
    return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree_util.tree_leaves(tree))


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
                carry = carry + _checksum(out)
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


def threaded_loop_time(fn: Callable, args: tuple, state, *, iters: int, reps: int = 3):
    """Seconds per call of `state = fn(*args, state)`, `iters` calls in one `fori_loop` (no
    host between them). Each call must depend on the state it is given, or XLA may hoist it
    out of the loop. Returns (the summary, the final state); the state passed in is donated.
    """

    @functools.partial(jax.jit, donate_argnums=1)
    def run(args, state):
        return lax.fori_loop(0, iters, lambda _, state: fn(*args, state), state)

    state = jax.block_until_ready(run(args, state))  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        state = jax.block_until_ready(run(args, state))
        times.append((time.perf_counter() - start) / iters)
    return _summary(times, iters=iters, method="threaded fori_loop"), state


def back_to_back_time(
    fn: Callable, arg_sets: Sequence[tuple], *, iters: int, reps: int = 5
) -> dict:
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


def jax_copy_time(num_bytes: int, *, iters: int = 20, reps: int = 5) -> float:
    """Seconds per `x = x + 1` over a bf16 buffer carried through a fori_loop (one full read
    and one full write per step, in place)."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    # The barrier keeps XLA from unrolling and fusing steps into one pass.
    step = lambda _, x: lax.optimization_barrier(x + 1)  # noqa: E731
    run = jax.jit(lambda x: lax.fori_loop(0, iters, step, x), donate_argnums=0)
    x = run(x)
    x.block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x = run(x)
        x.block_until_ready()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def torch_time(fn: Callable[[], object], *, calls: int = 20, reps: int = 5) -> dict:
    """Seconds per call of a torch CUDA callable: `calls` eager calls back to back between
    CUDA events, `reps` times. (No CUDA graph capture: capturing while JAX shares the device
    can leave JAX's stream in an error state.)"""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return _summary(times, iters=calls, method="cuda_events")


def read_bandwidth(num_bytes: int = 2 << 30, *, iters: int = 20) -> float:
    """Bytes per second of a read-only pass (a sum over a bf16 buffer), for reference."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    t = loop_time(lambda x: jnp.sum(x, dtype=jnp.float32), [(x,)], iters=iters, reps=5)
    return num_bytes / t["median_s"]


def _torch_copy_time(num_bytes: int) -> float:
    import torch

    src = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return torch_time(lambda: dst.copy_(src), calls=20)["median_s"]


def copy_bandwidth(num_bytes: int = 2 << 30) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second.

    jax: an in-place `x + 1` over a bf16 buffer (one read, one write); torch:
    `dst.copy_(src)` timed with CUDA events. Returns both and their max ("ceiling").
    """
    jax_s = jax_copy_time(num_bytes)
    out = {"bytes": 2 * num_bytes, "jax_s": jax_s, "jax_Bps": 2 * num_bytes / jax_s}
    try:
        torch_s = _torch_copy_time(num_bytes)
        out.update(torch_s=torch_s, torch_Bps=2 * num_bytes / torch_s)
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
