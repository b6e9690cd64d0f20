"""Issue 14, item 2 and acceptance 3: a training folder has one owner, and a run touches only its own files.

A table of named cases on real (tiny, CPU) training runs through ``atssdet.cli.main``: exit code,
message (names the folder or file and the problem), and the folder's files before and after (what
the run may not touch stays byte-identical). Then two trainings into one folder as processes: the
second is refused at once naming the first's pid; after a SIGKILL of the first, ``--resume auto``
continues without any clean-up by hand. Cheaper refusals (lock held, a file as --out, ...) are in
``tests/test_reliability_outputs.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from atssdet.cli import main
from atssdet.training.checkpoint import list_checkpoints, load_checkpoint
from atssdet.training.ownership import LOCK_NAME, read_run_record
from tests.conftest import REPO_ROOT
from tests.helpers import snapshot_files
from tests.test_train import TINY_OVERRIDES, make_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_dataset(tmp_path_factory.mktemp("synth"), num_train=4, num_val=0)


def train_args(ds: Any, out: str, *extra: str, iters: int = 4, every: int = 2) -> list[str]:
    return [
        "train", "--model", "atss_res18_coco_3x_800size", "--data", str(ds.train_ann), "--images",
        str(ds.train_images), "--out", out, "--max-iters", str(iters), "--checkpoint-every", str(every),
        "--workers", "0", "--device", "cpu", "--no-progress", "--log-every", "1", "--data-check", "quick",
        *SETS, *extra,
    ]  # fmt: skip


def _train(ds: Any, out: str, *extra: str, **kw: int) -> None:
    assert main(train_args(ds, out, *extra, **kw)) == 0


def _names(folder: str) -> list[str]:
    return [p.name for p in list_checkpoints(folder)]


# Each set-up makes the folder's state with earlier runs and returns the argv of the command under test.


def new_run_into_a_finished_runs_folder(ds: Any) -> list[str]:
    _train(ds, "run")
    return train_args(ds, "run")


def overwrite_then_keep_prunes_only_its_own(ds: Any) -> list[str]:
    _train(ds, "run", iters=6)  # run A: iter 2, 4, 6
    return train_args(ds, "run", "--overwrite", "--keep-checkpoints", "1", iters=4, every=1)


def resume_auto_continues_its_own_run(ds: Any) -> list[str]:
    _train(ds, "run", iters=6)
    _train(ds, "run", "--overwrite", "--keep-checkpoints", "1", iters=4, every=1)  # run B over A
    return train_args(ds, "run", "--resume", "auto", iters=5, every=1)  # B's iter 4, not A's iter 6


def cleanup_spares_the_users_temp_files(ds: Any) -> list[str]:
    _train(ds, "run", iters=2)
    for name in (".notes.tmp", ".draft.abcdefgh.tmp", ".iter_00000004.pt.ab12cd34.tmp"):
        Path("run", name).write_bytes(b"temp\n")
    return train_args(ds, "run", "--resume", "auto", iters=3)


def legacy_checkpoint_without_run_id_resumes(ds: Any) -> list[str]:
    _train(ds, "new", iters=2)
    state = load_checkpoint("new/iter_00000002.pt")
    del state["run_id"]  # as written before run ids existed
    Path("legacy").mkdir()
    torch.save(state, "legacy/iter_00000002.pt")
    return train_args(ds, "legacy", "--resume", "auto", iters=3)


def resume_of_another_run_into_an_owned_folder(ds: Any) -> list[str]:
    _train(ds, "a", iters=2)
    _train(ds, "b", iters=2, every=1)
    return train_args(ds, "b", "--resume", "a/iter_00000002.pt", iters=3)


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Any], list[str]]
    code: int
    says: tuple[str, ...]  # stderr when refused, else stdout
    untouched: tuple[str, ...]  # must be byte-identical after (a refused command: every file)
    then: Callable[[], None] = lambda: None  # further checks of the folder


def _after_overwrite() -> None:
    assert _names("run") == ["iter_00000006.pt", "iter_00000004.pt"]  # A's 6 stays; B kept its newest
    assert read_run_record("run")["checkpoints"] == ["iter_00000004.pt"]  # type: ignore[index]
    assert (
        load_checkpoint("run/iter_00000004.pt")["run_id"] != load_checkpoint("run/iter_00000006.pt")["run_id"]
    )


def _after_resume() -> None:
    assert load_checkpoint("run/iter_00000005.pt")["run_id"] == read_run_record("run")["run_id"]  # type: ignore[index]


def _after_cleanup() -> None:
    assert not Path("run/.iter_00000004.pt.ab12cd34.tmp").exists()  # atssdet's own, left by a killed write


def _after_legacy() -> None:
    record = read_run_record("legacy")
    assert record is not None and record["checkpoints"] == ["iter_00000002.pt", "iter_00000003.pt"]
    assert load_checkpoint("legacy/iter_00000003.pt")["run_id"] == record["run_id"]


CASES = [
    Case("new_run_into_a_finished_runs_folder", new_run_into_a_finished_runs_folder, 2,
         ("run: holds another training run's files (iter_00000002.pt, iter_00000004.pt, last.pt, "
          "model_final.safetensors)", "--resume auto", "--overwrite"), untouched=("*",)),
    Case("overwrite_then_keep_prunes_only_its_own", overwrite_then_keep_prunes_only_its_own, 0,
         ("trained iterations 0..4",), untouched=("run/iter_00000006.pt",), then=_after_overwrite),
    Case("resume_auto_continues_its_own_run", resume_auto_continues_its_own_run, 0,
         ("trained iterations 4..5",), untouched=("run/iter_00000006.pt",), then=_after_resume),
    Case("cleanup_spares_the_users_temp_files", cleanup_spares_the_users_temp_files, 0,
         ("trained iterations 2..3",), untouched=("run/.notes.tmp", "run/.draft.abcdefgh.tmp", "run/iter_00000002.pt"),
         then=_after_cleanup),
    Case("legacy_checkpoint_without_run_id_resumes", legacy_checkpoint_without_run_id_resumes, 0,
         ("trained iterations 2..3",), untouched=("legacy/iter_00000002.pt",), then=_after_legacy),
    Case("resume_of_another_run_into_an_owned_folder", resume_of_another_run_into_an_owned_folder, 2,
         ("b: a/iter_00000002.pt continues another run, but the folder holds another training run's files",
          "--overwrite"), untouched=("*",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_run_touches_only_its_own_files(case: Case, dataset: Any, tmp_path: Path, capsys) -> None:
    argv = case.setup(dataset)
    capsys.readouterr()
    before = snapshot_files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == case.code, captured.err[-3000:]
    text = captured.err if code else captured.out
    for fragment in case.says:
        assert fragment in text, (fragment, text[-3000:])
    after = snapshot_files(tmp_path)
    # The lock file holds its holder's pid: whoever takes the lock rewrites it.
    keep = [p for p in before if not p.endswith(LOCK_NAME)] if case.untouched == ("*",) else case.untouched
    for path in keep:
        assert after.get(path) == before[path], path
    if code:
        assert f"atssdet train: error: {case.says[0]}" in captured.err
    case.then()


def test_the_table_has_enough_training_cases() -> None:
    from tests.test_reliability_outputs import CASES as OUTPUT_CASES

    assert len(CASES) + sum(c.kind == "training" for c in OUTPUT_CASES) >= 6


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not predicate():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_training_refused_naming_the_first_then_resume_after_sigkill(
    dataset: Any, tmp_path: Path
) -> None:
    """Acceptance 3. The first run is stopped (SIGSTOP) while it holds the folder, so that the files
    can be compared around the refused second run; then it is SIGKILLed and ``--resume auto`` runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "atssdet"]
    first = subprocess.Popen(
        [*command, *train_args(dataset, "run", iters=10_000, every=2)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: bool(list_checkpoints("run")), first, "the first checkpoint")
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot_files(tmp_path)
        second = subprocess.run(
            [*command, *train_args(dataset, "run", "--resume", "auto")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2, second.stderr
        assert (
            f"atssdet train: error: run: another training run is using this folder: pid {first.pid} on "
            in second.stderr
        )
        assert "wait for it to finish (or stop it), or train into another --out" in second.stderr
        assert snapshot_files(tmp_path) == before  # the second run wrote nothing, deleted nothing
        assert second.stdout == ""  # refused at once: no data check, no resume, no model
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    newest = list_checkpoints("run")[0]
    start = int(newest.stem.split("_")[1])
    third = subprocess.run(
        [*command, *train_args(dataset, "run", "--resume", "auto", iters=start + 1, every=2)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"trained iterations {start}..{start + 1}" in third.stdout
    assert load_checkpoint(f"run/iter_{start + 1:08d}.pt")["run_id"] == load_checkpoint(newest)["run_id"]
