from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference" / "megengine"
R18 = "atss_res18_coco_3x_800size"


# End-to-end modules (training runs, subprocesses, torchrun, exports, browser, whole-model parity):
# marked `slow`, so `make test-fast` (pytest -m "not slow") runs the unit tests alone.
SLOW_MODULES = frozenset(
    {
        "test_benchmarks_start", "test_criterion", "test_demo", "test_deploy", "test_distributed_eval",
        "test_export", "test_fuzz", "test_openvino", "test_parity", "test_predict_ray", "test_predict_stream",
        "test_predict_torchrun", "test_serve", "test_serve_browser", "test_train", "test_train_crash",
        "test_train_distributed", "test_train_ownership", "test_formats", "test_loggers", "test_report_page",
        "test_slicing_cli", "test_formats_labelstudio",
    }
)  # fmt: skip


def _module_name(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow modules, and run them first (stable: a module's tests stay together, in order),
    so that with ``pytest -n N --dist loadfile`` (``make pytest``) the long files start at once and
    the short ones fill in after them, instead of one long file running alone at the end."""
    for item in items:
        if _module_name(item) in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    slow = {_module_name(item) for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: _module_name(item) not in slow)  # also the modules marking their own


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each of the N workers gets cores / N intra-op threads (and so do the
    processes its tests start, through OMP_NUM_THREADS): N processes with every core each would
    oversubscribe the machine (OpenMP teams spinning; a 1 s test took 50 s at load 10). Modules
    that need a given thread count set it themselves (test_criterion, ``one_torch_thread``)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_SCRATCH = {
    ".git",
    ".venv",
    ".hypothesis",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
}


def _checkout_files() -> set[str]:
    """Every file of the checkout except VCS/venv/cache folders (what a test could leave behind)."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in _SCRATCH and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, f), REPO_ROOT) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone():
    """Tests write only under their own temporary folders: fail the session if one wrote into the checkout."""
    before = _checkout_files()
    yield
    added = sorted(_checkout_files() - before)
    assert not added, f"tests wrote into the checkout (write under tmp_path instead): {added[:10]}"


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own temporary folder, so relative default outputs (runs/...) land there."""
    monkeypatch.chdir(tmp_path)


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
    from atssdet.loader import load

    return load(R18, weights=r18_checkpoint)


@pytest.fixture(scope="session")
def r18_model_mge(r18_checkpoint: Path):
    """The reference res18 with ``numerics="megengine"`` (MegEngine-rounded head GroupNorm)."""
    from atssdet.loader import load

    return load(R18, weights=r18_checkpoint, overrides={"numerics": "megengine"})


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None):
    """Run ``python -m atssdet ARGS`` in a subprocess with this checkout importable (in the current
    folder, the test's tmp_path unless ``cwd`` is given)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "atssdet", *args],
        cwd=cwd or Path.cwd(),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
