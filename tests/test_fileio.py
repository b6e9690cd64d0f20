"""Atomic writes: whole files or nothing, no temp files left behind, hard links for last.pt."""

from __future__ import annotations

import pytest

from atssdet.fileio import atomic_copy, atomic_link, atomic_path, atomic_write_json


def test_atomic_path_leaves_the_old_file_on_error(tmp_path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_copy_and_link(tmp_path) -> None:
    src = tmp_path / "iter_1.pt"
    src.write_bytes(b"one")
    copy = atomic_copy(src, tmp_path / "sub" / "copy.pt")
    assert copy.read_bytes() == b"one" and not copy.samefile(src)
    last = atomic_link(src, tmp_path / "last.pt", sync_dir=True)
    assert last.samefile(src)
    newer = tmp_path / "iter_2.pt"
    newer.write_bytes(b"two")
    atomic_link(newer, last)  # replaces the old link
    assert last.samefile(newer) and src.read_bytes() == b"one"
    assert not list(tmp_path.glob(".*.tmp"))
