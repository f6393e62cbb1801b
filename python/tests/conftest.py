"""Shared by the tests: the `bitnet` binary they compare the module against, and the fixture models.

The binary is the one `cargo build -p bitnet-cli` makes ($BITNET_BIN, else target/debug/bitnet under
$CARGO_TARGET_DIR or the repository's target/)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests" / "fixtures" / "models"
HELDOUT = REPO / "tests" / "fixtures" / "heldout.txt"
FIXTURES = sorted(str(p) for p in MODELS.glob("*.gguf"))
# A model whose head dim (16) is no whole q8_0 block: a q8_0 KV cache is refused for it.
TINY_A = str(MODELS / "tiny-a-i2_s.gguf")


def bitnet_bin() -> str:
    if "BITNET_BIN" in os.environ:
        return os.environ["BITNET_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "bitnet")


def bitnet(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Runs `bitnet ARGS` (CPU backend where it runs a model, as the module's tests ask for)."""
    return subprocess.run([bitnet_bin(), *args], input=stdin, capture_output=True, text=True, timeout=600)


def bitnet_ok(*args: str, stdin: str = "") -> str:
    out = bitnet(*args, stdin=stdin)
    assert out.returncode == 0, f"bitnet {args} failed: {out.stderr}"
    return out.stdout


def bitnet_json(*args: str) -> dict:
    return json.loads(bitnet_ok(*args))


def pytest_configure(config):
    if not Path(bitnet_bin()).exists():
        raise pytest.UsageError(f"{bitnet_bin()} not found: `cargo build -p bitnet-cli` first (or set BITNET_BIN)")


@pytest.fixture(scope="session")
def default_model():
    import bitnet as bn

    return bn.Model(backend="cpu")
