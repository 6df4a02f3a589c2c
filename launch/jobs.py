"""What one task of the graph runs: train a point, evaluate a point, or build the sweep's report.

Each reads everything it needs from the run directory (config.yaml, manifest.json), so the same function
runs under the local executor (a subprocess: `python -m launch.jobs STAGE PATH`) and under SLURM (submitit
pickles `StageTask`). A failure is marked in the run directory and re-raised so the task exits non-zero.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Optional, Tuple

import submitit
from omegaconf import OmegaConf

from clustermask.config import LOADER_BOUND
from clustermask.plugins import fingerprint, load_plugins

from . import graph, snapshot

# a job downloads nothing: open_clip's Hugging Face tokenizers and text towers come from the local cache, which
# preflight checked (`config.validate_model_offline`); set HF_HUB_OFFLINE=0 to let a job fetch them
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _log_path() -> str:
    if os.environ.get("CLUSTERMASK_LOG"):
        return os.environ["CLUSTERMASK_LOG"]
    try:
        return str(submitit.JobEnvironment().paths.stdout).replace("%t", "0")
    except RuntimeError:
        return ""


def _job_id() -> str:
    """As squeue -r prints it: '<array job>_<task>' for array tasks, the job id otherwise."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "local")


def _manifest_for(run_dir: Path) -> graph.Manifest:
    return graph.Manifest.load(Path(run_dir).parent.parent)


def _point(run_dir: Path, manifest: graph.Manifest) -> graph.Point:
    for point in manifest.points:
        if Path(point.run_dir) == Path(run_dir).resolve():
            return point
    raise KeyError(f"{run_dir} is not a point of {manifest.sweep_dir}")


def _typed(node):
    return OmegaConf.to_object(node)


# the code this job runs: its submission's copy (launch/snapshot.py), or a checkout (`python -m launch.jobs` by hand)
CODE = str(Path(__file__).resolve().parents[1])


def _running(run_dir: Path, stage: str, **info) -> None:
    """The running marker, with this process's pid and host: a local task has no queue to ask whether it is
    still alive, and one that was killed (Ctrl-C, out of memory) would otherwise look running for ever."""
    graph.mark(run_dir, stage, "running", job_id=_job_id(), log=_log_path(), code=CODE, **graph.this_process(),
               **info)


def _finished(run_dir: Path, stage: str, error: Optional[BaseException] = None) -> None:
    """The stage's last marker: done, or failed with the error."""
    if error is None:
        graph.mark(run_dir, stage, "done", job_id=_job_id(), log=_log_path(), code=CODE)
    else:
        graph.mark(run_dir, stage, "failed", job_id=_job_id(), log=_log_path(), code=CODE, error=repr(error)[:2000])


def _progress(run_dir: Path, stage: str, done: int, total: int, waited: Optional[float] = None) -> None:
    """What `clustermask-status` shows beside a running stage: steps trained, or evaluation tasks done; for a
    training, about how long it has left; and the share of its time a training waited for its loader since its last
    log, when over LOADER_BOUND (a run to stop and give more data.workers and cores)."""
    progress = f"{done}/{total}"
    left = time_left(run_dir, done, total) if stage == "train" else ""
    if left:
        progress += f", {left}"
    if waited is not None and waited > LOADER_BOUND:
        progress += f", {waited:.0%} waiting for data"
    _running(Path(run_dir).resolve(), stage, progress=progress)


# per training run dir, its first progress in this process: (steps done, time.monotonic())
_FIRST_PROGRESS: Dict[str, Tuple[int, float]] = {}


def time_left(run_dir: Path, done: int, total: int) -> str:
    """`about 25 min left` at the pace of this process's steps since its first log (not counting its start, the
    model's compilation, or the steps before a resumption); '' at the first log, and at the end."""
    now = time.monotonic()
    first_done, first_time = _FIRST_PROGRESS.setdefault(str(run_dir), (done, now))
    if done <= first_done or done >= total:
        return ""
    return f"about {duration((now - first_time) / (done - first_done) * (total - done))} left"


def duration(seconds: float) -> str:
    """`40 s`, `25 min`, `3.5 h`: as precise as a guess of time left is."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _use_the_allocated_cpus() -> None:
    """torch's threads, as many as the CPUs the SLURM task was given. Without CPU binding (`TaskPlugin=task/none`)
    torch sees every core of the node and starts a thread per core in every job, so that jobs sharing a node
    oversubscribe it (on the 2-core test machine, two 12-step training jobs took 67 s side by side against
    13 s alone). An explicit `train.threads` still wins: the trainer sets it afterwards."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))
        print(f"torch threads: {cpus} (SLURM_CPUS_PER_TASK)", flush=True)


def _stage(stage: str, run_dir: Path, body) -> str:
    """Run `body`, keeping the stage marker and the MLflow run status in step with what happened."""
    from clustermask.tracking import RunLogger

    _use_the_allocated_cpus()
    run_dir = Path(run_dir).resolve()
    manifest = _manifest_for(run_dir)
    logger = RunLogger(manifest.tracking_uri, _point(run_dir, manifest).mlflow_run_id)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == 0:
        _running(run_dir, stage)
    try:
        if rank == 0:  # in the try: a store that refuses it (a run deleted, a server gone) is this stage's failure
            logger.tags({f"{stage}_job_id": _job_id(), f"{stage}_code": CODE})
        result = body(logger if rank == 0 else None)
    except Exception as error:  # not SystemExit: submitit exits that way after requeueing a preempted task
        if rank == 0:
            _finished(run_dir, stage, error)
            with contextlib.suppress(Exception):  # the store may be what failed: the error above is the stage's
                logger.tags({f"{stage}_state": "failed"})
                if stage == "train":
                    logger.finish("FAILED")
        raise
    if rank == 0:
        _finished(run_dir, stage)
        logger.tags({f"{stage}_state": "done"})
        if stage == "eval":
            logger.finish("FINISHED")
    return result


def _load_plugins(cfg, stage: str, logger) -> None:
    """The point's plugins, imported before the registries are read; which code they were is tagged on its run
    (`train_plugins`, `eval_plugins`)."""
    entries = list(cfg.get("plugins") or [])
    # a file as its submission copied it: one edited since (the next experiment's) is not this sweep's
    modules = load_plugins(entries, [snapshot.copied_plugin(entry) for entry in entries])
    if logger and entries:
        logger.tags({f"{stage}_plugins": fingerprint(entries, modules)})


def _tag_fixed_settings(logger, cfg) -> None:
    """Tag the training settings that a resubmission's fixes changed from the run's params (FIXED_SETTINGS_TAG),
    where the report reads them: the params keep the values the run was created with. Rewritten at each attempt,
    so that a fix undone by a later one is no longer there."""
    import json

    from clustermask.tracking import FIXED_SETTINGS_TAG, changed_params

    training = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items()
                if key in graph.TRAINING_SECTIONS}
    recorded = logger.client.get_run(logger.run_id).data
    changed = changed_params(recorded.params, training)
    changed.pop(graph.READ_BY_EVALUATION_ONLY, None)
    if changed or FIXED_SETTINGS_TAG in recorded.tags:
        logger.tags({FIXED_SETTINGS_TAG: json.dumps(changed, sort_keys=True)})


def train_point(run_dir: str) -> str:
    from clustermask.tracking import MetricsThatWait
    from clustermask.files import final_checkpoint
    from clustermask.train import Trainer, hardware_so_far

    cfg = graph.load_point_config(Path(run_dir))

    def body(logger):
        _load_plugins(cfg, "train", logger)
        tracked = MetricsThatWait(logger)  # called only where there is a logger (rank 0)

        def log(metrics, step):
            tracked(metrics, step)
            _progress(run_dir, "train", step, cfg.train.steps, metrics.get("train/data_wait_share"))

        trainer = Trainer(_typed(cfg.model), _typed(cfg.masking), _typed(cfg.data), _typed(cfg.train),
                          Path(run_dir), log=log if logger else None)
        if logger:
            _tag_fixed_settings(logger, cfg)
        # before the loop: an attempt preempted or failed on other nodes counts in train/minutes too
        if logger and not final_checkpoint(Path(run_dir)).exists():
            logger.tags({"train_hardware": hardware_so_far(logger.tag("train_hardware"), trainer.hardware())})
        final = trainer.run()
        if logger and (Path(run_dir) / "masks.png").exists():
            logger.artifact(Path(run_dir) / "masks.png")
        return str(final)

    return _stage("train", run_dir, body)


def eval_point(run_dir: str) -> str:
    from clustermask.evaluate import evaluate_checkpoint
    from clustermask.files import final_checkpoint

    cfg = graph.load_point_config(Path(run_dir))

    def body(logger):
        _load_plugins(cfg, "eval", logger)
        checkpoint = final_checkpoint(Path(run_dir))
        if not checkpoint.exists():
            raise FileNotFoundError(f"no trained checkpoint at {checkpoint}: did training finish?")
        tasks_done = itertools.count(1)

        def log(metrics):
            logger.metrics(metrics)
            _progress(run_dir, "eval", next(tasks_done), len(cfg.eval.tasks))

        # a requeued or resubmitted evaluation goes on from its first unfinished task (`clustermask-resubmit
        # --evaluate-again` forgets what was evaluated before it submits)
        evaluated = evaluate_checkpoint(cfg.model.name, str(checkpoint), _typed(cfg.eval), Path(run_dir) / "results",
                                        log=log if logger else None, resume=True)
        superseded = logger.supersede(evaluated) if logger else []
        if superseded:
            print(f"eval: no longer evaluated, so logged NaN in MLflow (their history keeps the earlier values): "
                  f"{', '.join(superseded)}", flush=True)
        return str(Path(run_dir) / "results")

    return _stage("eval", run_dir, body)


def report(sweep_dir: str) -> str:
    """The sweep's tables and plots; also plots the points' `report.plot_metric` (the sweep's, and a resubmission's
    fix of it, which only the points it resubmitted hold)."""
    from analysis.report import build_report

    sweep_dir = Path(sweep_dir).resolve()
    _running(sweep_dir, "report")  # `clustermask-status` shows the report's state from this marker
    try:
        manifest = graph.Manifest.load(sweep_dir)
        metrics = [graph.load_point_config(Path(p.run_dir)).report.plot_metric for p in manifest.points]
        out_dir = build_report(sweep_dir, [m for m in dict.fromkeys(metrics) if m])
        _close_sweep_run(manifest, out_dir)
    except Exception as error:
        _finished(sweep_dir, "report", error)
        raise
    _finished(sweep_dir, "report")
    return str(out_dir)


def _close_sweep_run(manifest: graph.Manifest, out_dir: Path) -> None:
    """The report on the sweep's MLflow run, which ends FINISHED when every point was evaluated and FAILED
    otherwise; a resubmission's report job updates both."""
    from clustermask.tracking import RunLogger

    logger = RunLogger(manifest.tracking_uri, manifest.parent_run_id)
    logger.replace_artifacts(out_dir, "report")  # without what an earlier report had and this one has not
    evaluated = sum((graph.read_state(Path(p.run_dir), "eval") or {}).get("state") == "done" for p in manifest.points)
    logger.tags({"points_evaluated": f"{evaluated}/{len(manifest.points)}"})
    logger.finish("FINISHED" if evaluated == len(manifest.points) else "FAILED")


STAGE_FUNCTIONS = {"train": train_point, "eval": eval_point, "report": report}


# the signals submitit handles in a job (SUBMITIT_PREEMPT_SIGNAL may move its requeue signal to SIGUSR1)
SUBMITIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)


def handle_signals_in_this_process_only() -> None:
    """The job's signal handlers run in the job's own process, not in the processes it forks. SLURM signals every
    process of a step, and a DataLoader worker inherits submitit's handlers: ahead of a time limit it would pickle
    the job and call `scontrol requeue` beside the main process, and its exit would raise an error in the main
    process's own requeue, marking the stage failed."""
    owner = os.getpid()
    for signum in SUBMITIT_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            signal.signal(signum, functools.partial(_handle_in, owner, handler))


def _handle_in(owner: int, handler, signum, frame) -> None:
    if os.getpid() == owner:
        handler(signum, frame)


class StageTask(submitit.helpers.Checkpointable):
    """Picklable entry point for submitit; on a time limit or preemption it is requeued and resumes."""

    def __init__(self, stage: str):
        self.stage = stage
        self.started = time.time()  # this attempt's start (the requeued attempt sets its own)

    def __call__(self, path: str) -> str:
        self.started = time.time()
        handle_signals_in_this_process_only()  # submitit installed its handlers before calling us
        if self.stage == "train" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return STAGE_FUNCTIONS[self.stage](path)

    def checkpoint(self, path: str) -> submitit.helpers.DelayedSubmission:
        """The requeue: as submitit's, with a warning in the log where this attempt saved nothing to resume from.
        Ended by its time limit, each attempt would then end where the first did, until max_num_timeout ran out."""
        if self.stage in SAVED and not saved_since(Path(path), self.stage, self.started):
            print(no_progress_warning(self.stage, (time.time() - self.started) / 60, path), file=sys.stderr,
                  flush=True)
        return super().checkpoint(path)


# what an attempt of a stage saves that the next resumes from: a training's checkpoints, an evaluation's results
SAVED = {"train": ("checkpoints", "*.pt"), "eval": ("results", "*.json")}


def saved_since(run_dir: Path, stage: str, started: float) -> bool:
    """Whether the stage wrote, since `started`, something that its next attempt resumes from."""
    folder, pattern = SAVED[stage]
    return any(path.stat().st_mtime >= started for path in (run_dir / folder).glob(pattern))


def no_progress_warning(stage: str, minutes: float, run_dir: str) -> str:
    shorter = {"train": "more time, or fewer steps between checkpoints (train.checkpoint_every)",
               "eval": "more time (each evaluation task is saved when it ends)"}[stage]
    return (f"warning: this attempt of the {stage} ({minutes:.0f} min) saved nothing to resume from in {run_dir}: "
            f"the requeued attempt starts where this one did, and if a time limit ended this one, it will end the "
            f"same way, until launcher.{stage}.max_num_timeout runs out; give "
            f"launcher.{stage}.timeout_min {shorter}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in STAGE_FUNCTIONS:
        print(f"usage: clustermask-job {{{'|'.join(STAGE_FUNCTIONS)}}} PATH", file=sys.stderr)
        return 2
    try:
        print(STAGE_FUNCTIONS[argv[0]](argv[1]), flush=True)
    except Exception:  # noqa: BLE001 - the exit status is what the caller reads
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
