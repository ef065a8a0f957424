"""Small file helpers shared by both stages, so that each exists once.

``file_sha256`` is the checksum recorded in manifests and store provenance for an input file (the facts
file of an edit, the corpus files and imported ``.npz`` of the statistics); it reads the file in 1 MiB
blocks, so a large corpus file never has to fit in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
