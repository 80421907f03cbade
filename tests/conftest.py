import os
from pathlib import Path

# Four host devices, so the sharding tests run meshes on CPU (set before JAX starts).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.synthetic_corpus import write_corpus  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    if not (STORIES260K / "stories260K.bin").is_file():
        pytest.skip(f"../shared/models/stories260K is not beside the checkout ({STORIES260K})")
    return STORIES260K


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A Gutenberg-shaped folder of sentences from a small grammar (`synthetic_corpus`)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
