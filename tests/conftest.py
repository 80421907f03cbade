import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    if not (STORIES260K / "stories260K.bin").is_file():
        pytest.skip(f"../shared/models/stories260K is not beside the checkout ({STORIES260K})")
    return STORIES260K


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
