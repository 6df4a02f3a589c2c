"""A sweep on disk: points, run directories, per-stage state markers and manifest.json.

A run directory is a pure function of the sweep directory and the point's overrides, so a requeued or
resubmitted task finds its own checkpoints, results and MLflow run id.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from clustermask.files import moved_with, read_manifest_file, relocate_artifacts, where_the_sweep_is, write_atomic

STAGES = ("train", "eval")
NOT_POINT_KEYS = ("launcher", "experiment", "sweep_name", "paths", "plugins", "hydra")
# the config sections that say how a point's checkpoint was trained, less the key in them only evaluations read
TRAINING_SECTIONS = ("model", "masking", "train", "data")
READ_BY_EVALUATION_ONLY = "data.eval_root"


@dataclass
class Point:
    index: int
    name: str
    overrides: List[str]
    run_dir: str
    mlflow_run_id: str = ""


@dataclass
class Manifest:
    sweep_id: str
    sweep_dir: str
    created: str
    executor: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    points: List[Point]
    submissions: List[Dict] = field(default_factory=list)
    config_folders: List[str] = field(default_factory=list)  # the sweep's hydra.searchpath folders
    made_at = ""  # where the manifest says the sweep was made, if it has moved since (not saved: not a field)

    @property
    def path(self) -> Path:
        return Path(self.sweep_dir) / "manifest.json"

    def save(self) -> None:
        write_atomic(self.path, json.dumps(asdict(self), indent=1))

    def record(self, submission: Dict) -> None:
        """An executor's submission record, appended and saved."""
        self.submissions.append(submission)
        self.save()

    @classmethod
    def load(cls, sweep_dir) -> "Manifest":
        recorded = read_manifest_file(sweep_dir)
        data = where_the_sweep_is(recorded, Path(sweep_dir))
        if data["tracking_uri"] != recorded["tracking_uri"]:  # moved with its own store: its artifacts too
            relocate_artifacts(data["tracking_uri"], recorded["sweep_dir"], data["sweep_dir"])
        data["points"] = [Point(**p) for p in data["points"]]
        manifest = cls(**data)
        if data["sweep_dir"] != recorded["sweep_dir"]:
            manifest.made_at = recorded["sweep_dir"]
        return manifest

    def where_now(self, path: str) -> str:
        """A path that a task recorded (its log), where it is now that the sweep has moved."""
        return moved_with(path, self.made_at, self.sweep_dir) if self.made_at and path else path

    def report_job(self) -> Optional[str]:
        """The report job of the newest submission that had one."""
        jobs = [submission["report"]["job_id"] for submission in self.submissions if "report" in submission]
        return jobs[-1] if jobs else None

    def latest_jobs(self, index: int) -> Dict[str, str]:
        """stage -> job id of the newest submission that included this point (e.g. {'train': '12_3'})."""
        jobs = {}
        for submission in self.submissions:
            for stage in ("train", "eval"):
                for group in submission.get(stage, []):
                    if index in group["points"]:
                        position = group["points"].index(index)
                        jobs[stage] = group["task_ids"][position]
            if "report" in submission:
                jobs["report"] = submission["report"]["job_id"]
        return jobs


def override_key(override: str) -> str:
    """`masking.ratio` of `masking.ratio=0.3`, `+masking.x=1` or `~masking.x`."""
    return override.split("=", 1)[0].lstrip("+~")


def section_of(key: str, sections: Iterable[str]) -> Optional[str]:
    """The one of `sections` that `key` is or is under (`launcher` for `launcher.train.mem_gb`), else None."""
    return next((section for section in sections if key == section or key.startswith(section + ".")), None)


def is_point_override(override: str) -> bool:
    return section_of(override_key(override), NOT_POINT_KEYS) is None


def point_overrides(task_overrides: List[str]) -> List[str]:
    return sorted(o for o in task_overrides if is_point_override(o))


def safe_name(text: str, limit: int = 60) -> str:
    """Letters, digits, '.', '_' and '-' only: safe in paths, job names and shells."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:limit] or "point"


def varying_keys(points_overrides: List[List[str]]) -> List[str]:
    """Override keys whose value differs between the points of a sweep (what names should show)."""
    keyed = [dict(o.lstrip("+~").partition("=")[::2] for o in overrides) for overrides in points_overrides]
    keys = set().union(*keyed) if keyed else set()
    return sorted(k for k in keys if len({d.get(k) for d in keyed}) > 1)


def point_name(overrides: List[str], shown: Optional[List[str]] = None) -> str:
    """Readable part (the shown keys, by default all) + a hash of every override: pure in the overrides."""
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    pairs = [o.lstrip("+~").partition("=") for o in overrides]
    readable = "_".join(f"{k.split('.')[-1]}-{v}" for k, _, v in pairs if shown is None or k in shown)
    return f"{safe_name(readable, 48)}-{digest}"


def run_dir_for(sweep_dir: Path, overrides: List[str], shown: Optional[List[str]] = None) -> Path:
    return Path(sweep_dir).resolve() / "points" / point_name(overrides, shown)


def run_dirs(sweep_dir: Path, points_overrides: List[List[str]]) -> List[Path]:
    """Run directory of every point of a sweep, named by what varies between them."""
    shown = varying_keys(points_overrides)
    return [run_dir_for(sweep_dir, overrides, shown) for overrides in points_overrides]


def new_sweep_id(name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{safe_name(name, 40)}-{stamp}-{os.urandom(3).hex()}"


# ---------------------------------------------------------------- per-point config and state


def save_point_config(run_dir: Path, cfg) -> None:
    """cfg: the point's resolved config (a dict or a DictConfig). PyYAML's C dumper on the plain dict: a
    64-point sweep writes its configs in milliseconds instead of seconds through OmegaConf.to_yaml."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    write_atomic(run_dir / "config.yaml", yaml.dump(cfg, Dumper=dumper, sort_keys=False, allow_unicode=True))


def _path_settings(cfg) -> Iterator[tuple]:
    """(section, key) of each setting of a point's config that names a file or folder."""
    from clustermask.plugins import is_file

    yield from ((cfg["paths"], "root"), (cfg["paths"], "data"), (cfg["data"], "train_shards"),
                (cfg["data"], "eval_root"))
    yield from ((task, "root") for task in cfg["eval"]["tasks"])
    plugins = cfg.get("plugins") or []  # none in a sweep made before they were
    yield from ((plugins, i) for i, entry in enumerate(plugins) if is_file(entry))


def pinned_path(value, base: Path):
    """`value` made absolute against `base` if it is a relative path (not a URL, `pipe:` or `???`); each of the
    sources of `data.train_shards=a::b`."""
    if isinstance(value, str) and "::" in value:
        return "::".join(pinned_path(source, base) for source in value.split("::"))
    if not isinstance(value, str) or not value or value == "???" or ":" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base, value))


def pin_relative_paths(cfg, base: Path) -> None:
    """Make a point's relative paths (`paths.*`, `data.train_shards`, `data.eval_root`, the evaluation tasks'
    roots, plugin files) absolute against `base`, the folder the command runs in, in place (a dict or a
    DictConfig). A job runs in its submission's copy of the code (launch/snapshot.py), and a resubmission may run
    from elsewhere: relative, they would name other data, or none."""
    for section, key in _path_settings(cfg):
        if not (isinstance(section, DictConfig) and OmegaConf.is_missing(section, key)):
            section[key] = pinned_path(section[key], base)


def plugin_files(manifest: "Manifest") -> List[Path]:
    """The plugin files (absolute, as pinned) in the saved configs of the sweep's points: what a submission copies
    with the code. The configs are read as YAML alone: a sweep of hundreds of points is submitted without waiting."""
    from clustermask.plugins import is_file

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    files = {}
    for point in manifest.points:
        config = Path(point.run_dir) / "config.yaml"
        entries = (yaml.load(config.read_text(), Loader=loader) or {}).get("plugins") if config.is_file() else None
        files.update((Path(entry), None) for entry in entries or [] if is_file(entry))
    return list(files)


def load_point_config(run_dir: Path):
    """The point's saved config merged onto the typed schema (a DictConfig; OmegaConf.to_object per stage)."""
    from .schema import Config

    schema = OmegaConf.structured(Config)
    return OmegaConf.merge(schema, OmegaConf.load(Path(run_dir) / "config.yaml"))


def state_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "status" / f"{stage}.json"


def mark(run_dir: Path, stage: str, state: str, **info) -> None:
    path = state_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"state": state, "time": dt.datetime.now().isoformat(timespec="seconds"), **info}
    write_atomic(path, json.dumps(record))


def read_state(run_dir: Path, stage: str) -> Optional[dict]:
    path = state_path(run_dir, stage)
    return json.loads(path.read_text()) if path.exists() else None


def this_process() -> dict:
    """Who writes a marker: a local task or sweep has no queue to ask whether it still runs."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def process_alive(record: dict) -> bool:
    """Whether the process a marker names (`this_process()`) still runs. One on another machine, or a marker
    without a pid, cannot be checked here and counts as alive."""
    if "pid" not in record or record.get("host") != socket.gethostname():
        return True
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie (killed, its parent gone too, not yet reaped) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): kill's answer stands
        return True


class SweepBusy(RuntimeError):
    """Another process is submitting the sweep's work."""


@contextmanager
def submitting(sweep_dir: Path) -> Iterator[None]:
    """This process alone plans and submits the sweep's work until the block ends: two resubmissions at once
    would each find the same points unfinished, and two jobs would train each into the same folder. A lock file
    left by a process that is gone (killed on this machine) is taken over."""
    path = Path(sweep_dir) / "status" / "submitting.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                text = path.read_text()
            except FileNotFoundError:  # released meanwhile
                continue
            try:
                holder = json.loads(text)
            except ValueError:  # empty, being written: alive; or cut short, which the message says to remove
                holder = {}
            if process_alive(holder):
                raise SweepBusy(f"another submission to {sweep_dir} is in progress (pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')}, since {holder.get('time', '?')}); wait for it (if that "
                                f"process is gone, remove {path}), nothing changed or submitted")
            path.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as out:
        json.dump({**this_process(), "time": dt.datetime.now().isoformat(timespec="seconds")}, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def local_executor_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "status" / "local_executor.json"


@contextmanager
def local_executor_running(sweep_dir: Path) -> Iterator[None]:
    """Marks the sweep as being run here by this process: until it ends, its stages not yet started are
    pending (queued behind the others); after, or once this process is killed, they will not run."""
    path = local_executor_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(this_process()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def local_executor_alive(sweep_dir: Path) -> bool:
    path = local_executor_path(sweep_dir)
    return path.exists() and process_alive(json.loads(path.read_text()))
