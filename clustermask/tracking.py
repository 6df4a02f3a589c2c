"""MLflow tracking: one experiment per sweep family, a parent run per sweep, a child run per point.

Everything goes through MlflowClient with explicit run ids (no global active run), so the launcher, the
training tasks and the evaluation tasks, in different processes, write to the same runs.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

MAX_PARAM_LENGTH = 6000


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: sqlite:///<sweep_dir>/mlflow.db ; or an `mlflow server` URI
    experiment: str = "clustermask"


def resolve_uri(cfg: TrackingConfig, sweep_dir: Path) -> str:
    # MLflow 3 refuses the plain file store: sqlite is the local default
    return cfg.uri or f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


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
    """Beside the sqlite file for the local default (MLflow would use ./mlruns of the current directory);
    a tracking server keeps its own."""
    return None if cfg.uri else (Path(sweep_dir).resolve() / "mlartifacts").as_uri()


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def start_sweep(cfg: TrackingConfig, uri: str, sweep_id: str, params: Mapping[str, str],
                artifacts: Optional[str] = None) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(c, cfg.experiment, artifacts), run_name=sweep_id,
                       tags={"sweep_id": sweep_id, "kind": "sweep", "git_sha": git_sha()})
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def create_point_run(cfg: TrackingConfig, uri: str, parent_run_id: str, sweep_id: str, name: str,
                     overrides: str, params: Mapping[str, str]) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(c, cfg.experiment), run_name=name,
                       tags={"mlflow.parentRunId": parent_run_id, "sweep_id": sweep_id, "kind": "point",
                             "overrides": overrides, "git_sha": git_sha()})
    log_params(c, run.info.run_id, params)
    return run.info.run_id


class RunLogger:
    """Logs metrics and tags to one existing run."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id

    def metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
