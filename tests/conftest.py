from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "megengine"
R18 = "atss_res18_coco_3x_800size"


def require_reference() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"MegEngine reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: deterministic kernels, and no OpenMP thread teams spinning
    on a shared, oversubscribed CI machine (a 1 s test took 50 s at load 10). Use it module-wide with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return require_reference()


@pytest.fixture(scope="session")
def r18_checkpoint(reference_dir: Path) -> Path:
    return reference_dir / f"{R18}.seed0.pkl.gz"


@pytest.fixture(scope="session")
def r18_outputs(reference_dir: Path):
    import numpy as np

    return dict(np.load(reference_dir / f"{R18}.seed0.outputs.npz"))


@pytest.fixture(scope="session")
def r18_model(r18_checkpoint: Path):
    from atssdet.zoo import load

    return load(R18, weights=r18_checkpoint)


@pytest.fixture(scope="session")
def r18_model_mge(r18_checkpoint: Path):
    """The reference res18 with ``numerics="megengine"`` (MegEngine-rounded head GroupNorm)."""
    from atssdet.zoo import load

    return load(R18, weights=r18_checkpoint, overrides={"numerics": "megengine"})


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None):
    """Run ``python -m atssdet ARGS`` in a subprocess with this checkout importable."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "atssdet", *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
