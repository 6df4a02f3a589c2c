"""Files that other processes read while they are being written (markers, manifests, results)."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import warnings
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


def checkpoint_paths(run_dir: Path):
    """(the checkpoint a training resumes from, the trained model's) of a run directory."""
    ckpt = Path(run_dir) / "checkpoints"
    return ckpt / "latest.pt", ckpt / "final.pt"


def final_checkpoint(run_dir: Path) -> Path:
    return checkpoint_paths(run_dir)[1]


SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of an MLflow sqlite URI (None for another store, a tracking server)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def _under(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


def moved_with(path: str, folder: str, to) -> str:
    """`path` where it is once `folder` is at `to`, if it is under `folder`; else `path` as it is."""
    return str(Path(to) / os.path.relpath(path, folder)) if _under(path, folder) else path


def read_manifest_file(sweep_dir) -> dict:
    """The contents of a sweep directory's manifest.json, as recorded; FileNotFoundError where it has none, naming
    the sweeps under it if it holds some (`outputs/` or `outputs/sweeps/` given for one of them)."""
    folder = Path(sweep_dir)
    path = folder / "manifest.json"
    if not path.is_file():
        found = sorted(str(p.parent) for pattern in ("*/manifest.json", "sweeps/*/manifest.json")
                       for p in folder.glob(pattern))
        listed = f" (the sweeps under it: {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
        raise FileNotFoundError(f"{folder} is not a sweep directory: it has no manifest.json{listed}")
    return json.loads(path.read_text())


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


# where MLflow's sqlite schema keeps the artifact locations: (table, key, column)
ARTIFACT_COLUMNS = (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri"))


def relocate_artifacts(uri: str, made: str, here) -> int:
    """Point the artifact locations under `made` (the sweep's folder where it was made) in the sqlite MLflow store
    at `uri` to the same places under `here` (where the sweep is now), so that the MLflow UI of a copied sweep shows
    its own mask pictures and report. MLflow has no call that moves them. Returns the rows changed; a store that
    cannot be written (a read-only copy) is left as it is, with a warning."""
    store = sqlite_path(uri)
    if store is None or not store.is_file():
        return 0
    old, new = Path(made).as_uri(), Path(here).as_uri()
    changed = 0
    try:
        with contextlib.closing(sqlite3.connect(store, timeout=30)) as db, db:
            for table, key, column in ARTIFACT_COLUMNS:
                for row_key, location in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                    if location and (location == old or location.startswith(old + "/")):
                        db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                                   (new + location[len(old):], row_key))
                        changed += 1
    except sqlite3.Error as exc:
        warnings.warn(f"the MLflow store {store} still points at the artifacts in {made}: {exc}")
        return 0
    return changed
