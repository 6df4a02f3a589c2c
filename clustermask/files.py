"""Files that other processes read while they are being written (markers, manifests, results)."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Readers (status, a requeued task) see the old file or the new one, never a half-written one; a failed
    write (disk full, quota) leaves the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
