"""Files that other processes read while they are being written (markers, manifests, results)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def write_atomic(path: Path, text: str) -> None:
    """Readers (status, a requeued task) see the old file or the new one, never a half-written one; a failed
    write (disk full, quota) leaves the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of an MLflow sqlite URI (None for another store, a tracking server)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def _under(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


def moved_with(path: str, folder: str, to) -> str:
    """`path` where it is once `folder` is at `to`, if it is under `folder`; else `path` as it is."""
    return str(Path(to) / os.path.relpath(path, folder)) if _under(path, folder) else path


def where_the_sweep_is(manifest: dict, sweep_dir: Path) -> dict:
    """A sweep's manifest (manifest.json's contents) with its paths where the sweep directory is now.

    The manifest records where the sweep was made. A sweep copied or moved elsewhere (rsync'd from a cluster to a
    laptop) must read its own run directories and MLflow store: at the recorded place there may be none (MLflow
    would create an empty store there and the report would find no run) or the original's. Paths under the
    recorded sweep directory are moved with it; a tracking server's URI stays."""
    made, here = manifest["sweep_dir"], Path(sweep_dir).resolve()
    if os.path.exists(made) and os.path.samefile(made, here):
        return manifest

    uri, store = manifest["tracking_uri"], sqlite_path(manifest["tracking_uri"])
    if store is not None:
        uri = SQLITE + moved_with(str(store), made, here)
    points = [{**point, "run_dir": moved_with(point["run_dir"], made, here)} for point in manifest["points"]]
    return {**manifest, "sweep_dir": str(here), "tracking_uri": uri, "points": points}
