"""The one base for kernel tests: a GPU class and an interpret-mode twin run the same cases.

`<Op>Test` (INTERPRET = False, marked `gpu`) runs the Pallas kernels compiled for a CUDA GPU
(sm80+) on large shapes and skips elsewhere; `<Op>InterpretTest` (INTERPRET = True) runs the
same cases in Pallas interpret mode on small shapes, on CPU only (a GPU run does not repeat
them). Both derive from `<Op>Cases`, which holds the test methods.
"""

from __future__ import annotations

import warnings

import jax
import pytest

# The only warning silenced: JAX >= 0.11 deprecates the Pallas Triton backend.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def _gpu_skip_reason() -> str | None:
    device = jax.devices()[0]
    if device.platform != "gpu":
        return (
            f"needs a CUDA GPU (the default device is {device.platform}); "
            "the interpret twin covers CPU"
        )
    capability = getattr(device, "compute_capability", None)
    if capability is not None and float(capability) < 8.0:
        return f"needs sm80 or newer for the Triton lowering (this GPU is sm{capability})"
    return None


class KernelTestBase:
    """Skips by mode; tests pass `interpret=self.INTERPRET` and size shapes by `self.INTERPRET`."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _device_mode(self):
        if self.INTERPRET:
            if jax.devices()[0].platform != "cpu":
                pytest.skip("interpret mode runs on CPU only; the GPU class covers this machine")
            yield
            return
        reason = _gpu_skip_reason()
        if reason is not None:
            pytest.skip(reason)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TRITON_DEPRECATION)
            yield
