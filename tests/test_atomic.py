"""Folders written whole (pipeline/atomic.py): a reader sees the old folder or the new one, never half of
either; a writer that fails leaves the old folder as it was and nothing temporary beside it."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from covedit.pipeline.atomic import replace_folder
from covedit.pipeline.errors import CannotWrite


def writes(files: dict[str, str]):
    """A writer that fills the folder it is given with these files."""
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    return fill


def listing(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


OLD = {"keep.txt": "mine", "sub/notes.txt": "also mine"}


@pytest.fixture
def old(tmp_path) -> Path:
    """An existing output folder holding OLD (a file and a subfolder)."""
    target = tmp_path / "out"
    target.mkdir()
    writes(OLD)(target)
    return target


def test_a_new_folder_appears_whole_with_ordinary_permissions(tmp_path):
    target = tmp_path / "deep" / "out"
    replace_folder(target, writes({"a.txt": "1", "b/c.txt": "2"}), "the thing")
    assert listing(target) == {"a.txt": "1", "b/c.txt": "2"}
    assert os.listdir(target.parent) == ["out"]  # nothing temporary beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0o700


def test_an_existing_folder_is_replaced_not_merged(old, tmp_path):
    replace_folder(old, writes({"new.txt": "new"}), "the thing")
    assert listing(old) == {"new.txt": "new"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_writer_that_raises_leaves_the_old_folder_intact(old, tmp_path):
    def fail(folder: Path) -> None:
        (folder / "keep.txt").write_text("half written")
        raise ValueError("the writer failed")

    assert listing(old) == OLD
    with pytest.raises(ValueError, match="the writer failed"):  # not an OSError: raised as it is
        replace_folder(old, fail, "the thing")
    assert listing(old) == OLD
    assert os.listdir(tmp_path) == ["out"]


def test_an_os_error_while_writing_is_cannot_write_naming_what_and_where(tmp_path):
    def disk_full(folder: Path) -> None:
        (folder / "big.bin").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out"
    with pytest.raises(CannotWrite) as e:
        replace_folder(target, disk_full, "the edited model")
    assert str(e.value) == f"Cannot write the edited model to {target}: No space left on device."
    assert e.value.exit_code == 73
    assert os.listdir(tmp_path) == []


def test_an_interrupt_while_writing_over_a_folder_cleans_up_and_propagates(old, tmp_path):
    def ctrl_c(folder: Path) -> None:
        (folder / "part.txt").write_text("part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_folder(old, ctrl_c, "the thing")
    assert listing(old) == OLD
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_final_rename_puts_the_old_folder_back(old, tmp_path, monkeypatch):
    """The old folder is moved aside before the new one is renamed into place: if that rename fails, the
    old one goes back where it was."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == old and ".tmp-" in Path(src).name:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CannotWrite, match=re.escape(f"to {old}: Invalid cross-device link.")):
        replace_folder(old, writes({"new.txt": "new"}), "the thing")
    monkeypatch.undo()
    assert listing(old) == OLD
    assert os.listdir(tmp_path) == ["out"]


def test_a_parent_that_is_a_file_is_refused_before_the_writer_runs(tmp_path):
    (tmp_path / "a-file").write_text("x")
    ran = []
    with pytest.raises(CannotWrite, match=re.escape(f"Cannot write the thing to {tmp_path / 'a-file' / 'out'}: ")):
        replace_folder(tmp_path / "a-file" / "out", ran.append, "the thing")
    assert ran == [] and os.listdir(tmp_path) == ["a-file"]
