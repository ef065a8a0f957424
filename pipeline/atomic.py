"""Write a whole folder so that readers see the old one or the new one, never half of either.

    replace_folder(out, lambda tmp: model.save_pretrained(tmp), "the edited model")

The folder is filled under a temporary name next to its destination (same file system, so the final rename
is atomic), then renamed into place; an existing folder is moved aside first and deleted only after the
rename worked, or put back if it did not. Any failure removes the temporary folder; an OSError becomes
CannotWrite.
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
