"""Issue 14, items 1 and 2: no command replaces the user's files, and a training folder has one owner.

One table of named cases, each run through ``atssdet.cli.main`` in the test's folder: the exit
code, the message (it names the path and the problem) and the folder's files before and after
(every file present before is byte-identical after, but for the command's own outputs that a
re-run, or ``--overwrite`` on request, replaces). A refused command writes nothing at all.
Training cases that need real training runs are in ``tests/test_train_ownership.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.cli import main
from tests.helpers import snapshot_files

FAST = ["--short-size", "64", "--max-size", "64", "--device", "cpu", "--no-progress"]
USER = b"the user's own file\n"


@dataclass
class Ctx:
    """What a case's set-up may use: the model file, and clean-ups run after the command."""

    model: str
    cleanups: list[Callable[[], None]]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "outputs" (item 1) or "training" (item 2)
    setup: Callable[[Ctx], list[str]]  # makes the files in the current folder, returns the argv
    code: int
    says: tuple[str, ...]  # in stderr when the command fails, else in stdout
    may_change: tuple[str, ...] = ()  # files the command may rewrite: its own outputs, or on --overwrite


def _image(path: str, seed: int = 0) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(path, np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return path


def _user(path: str, data: bytes = USER) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return path


def _video(path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"MJPG"), 5.0, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    return path


def _coco(path: str) -> str:
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    return _user(path, json.dumps(doc).encode())


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


# ------------------------------------------------------------------ outputs (item 1): refused


def predict_into_its_input_folder(ctx: Ctx) -> list[str]:
    _image("same/a.png")
    return ["predict", "same", "--weights", ctx.model, "--out", "same", *FAST]


def predict_video_beside_a_users_mp4(ctx: Ctx) -> list[str]:
    _video("vid/clip.avi")
    _user("vid/clip.mp4")
    return ["predict", "vid/clip.avi", "--weights", ctx.model, "--out", "vid", *FAST]


def predict_over_a_users_json(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _user("out/predictions.json")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST]


def predict_over_a_hard_link_of_the_input(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    Path("out").mkdir()
    os.link("imgs/a.png", "out/a.png")
    return ["predict", "imgs/a.png", "--weights", ctx.model, "--out", "out", "--overwrite", *FAST]


def predict_into_a_symlink_to_the_inputs(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    os.symlink("imgs", "link")
    return ["predict", "imgs/a.png", "--weights", ctx.model, "--out", "link", *FAST]


def predict_coco_over_a_users_skeleton(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _user("out/images_coco.json")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", "--coco", *FAST]


def predict_names_every_collision(ctx: Ctx) -> list[str]:
    for i, name in enumerate("abc"):
        _image(f"imgs/{name}.png", seed=i)
        _user(f"out/{name}.png")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST]


def predict_out_is_a_file(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _user("out.txt")
    return ["predict", "imgs/a.png", "--weights", ctx.model, "--out", "out.txt", *FAST]


def predict_after_the_user_edited_its_output(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _run(["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST])
    with open("out/predictions.json", "a") as f:  # the user's notes: now the user's file
        f.write("\n")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST]


def data_check_json_over_its_input(ctx: Ctx) -> list[str]:
    _coco("a.json")
    return ["data", "check", "a.json", "--json", "a.json", "--no-progress"]


def data_check_json_over_a_users_file(ctx: Ctx) -> list[str]:
    _coco("a.json")
    _user("report.json")
    return ["data", "check", "a.json", "--json", "report.json", "--no-progress"]


def eval_out_is_its_annotations(ctx: Ctx) -> list[str]:
    _coco("v.json")
    _image("imgs/a.png")
    return [
        "eval",
        "--weights",
        ctx.model,
        "--data",
        "v.json",
        "--images",
        "imgs",
        "--out",
        "v.json",
        "--device",
        "cpu",
    ]


def eval_over_a_users_metrics(ctx: Ctx) -> list[str]:
    _coco("v.json")
    _image("imgs/a.png")
    _user("r.metrics.json")
    return ["eval", "--weights", ctx.model, "--data", "v.json", "--images", "imgs", "--out", "r.results.json"]


def convert_onto_its_source(ctx: Ctx) -> list[str]:
    _user("x.pkl.gz", b"\x1f\x8b not read")
    return ["convert", "x.pkl.gz", "x.pkl.gz", "--model", "atss_res18_coco_3x_800size"]


def convert_over_a_users_file(ctx: Ctx) -> list[str]:
    _user("x.pkl.gz", b"\x1f\x8b not read")
    _user("r18.safetensors")
    return ["convert", "x.pkl.gz", "r18.safetensors", "--model", "atss_res18_coco_3x_800size"]


def export_onto_its_weights(ctx: Ctx) -> list[str]:
    _user("w.safetensors", b"not read")
    return ["export", "--weights", "w.safetensors", "--out", "w.safetensors"]


def export_over_a_users_file(ctx: Ctx) -> list[str]:
    _user("model.onnx")
    return ["export", "--weights", ctx.model, "--out", "model.onnx"]


def synth_over_a_users_image(ctx: Ctx) -> list[str]:
    _user("d/train/train_000001.png")
    return [
        "data",
        "synth",
        "--out",
        "d",
        "--num-train",
        "2",
        "--num-val",
        "1",
        "--image-size",
        "64",
        "--no-progress",
    ]


def demo_over_a_users_metrics(ctx: Ctx) -> list[str]:
    _user("d/metrics.json")
    return ["demo", "--quick", "--out", "d", "--device", "cpu", "--no-progress"]


# ------------------------------------------------------------------ outputs: what keeps working


def predict_rerun_replaces_only_its_own_files(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _run(["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST])
    _user("out/notes.txt")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", *FAST]


def predict_overwrite_replaces_on_request(ctx: Ctx) -> list[str]:
    _image("imgs/a.png")
    _user("out/a.png")
    return ["predict", "imgs", "--weights", ctx.model, "--out", "out", "--overwrite", *FAST]


def data_check_rerun(ctx: Ctx) -> list[str]:
    _coco("a.json")
    _run(["data", "check", "a.json", "--json", "report.json", "--no-progress"])
    return ["data", "check", "a.json", "--json", "report.json", "--no-progress"]


def synth_regenerates_its_own_files_only(ctx: Ctx) -> list[str]:
    args = ["data", "synth", "--out", "d", "--num-val", "1", "--image-size", "64", "--no-progress"]
    _run([*args, "--num-train", "2"])
    _user("d/train/train_000007.png")  # the user's file, in synth's name pattern: not a leftover to delete
    return [*args, "--num-train", "1", "--force"]


def table_writes_nothing(ctx: Ctx) -> list[str]:
    stats = {n: 0.5 for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    stats |= {n: 0.5 for n in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")}
    _user("a.metrics.json", json.dumps({"stats": stats}).encode())
    return ["table", "a.metrics.json"]


# ------------------------------------------------------------------ training folders (item 2)


def _train_args(out: str) -> list[str]:
    _coco("ann.json")
    _image("imgs/a.png")
    return [
        "train",
        "--data",
        "ann.json",
        "--images",
        "imgs",
        "--out",
        out,
        "--device",
        "cpu",
        "--no-progress",
    ]


def train_into_a_finished_runs_folder(ctx: Ctx) -> list[str]:
    _user("run/iter_00000010.pt")
    _user("run/model_final.safetensors")
    return _train_args("run")


def train_while_another_run_holds_the_folder(ctx: Ctx) -> list[str]:
    from atssdet.fileio import hold_lock

    lock = hold_lock("run/.run.lock", {"pid": 4242, "host": "gpu-node-7", "started": "2025-01-02T03:04:05"})
    assert lock is not None
    ctx.cleanups.append(lock.release)
    return _train_args("run")


def train_out_is_a_file(ctx: Ctx) -> list[str]:
    _user("run")
    return _train_args("run")


def train_resume_auto_over_another_runs_files(ctx: Ctx) -> list[str]:
    """Its only checkpoint is unusable, so ``--resume auto`` would start a new run over the final weights."""
    _user("run/iter_00000010.pt", b"truncated")
    _user("run/model_final.safetensors")
    return [*_train_args("run"), "--resume", "auto", "--data-check", "off"]


CASES = [
    Case("predict_into_its_input_folder", "outputs", predict_into_its_input_folder, 2,
         ("same/a.png (the input same/a.png)", "would replace the command's own input")),
    Case("predict_video_beside_a_users_mp4", "outputs", predict_video_beside_a_users_mp4, 2,
         ("vid/clip.mp4", "not written by atssdet predict would be replaced", "--overwrite")),
    Case("predict_over_a_users_json", "outputs", predict_over_a_users_json, 2,
         ("1 existing file not written by atssdet predict would be replaced: out/predictions.json",)),
    Case("predict_over_a_hard_link_of_the_input", "outputs", predict_over_a_hard_link_of_the_input, 2,
         ("out/a.png (the input imgs/a.png)", "would replace the command's own input")),
    Case("predict_into_a_symlink_to_the_inputs", "outputs", predict_into_a_symlink_to_the_inputs, 2,
         ("link/a.png (the input imgs/a.png)",)),
    Case("predict_coco_over_a_users_skeleton", "outputs", predict_coco_over_a_users_skeleton, 2,
         ("out/images_coco.json", "not written by atssdet predict")),
    Case("predict_names_every_collision", "outputs", predict_names_every_collision, 2,
         ("3 existing files not written by atssdet predict would be replaced: out/a.png, out/b.png, out/c.png",)),
    Case("predict_out_is_a_file", "outputs", predict_out_is_a_file, 2,
         ("out.txt: exists and is a file, not a folder",)),
    Case("predict_after_the_user_edited_its_output", "outputs", predict_after_the_user_edited_its_output, 2,
         ("out/predictions.json", "not written by atssdet predict")),
    Case("data_check_json_over_its_input", "outputs", data_check_json_over_its_input, 2,
         ("a.json (the input a.json)", "would replace the command's own input")),
    Case("data_check_json_over_a_users_file", "outputs", data_check_json_over_a_users_file, 2,
         ("report.json", "not written by atssdet data check")),
    Case("eval_out_is_its_annotations", "outputs", eval_out_is_its_annotations, 2,
         ("v.json (the input v.json)",)),
    Case("eval_over_a_users_metrics", "outputs", eval_over_a_users_metrics, 2,
         ("r.metrics.json", "not written by atssdet eval")),
    Case("convert_onto_its_source", "outputs", convert_onto_its_source, 2,
         ("x.pkl.gz (the input x.pkl.gz)",)),
    Case("convert_over_a_users_file", "outputs", convert_over_a_users_file, 2,
         ("r18.safetensors", "not written by atssdet convert")),
    Case("export_onto_its_weights", "outputs", export_onto_its_weights, 2,
         ("w.safetensors (the input w.safetensors)",)),
    Case("export_over_a_users_file", "outputs", export_over_a_users_file, 2,
         ("model.onnx", "not written by atssdet export")),
    Case("synth_over_a_users_image", "outputs", synth_over_a_users_image, 2,
         ("d/train/train_000001.png", "not written by atssdet data synth")),
    Case("demo_over_a_users_metrics", "outputs", demo_over_a_users_metrics, 2,
         ("d/metrics.json", "not written by atssdet demo")),
    Case("predict_rerun_replaces_only_its_own_files", "outputs", predict_rerun_replaces_only_its_own_files, 0,
         ("1 already recorded, skipped",),  # the re-run resumes (docs/scale.md): nothing left to do
         may_change=("out/a.png", "out/predictions.json", "out/predictions.jsonl", "out/predictions.parts.json")),
    Case("predict_overwrite_replaces_on_request", "outputs", predict_overwrite_replaces_on_request, 0,
         ("1 image(s) done",), may_change=("out/a.png",)),
    Case("data_check_rerun", "outputs", data_check_rerun, 0, ("wrote report.json",), may_change=("report.json",)),
    Case("synth_regenerates_its_own_files_only", "outputs", synth_regenerates_its_own_files_only, 0,
         ("wrote 1 train images",),
         may_change=tuple(f"d/{n}" for n in ("synth_manifest.json", "annotations/instances_train.json",
                                            "annotations/instances_val.json", "train/train_000001.png",
                                            "train/train_000002.png", "val/val_000001.png"))),
    Case("table_writes_nothing", "outputs", table_writes_nothing, 0, ("AP",)),
    Case("train_into_a_finished_runs_folder", "training", train_into_a_finished_runs_folder, 2,
         ("run: holds another training run's files (iter_00000010.pt, model_final.safetensors)",
          "--resume auto", "--overwrite")),
    Case("train_while_another_run_holds_the_folder", "training", train_while_another_run_holds_the_folder, 2,
         ("run: another training run is using this folder: pid 4242 on gpu-node-7, started 2025-01-02T03:04:05",)),
    Case("train_out_is_a_file", "training", train_out_is_a_file, 2, ("run: exists and is a file, not a folder",)),
    Case("train_resume_auto_over_another_runs_files", "training", train_resume_auto_over_another_runs_files, 2,
         ("run: --resume auto found no usable checkpoint of its run, and the folder holds another training "
          "run's files (iter_00000010.pt, model_final.safetensors)", "--overwrite")),
]  # fmt: skip


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small random detector (the demo's architecture) as .safetensors with its config."""
    import torch

    from atssdet.config import DEMO_PRESETS
    from atssdet.convert import save_safetensors
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    cfg = DEMO_PRESETS["atss_demo_cpu"]
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(save_safetensors(build_model(cfg).state_dict(), path, cfg=cfg))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_command_replaces_the_users_files(case: Case, model_file: str, tmp_path: Path, capsys) -> None:
    ctx = Ctx(model_file, [])
    try:
        argv = case.setup(ctx)
        capsys.readouterr()
        before = snapshot_files(tmp_path)
        code = main(argv)
        captured = capsys.readouterr()
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    assert code == case.code, captured.err[-3000:]
    text = captured.err if code else captured.out
    for fragment in case.says:
        assert fragment in text, (fragment, text[-3000:])
    if code:
        assert f"atssdet {argv[0]}: error: " in captured.err, captured.err
    after = snapshot_files(tmp_path)
    changed = {path for path, digest in before.items() if after.get(path) != digest}
    assert changed <= set(case.may_change), sorted(changed)
    if code:  # refused before any work: nothing written (but a training folder's lock file)
        assert after == before | {
            p: d for p, d in after.items() if p.endswith(".run.lock") and p not in before
        }


def test_the_table_has_enough_cases_of_each_kind() -> None:
    kinds = [c.kind for c in CASES]
    assert kinds.count("outputs") >= 12 and len({c.name for c in CASES}) == len(CASES)


def test_marks_survive_rename_and_change_with_the_file(tmp_path: Path) -> None:
    """The written-by mark: set by the writer, gone when the file is replaced or edited; the marks
    file of a folder without extended attributes works the same."""
    from atssdet import fileio

    path = fileio.atomic_write_text(tmp_path / "r.json", "{}", mark="eval")
    assert fileio.written_by(path) == "eval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # nothing beside it
    path.write_text("{} ")  # edited in place by the user
    assert fileio.written_by(path) is None
    (tmp_path / "u.json").write_text("{}")
    assert fileio.written_by(tmp_path / "u.json") is None and fileio.written_by(tmp_path / "none") is None


def test_marks_file_where_there_are_no_extended_attributes(tmp_path: Path, monkeypatch) -> None:
    from atssdet import fileio

    def unsupported(*args: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    path = fileio.atomic_write_text(tmp_path / "a.png", "x", mark="predict")
    fileio.mark_written(fileio.atomic_write_text(tmp_path / "b.png", "y"), "predict")
    assert fileio.written_by(path) == "predict" and fileio.written_by(tmp_path / "b.png") == "predict"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fileio.MARKS_FILE, "a.png", "b.png"]
    (tmp_path / "a.png").write_text("user")
    assert fileio.written_by(path) is None


def test_temp_names_are_told_from_the_users_files() -> None:
    from atssdet.fileio import temp_target

    assert temp_target(".iter_00000004.pt.ab1_cd9z.tmp") == "iter_00000004.pt"
    assert temp_target(".last.pt.12345.tmp") == "last.pt"
    assert temp_target(".clip.detections.jsonl.x8y7z6w5.jsonl") == "clip.detections.jsonl"
    for user in (".notes.tmp", "notes.abcdefgh.tmp", ".draft.tmp", ".a.b.tmp"):
        assert temp_target(user) is None, user


def test_lock_file_excludes_a_second_holder_and_tells_who_holds_it(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl

    from atssdet.fileio import hold_lock, read_lock_info

    first = hold_lock(tmp_path / ".run.lock", {"pid": 1})
    assert first is not None and first.locked
    assert hold_lock(tmp_path / ".run.lock", {"pid": 2}) is None  # another open file: refused at once
    assert read_lock_info(tmp_path / ".run.lock") == {"pid": 1}
    first.release()
    again = hold_lock(tmp_path / ".run.lock", {"pid": 3})
    assert again is not None and read_lock_info(tmp_path / ".run.lock") == {"pid": 3}
    again.release()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # e.g. a network file system without a lock manager
    unlocked = hold_lock(tmp_path / ".run.lock", {"pid": 4})
    assert unlocked is not None and not unlocked.locked
    unlocked.release()
