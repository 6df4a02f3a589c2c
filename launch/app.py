"""`clustermask-sweep`: compose the sweep the Hydra way, check every point, then submit the whole graph.

    clustermask-sweep -m experiment=demo                       # runs here (launcher=local, the default)
    clustermask-sweep -m experiment=ratio_ablation launcher=slurm
    clustermask-sweep -m masking=random,cluster masking.ratio=0.3,0.5 launcher=slurm launcher.dry_run=true

Hydra's sweeper expands the points; for each, the task function below only composes and checks its config
(no training happens in this process). When the sweep has been expanded, the `SubmitSweep` callback writes
the run directories, MLflow runs and manifest.json, and hands the graph to the executor: SLURM arrays
(returns at once) or the local executor (runs it here).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import graph
from .executors import Plan, check_resources, describe, make_executor
from .schema import register_configs

register_configs()
OmegaConf.register_new_resolver("cm_safe", graph.safe_name, replace=True)  # sweep names become safe paths
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

_composed: List[Tuple[List[str], dict, str]] = []  # (point overrides, resolved config, error or "")


def preflight(cfg: DictConfig) -> None:
    """Everything that can be checked before submission; raises ValueError/FileNotFoundError naming the key."""
    from clustermask import data, evaluate, masking, model, train

    model.validate(OmegaConf.to_object(cfg.model))
    masking.validate(OmegaConf.to_object(cfg.masking))
    train.validate(OmegaConf.to_object(cfg.train))
    data.shard_urls(cfg.data.train_shards)
    evaluate.validate(OmegaConf.to_object(cfg.eval))
    if cfg.launcher.executor not in ("local", "slurm"):
        raise ValueError(f"launcher.executor={cfg.launcher.executor!r} is not one of local, slurm")
    for stage in ("train", "eval", "report"):
        check_resources(stage, cfg.launcher[stage])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def compose_point(cfg: DictConfig) -> None:
    overrides = graph.point_overrides(list(HydraConfig.get().overrides.task))
    try:
        preflight(cfg)
        error = ""
    except (ValueError, FileNotFoundError, TypeError) as exc:
        error = str(exc)
    _composed.append((overrides, OmegaConf.to_container(cfg, resolve=True), error))


def _check_writable(sweep_dir: Path) -> None:
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe = sweep_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"error: output directory {sweep_dir} is not writable: {exc}") from exc


def create_sweep(sweep_dir: Path, composed) -> "graph.Manifest":
    from clustermask.tracking import (TrackingConfig, artifact_location, create_point_run, flatten, resolve_uri,
                                      start_sweep)

    first = OmegaConf.create(composed[0][1])
    sweep_id = graph.new_sweep_id(first.sweep_name)
    tracking = TrackingConfig(**OmegaConf.to_container(first.tracking))
    uri = resolve_uri(tracking, sweep_dir)
    parent = start_sweep(tracking, uri, sweep_id, {"points": str(len(composed)), "sweep_dir": str(sweep_dir)},
                         artifact_location(tracking, sweep_dir))
    points = []
    run_dirs = graph.run_dirs(sweep_dir, [o for o, _, _ in composed])
    for index, ((overrides, cfg, _), run_dir) in enumerate(zip(composed, run_dirs)):
        graph.save_point_config(run_dir, cfg)
        params = flatten({k: v for k, v in cfg.items() if k not in ("launcher", "paths")})
        run_id = create_point_run(tracking, uri, parent, sweep_id, run_dir.name, " ".join(overrides), params)
        points.append(graph.Point(index, run_dir.name, overrides, str(run_dir), run_id))
    manifest = graph.Manifest(sweep_id=sweep_id, sweep_dir=str(sweep_dir), created=graph.dt.datetime.now().isoformat(
        timespec="seconds"), executor=first.launcher.executor, tracking_uri=uri, experiment=tracking.experiment,
        parent_run_id=parent, points=points)
    manifest.save()
    return manifest


class SubmitSweep(Callback):
    """Runs once the sweeper has composed every point (also for a single run without -m)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._submit(Path(str(config.hydra.sweep.dir)).resolve())

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._submit(Path(str(config.hydra.run.dir)).resolve())

    def _submit(self, sweep_dir: Path) -> None:
        composed = list(_composed)
        _composed.clear()
        if not composed:
            return
        errors = [f"  point {i} ({' '.join(o) or 'defaults'}): {e}" for i, (o, _, e) in enumerate(composed) if e]
        if errors:
            print("error: preflight failed, nothing was submitted:\n" + "\n".join(errors), file=sys.stderr)
            raise SystemExit(2)
        launcher = OmegaConf.create(composed[0][1]).launcher
        if len({tuple(o) for o, _, _ in composed}) != len(composed):
            raise SystemExit("error: two points have the same overrides")
        if launcher.dry_run:
            return self._dry_run(sweep_dir, composed, launcher)
        if (sweep_dir / "manifest.json").exists():
            raise SystemExit(f"error: {sweep_dir} already holds a sweep (manifest.json); use `clustermask-resubmit "
                             f"{sweep_dir}` to finish it, or choose another sweep_name=")
        _check_writable(sweep_dir)
        manifest = create_sweep(sweep_dir, composed)
        executor = make_executor(launcher, sweep_dir, manifest.sweep_id)
        plan = Plan(train=list(range(len(manifest.points))))
        print(f"sweep {manifest.sweep_id}: {len(manifest.points)} point(s) in {sweep_dir}", flush=True)
        if launcher.executor == "slurm":  # record before submitting, so nothing is lost if sbatch fails midway
            manifest.save()
        record = executor.submit(manifest, plan)
        manifest.submissions.append(record)
        manifest.save()
        print_submission(manifest, record)
        if launcher.executor == "local":
            self._exit_on_failure(manifest)

    @staticmethod
    def _exit_on_failure(manifest) -> None:
        from .status import format_status, sweep_status

        rows = sweep_status(manifest)
        if any(row[stage] != "done" for row in rows for stage in graph.STAGES):
            print(format_status(manifest, rows), file=sys.stderr)
            raise SystemExit(1)

    def _dry_run(self, sweep_dir: Path, composed, launcher: DictConfig) -> None:
        overrides = [o for o, _, _ in composed]
        points = [graph.Point(i, run_dir.name, o, str(run_dir))
                  for i, (o, run_dir) in enumerate(zip(overrides, graph.run_dirs(sweep_dir, overrides)))]
        manifest = graph.Manifest("DRY-RUN", str(sweep_dir), "", launcher.executor, "", "", "", points)
        plan = Plan(train=list(range(len(points))))
        print(f"dry run: {len(points)} point(s), nothing submitted\n")
        if launcher.executor == "slurm":
            make_executor(launcher, sweep_dir, "DRY-RUN").submit(manifest, plan)
        print("dependency graph:\n" + describe(plan, manifest))


def print_submission(manifest: "graph.Manifest", record: dict) -> None:
    ids = {stage: [g["job_id"] for g in record.get(stage, [])] for stage in ("train", "eval")}
    print(f"train job(s): {' '.join(ids['train']) or '-'}   eval job(s): {' '.join(ids['eval']) or '-'}   "
          f"report job: {record.get('report', {}).get('job_id', '-')}")
    print(f"manifest: {manifest.path}")
    print(f"status:   clustermask-status {manifest.sweep_dir}")


def main() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    compose_point()


if __name__ == "__main__":
    # run the imported module, not __main__: the callback (launch.app.SubmitSweep) must see the same state
    from launch.app import main as imported_main

    imported_main()
