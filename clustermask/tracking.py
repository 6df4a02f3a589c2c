"""MLflow tracking: one experiment per sweep family, a parent run per sweep, a child run per point.

Everything goes through MlflowClient with explicit run ids (no global active run), so the launcher, the
training tasks and the evaluation tasks, in different processes, write to the same runs.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import TrackingConfig
from .files import SQLITE, sqlite_path

# compute nodes are often offline: no MLflow usage reports from our processes unless the user asks for them
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
MAX_PARAM_LENGTH = 6000
DEFAULT_EXPERIMENT_ID = 0  # the `Default` experiment every MLflow store has
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch


def resolve_uri(cfg: TrackingConfig, sweep_dir: Path) -> str:
    # MLflow 3 refuses the plain file store: sqlite is the local default
    if not cfg.uri:
        return f"{SQLITE}{Path(sweep_dir).resolve() / 'mlflow.db'}"
    store = sqlite_path(cfg.uri)
    # a relative sqlite path (`sqlite:///runs.db`) is pinned here: a job elsewhere would start an empty store
    return f"{SQLITE}{store.resolve()}" if store is not None and not store.is_absolute() else cfg.uri


def server_missing(uri: str, timeout_s: float = 10.0) -> Optional[str]:
    """For an http(s) tracking URI where nothing answers (connection refused, no such host, no answer in
    `timeout_s`): why, at once, where MLflow's client would retry for minutes. Any HTTP answer, even one that asks
    for a login, counts as a server."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:  # an answer
        return None
    except OSError as exc:  # URLError (refused, no such host) or a timeout
        return str(getattr(exc, "reason", exc))
    return None


def require_server(uri: str) -> None:
    """ConnectionError, in a line that says what to do, where nothing answers at an http(s) `uri`
    (`server_missing`)."""
    missing = server_missing(uri)
    if missing:
        raise ConnectionError(f"no MLflow server answers at the sweep's tracking URI {uri} ({missing}): start it")


def deleted_runs(uri: str, experiment: str, run_ids: Sequence[str]) -> List[str]:
    """Those of `run_ids` (in `experiment`) that were deleted (in the MLflow UI, say): MLflow refuses to log to them,
    and its searches leave them out."""
    from mlflow.entities import ViewType

    store = client(uri)
    found = store.get_experiment_by_name(experiment)
    if found is None or not run_ids:
        return []
    asked = ", ".join(f"'{run_id}'" for run_id in run_ids)
    deleted = {run.info.run_id for run in store.search_runs(
        [found.experiment_id], filter_string=f"attributes.run_id IN ({asked})", run_view_type=ViewType.DELETED_ONLY,
        max_results=len(run_ids))}
    return [run_id for run_id in run_ids if run_id in deleted]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and not db.exists():
        new_sqlite_store(db)
    return MlflowClient(tracking_uri=uri)


def new_sqlite_store(db: Path) -> None:
    """A copy of the migrated template whose `Default` experiment keeps its artifacts beside the store, as the
    sweep's experiments do: MLflow set it to ./mlruns of the folder the template was made in, another machine's
    perhaps, where a run logged without an experiment (a notebook's) would have written them."""
    db.parent.mkdir(parents=True, exist_ok=True)
    staged = db.with_name(f".{db.name}.{os.getpid()}.writing")
    try:
        shutil.copyfile(empty_sqlite_store(), staged)
        with contextlib.closing(sqlite3.connect(staged)) as store, store:
            store.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                          (artifacts_beside(db), DEFAULT_EXPERIMENT_ID))
        try:  # complete or not there: a store cut short by a Ctrl-C is never taken for a new one
            os.link(staged, db)  # and never over the one another sweep made meanwhile (its runs would be lost)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not db.exists():
                os.replace(staged, db)
    finally:
        staged.unlink(missing_ok=True)


def empty_sqlite_store() -> Path:
    """An empty sqlite store that MLflow has already migrated; new sweeps start from a copy. The migrations
    take seconds and are the same for every sweep: one template per MLflow version, in the user's cache."""
    from importlib.metadata import version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clustermask"
    template = cache / f"mlflow-{version('mlflow')}-empty.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            fresh = Path(tmp) / "empty.db"
            MlflowClient(tracking_uri=f"{SQLITE}{fresh}").search_experiments()  # creates and migrates it
            os.replace(fresh, template)  # atomic: concurrent launchers never see a half-written template
    return template


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


# the settings a run trained with that differ from its params (which keep the values it was created with): a
# resubmission's fixes, as its training job read them; JSON {key: value}
FIXED_SETTINGS_TAG = "train_fixed_settings"


def changed_params(params: Mapping[str, str], settings: Mapping[str, Any]) -> Dict[str, str]:
    """{key: value} of the flattened `settings` whose value is not the one `params` (a run's) hold."""
    return {key: value for key, value in flatten(settings).items() if params.get(key) != value}


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(mlflow_client, name: str, artifact_location: Optional[str] = None) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name, artifact_location)


def artifact_location(cfg: TrackingConfig, sweep_dir: Path) -> Optional[str]:
    """Beside the sqlite file, `mlartifacts/` (MLflow would use ./mlruns of the working folder of whichever process
    creates the experiment); a tracking server keeps its own."""
    store = sqlite_path(resolve_uri(cfg, sweep_dir))
    return None if store is None else artifacts_beside(store)


def artifacts_beside(store: Path) -> str:
    """The artifact location of a sqlite store's experiments: `mlartifacts/` beside the file."""
    return (store.parent / "mlartifacts").as_uri()


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


@dataclass
class PointRun:
    name: str
    overrides: str
    params: Mapping[str, str]


def create_sweep_runs(cfg: TrackingConfig, uri: str, sweep_id: str, params: Mapping[str, str],
                      points: List[PointRun], artifacts: Optional[str] = None) -> Tuple[str, List[str]]:
    """The sweep's parent run and one child run per point, all created now (the launcher records their ids,
    the jobs log into them). Returns (parent run id, child run ids in the order of `points`)."""
    c = client(uri)
    experiment = experiment_id(c, cfg.experiment, artifacts)
    sha = git_sha()
    parent = c.create_run(experiment, run_name=sweep_id, tags={"sweep_id": sweep_id, "kind": "sweep", "git_sha": sha})
    log_params(c, parent.info.run_id, params)
    children = []
    for point in points:
        run = c.create_run(experiment, run_name=point.name,
                           tags={"mlflow.parentRunId": parent.info.run_id, "sweep_id": sweep_id, "kind": "point",
                                 "overrides": point.overrides, "git_sha": sha})
        log_params(c, run.info.run_id, point.params)
        children.append(run.info.run_id)
    return parent.info.run_id, children


# what the training job logs on a point's run; every other metric there is an evaluation's
TRAINING_METRICS = ("train/", "mask/")


def as_metrics(metrics: Mapping[str, float], step: Optional[int] = None) -> list:
    """mlflow Metric entities for `metrics` at `step`, timestamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]


class RunLogger:
    """Logs metrics and tags to one existing run."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id

    def metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self.send(as_metrics(metrics, step))

    def send(self, batch: list) -> None:
        """Log `batch` (mlflow Metric entities), removing from it what has gone: what is left failed."""
        while batch:
            self.client.log_batch(self.run_id, metrics=batch[:MAX_METRICS_PER_BATCH])
            del batch[:MAX_METRICS_PER_BATCH]

    def supersede(self, evaluated: Mapping[str, float]) -> List[str]:
        """Log NaN for each evaluation metric on the run that `evaluated`, a whole evaluation's metrics, lacks (a
        task or a metric no longer evaluated), so that its latest value, what the report and the MLflow UI show, is
        none rather than an earlier evaluation's; its history keeps the values. Returns their keys."""
        latest = self.client.get_run(self.run_id).data.metrics
        stale = sorted(key for key, value in latest.items() if key not in evaluated
                       and not key.startswith(TRAINING_METRICS) and not math.isnan(value))
        if stale:
            self.metrics({key: math.nan for key in stale})
        return stale

    def tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def tag(self, key: str) -> Optional[str]:
        """The run's tag `key`, None where it has none."""
        return self.client.get_run(self.run_id).data.tags.get(key)

    def artifact(self, path: Path, folder: Optional[str] = None) -> None:
        """A file, or a directory's files, into the run's artifacts (under `folder`)."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def replace_artifacts(self, folder: Path, under: str) -> List[str]:
        """The files of `folder` as the run's artifacts under `under`, where those that an earlier call put there and
        `folder` no longer has are deleted (a report rebuilt without a benchmark's plot), where the artifact store
        allows it; a store that does not keeps them, with a warning. Returns the paths deleted."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        logged = [a.path for a in self.client.list_artifacts(self.run_id, under) if not a.is_dir]
        stale = [path for path in logged if not (Path(folder) / Path(path).name).is_file()]
        if stale:
            repository = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
            try:
                for path in stale:
                    repository.delete_artifacts(path)
            except Exception as exc:  # NotImplementedError, or the store's own refusal
                warnings.warn(f"the run's artifacts {', '.join(stale)} are no longer in {folder} and could not be "
                              f"deleted: {exc!r}")
                stale = []
        self.artifact(Path(folder), under)
        return stale

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class MetricsThatWait:
    """A training's metrics for a run: what the store cannot take at one log is kept, with a warning, and sent with
    the next. An MLflow server restarting, or a sqlite store locked past its timeout, then costs a warning instead of
    a training of days (the training's tags at its end, and evaluations, still fail on a store that stays down: a
    resubmission redoes them in minutes)."""

    def __init__(self, logger: RunLogger):
        self.logger, self.unsent = logger, []

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        self.unsent += as_metrics(metrics, step)
        try:
            self.logger.send(self.unsent)
        except Exception as exc:  # MlflowException, or the HTTP client's own on a server that is down
            if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                raise  # a metric no store takes (a strategy's stat named with '@'), not an outage: fail now
            warnings.warn(f"MLflow did not take the metrics of step {step}; they wait for the next log with the "
                          f"others not sent ({len(self.unsent)} values): {exc!r}"[:2000])
