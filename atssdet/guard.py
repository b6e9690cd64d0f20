"""The output guard: what a command may write, decided before it starts.

Every command that writes builds one :class:`OutputGuard` with its name, its inputs and the user's
``--overwrite``, and calls :meth:`OutputGuard.check` on the paths it plans to write before any work
(before a model loads or an image is read). The check refuses, in one :class:`OutputError` that
names every offending path:

- an output that is one of the command's inputs, also through a symlink or a hard link
  (``predict same --out same``, ``data check a.json --json a.json``); ``--overwrite`` does not
  change this;
- an output that is a folder, or lies below a file;
- an existing file that this command did not write, unless ``overwrite``. "Written by this
  command" is the written-by mark of :mod:`atssdet.fileio`: the command's writers pass
  ``mark=guard.command``, so a re-run into the same folder replaces its own earlier outputs
  without ``--overwrite``, and a file the user put there or edited since is never replaced.

:meth:`OutputGuard.may_delete` answers the same question for clean-ups (stale files of an earlier
run): only the command's own files are ever deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atssdet.errors import AtssdetError
from atssdet.fileio import written_by


class OutputError(AtssdetError):
    """A planned output the command must not write; the message names each path and why."""


@dataclass(frozen=True)
class OutputGuard:
    """The outputs a command may write: see the module docstring.

    ``command`` is the mark the command's files carry (``"predict"``, ``"eval"``, ...);
    ``replaces`` names other commands whose files this one may replace as well (the demo's own
    steps: the evaluation it runs writes with ``eval``'s mark).
    """

    command: str
    inputs: Sequence[str | os.PathLike[str]] = ()
    overwrite: bool = False
    replaces: frozenset[str] = field(default_factory=frozenset)

    def owns(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` carries this command's mark (or one of ``replaces``) and is unchanged since."""
        return written_by(path) in {self.command, *self.replaces}

    def may_delete(self, path: str | os.PathLike[str]) -> bool:
        """A clean-up may delete ``path`` only when it is the command's own file (never with ``overwrite`` alone)."""
        return self.owns(path) and not self._input_ids().intersection(_file_ids([path]))

    def check(self, outputs: Iterable[str | os.PathLike[str]]) -> None:
        """Raise :class:`OutputError` naming every planned output that must not be written."""
        input_names = {
            ident: str(p) for p in reversed(self.inputs) if (ident := _file_id(Path(p))) is not None
        }
        inputs = set(input_names)
        same_as_input: list[str] = []
        not_files: list[str] = []
        foreign: list[str] = []
        for out in dict.fromkeys(Path(p) for p in outputs):
            ident = _file_id(out)
            if out.is_dir():
                not_files.append(f"{out}: is a folder, not a file")
            elif ident is not None and ident in inputs:
                same_as_input.append(f"{out} (the input {input_names.get(ident, out)})")
            elif ident is None and (blocker := _file_above(out)) is not None:
                # the output folder itself once; a file further up for each output below it
                problem = (
                    f"{blocker}: exists and is a file, not a folder"
                    if blocker == out.parent
                    else f"{out} cannot be created: {blocker} is a file, not a folder"
                )
                not_files += [problem] if problem not in not_files else []
            elif ident is not None and not self.overwrite and not self.owns(out):
                foreign.append(str(out))
        problems = []
        if same_as_input:
            problems.append(
                f"{_count(same_as_input, 'output')} would replace the command's own input: "
                f"{_names(same_as_input)}; choose another output path"
            )
        if not_files:
            problems.append(_names(not_files))
        if foreign:
            problems.append(
                f"{_count(foreign, 'existing file')} not written by atssdet {self.command} would be "
                f"replaced: {_names(foreign)}; pass --overwrite to replace them, or choose another output path"
            )
        if problems:
            raise OutputError("; ".join(problems))

    def _input_ids(self) -> set[tuple[int, int]]:
        return _file_ids(self.inputs)


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` resolves to (symlinks followed); None if nothing is there."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _file_ids(paths: Iterable[str | os.PathLike[str]]) -> set[tuple[int, int]]:
    return {ident for p in paths if (ident := _file_id(Path(p))) is not None}


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (so ``path`` cannot be created)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _count(items: Sequence[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _names(items: Sequence[str]) -> str:
    return ", ".join(items)  # every one: the user must see all that is in the way at once
