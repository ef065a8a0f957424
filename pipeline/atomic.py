"""Write a whole folder so that readers see the old one or the new one, never half of either.

    replace_folder(out, lambda tmp: model.save_pretrained(tmp), "the edited model")

The folder is filled under a temporary name next to its destination (same file system, so the final rename
is atomic), then renamed into place; an existing folder is moved aside first and deleted only after the
rename worked, or put back if it did not. Any failure removes the temporary folder; an OSError becomes
CannotWrite. ``replace_file`` does the same for one file's text (``probe --write``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from covedit.pipeline.errors import CannotWrite


def replace_folder(target: Path, fill: Callable[[Path], None], what: str) -> None:
    target = Path(target).expanduser()
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise CannotWrite(f"Cannot write {what} to {target}: {e.strerror or e}.") from e
    aside: Path | None = None
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if existed:
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, aside / "old")
        os.replace(tmp, target)
    except BaseException as e:
        if aside is not None and (aside / "old").exists() and not target.exists():
            os.replace(aside / "old", target)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if isinstance(e, OSError):
            raise CannotWrite(f"Cannot write {what} to {target}: {e.strerror or e}.") from e
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def replace_file(target: Path, text: str, what: str) -> None:
    """Write ``text`` to the file ``target`` so that readers see the old file or the whole new one: written
    under a temporary name in the same folder, flushed to disk, then renamed into place. The folder must exist
    (a missing one is most often a typo: it is not created). Any failure removes the temporary file; an
    OSError becomes CannotWrite."""
    target = Path(target).expanduser()
    if not target.parent.is_dir():
        raise CannotWrite(f"Cannot write {what} to {target}: the folder {target.parent} does not exist.")
    if target.is_dir():
        raise CannotWrite(f"Cannot write {what} to {target}: it is a folder.")
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CannotWrite(f"Cannot write {what} to {target}: {e.strerror or e}.") from e
        raise
