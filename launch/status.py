"""`clustermask-status SWEEP_DIR`, `clustermask-resubmit SWEEP_DIR [--evaluate-again] [key=value ...]` and
`clustermask-cancel SWEEP_DIR`.

State per point and stage comes from squeue (pending / running) and from the markers the tasks write in
their run directory (done / failed); it needs no `sacct`. A task that left the queue without writing
`done` was either killed while running (failed: time limit, memory; cancelled where its log shows a scancel) or
never started (cancelled, e.g. its training failed and SLURM removed it with --kill-on-invalid-dep); one with no
job at all was not submitted (sbatch refused the sweep). A local sweep has no queue: a running
marker whose process (pid, host) is gone was killed, and a stage not started is pending only while the local
executor that would run it is alive.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clustermask.files import checkpoint_paths, final_checkpoint

from . import graph
from .executors import CANCEL_SIGNAL, Plan, SlurmExecutor, SubmissionError, describe, make_executor
from .schema import config_error

QUEUE_STATES = {"PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
                "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending", "RESIZING": "running",
                "SUSPENDED": "pending", "STAGE_OUT": "running", "SIGNALING": "running"}


IN_FLIGHT = ("pending", "running")  # queued or running: never submitted again beside itself


def queued_jobs() -> Dict[str, Tuple[str, str]]:
    """job id ('12_3' for array tasks, '12' otherwise) -> (our state, SLURM's reason for it: why a job waits,
    `Dependency`, `Resources`, or `PartitionTimeLimit` for one that never starts), for jobs still known to squeue.
    A squeue that fails (controller unreachable) raises: read as an empty queue, it would make every queued task
    look killed, and a resubmission would start each a second time beside itself, in the same run directory."""
    if shutil.which("squeue") is None:
        raise RuntimeError("squeue not found: the state of a SLURM sweep's tasks needs SLURM's client commands")
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed (exit {out.returncode}: {out.stderr.strip()[-500:]}), so which tasks "
                           "are still queued is unknown; try again when SLURM answers")
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split(None, 2) + ["", ""])[:3]
        if job_id:
            jobs[job_id] = (QUEUE_STATES.get(state, state.lower()), "" if reason == "None" else reason.strip())
    return jobs


FINAL_STATES = ("done", "failed", "cancelled")  # what a task writes last


class QueueUnknown(dict):
    """The queue of a machine without squeue (a SLURM sweep copied to a laptop): which jobs wait or run is unknown."""


def _state(marker: dict, job_id: Optional[str], queue: Dict[str, str], local_running: bool,
           local: bool = False) -> str:
    """One stage of one point, from its marker (`{}` if none) and the queue. `local_running`: a local executor
    still runs this sweep, so a local stage not yet started is queued behind the others rather than never to run.
    `local`: a local sweep, whose manifest records the jobs once they have all run. A `QueueUnknown` queue: a SLURM
    stage is what its task last wrote if that was final, else `unknown`."""
    if isinstance(queue, QueueUnknown) and job_id not in (None, "local"):
        return marker["state"] if marker.get("state") in FINAL_STATES else "unknown"
    queued = bool(job_id) and job_id in queue
    # a stage done before and queued again (evaluated again, a report rebuilt) is the queued job's until it ends
    if marker.get("state") == "done" and not (queued and marker.get("job_id") != job_id):
        return "done"
    if queued:
        return queue[job_id]
    if marker.get("state") == "failed":
        return "failed"
    if marker.get("state") == "running":  # left the queue mid-run without a verdict: killed
        if job_id and job_id != "local":
            return "failed"
        return "running" if graph.process_alive(marker) else "failed"
    if marker.get("state") == "cancelled":
        return "cancelled"
    if local_running and job_id in (None, "local"):
        return "pending"
    return "not submitted" if job_id is None and not local else "cancelled"  # no job: sbatch refused the sweep


def queue_of(manifest: graph.Manifest, required: bool = True,
             asked: Optional[Dict[str, Dict]] = None) -> Dict[str, Tuple[str, str]]:
    """`queued_jobs()` if the sweep has a SLURM job (a local sweep has no queue to ask). Not `required` (status
    only reads), on a machine without squeue: a `QueueUnknown`. `asked`: where an earlier call (of another sweep)
    left squeue's listing, kept there for the next: it lists every user's jobs, seconds of a busy controller's time."""
    jobs = [job for point in manifest.points for job in manifest.latest_jobs(point.index).values()]
    if not any(job != "local" for job in jobs + [manifest.report_job() or "local"]):
        return {}
    if not required and shutil.which("squeue") is None:
        return QueueUnknown()
    if asked is None:
        return queued_jobs()
    if "listing" not in asked:
        asked["listing"] = queued_jobs()
    return asked["listing"]


def _queue_states(listing: Dict[str, Tuple[str, str]]) -> Dict[str, str]:
    """job id -> its state (of `queued_jobs()`), keeping a `QueueUnknown` unknown."""
    return QueueUnknown() if isinstance(listing, QueueUnknown) else {job: state for job, (state, _) in listing.items()}


def _reason(listing: Dict[str, Tuple[str, str]], job_id: Optional[str], state: str) -> str:
    """Why a queued task waits: `Dependency`, `Resources`, or a limit that it will never start under."""
    return listing[job_id][1] if state == "pending" and job_id in listing else ""


# slurmstepd's word on a job it ended, in the job's stderr: `*** JOB 1973 ON node CANCELLED AT 2026-12-05T11:37:26 ***`
# (scancel), or with ` DUE TO TIME LIMIT`, ` DUE TO PREEMPTION`, ` DUE TO NODE FAILURE`, or ` DUE TO JOB REQUEUE`
# (submitit requeueing a timed-out task: the end of an attempt, not of the task)
SLURM_ENDED = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT (\S+)(?: DUE TO (.+?))? \*\*\*")
OUT_OF_MEMORY = re.compile(r"oom[-_]kill event", re.IGNORECASE)  # a cgroup's: `Detected 1 oom_kill event in StepId=...`
LOG_TAIL_BYTES = 1 << 18


def slurm_ending(log: str) -> Optional[Tuple[str, str]]:
    """How SLURM ended a task that left the queue without its verdict (or with a verdict the ending caused: a
    cancelled training's data workers die first), from the stderr beside the `.out` log it recorded:
    ('cancelled', 'scancel at <time>'), ('failed', 'time limit at <time>'), ('failed', 'out of memory'), ...;
    None where SLURM said nothing since the task's last requeue (it failed, or was killed, by itself)."""
    err = Path(log[: -len(".out")] + ".err") if log.endswith("log.out") else None
    if err is None or not err.is_file():
        return None
    with open(err, "rb") as file:
        file.seek(max(0, err.stat().st_size - LOG_TAIL_BYTES))
        tail = file.read().decode(errors="replace")
    endings = list(SLURM_ENDED.finditer(tail))
    last_requeue = max((m.end() for m in endings if m.group(2) == "JOB REQUEUE"), default=0)
    if OUT_OF_MEMORY.search(tail, last_requeue):
        return "failed", "out of memory"
    ended = [m for m in endings if m.start() >= last_requeue]
    if not ended:
        return None
    when, cause = ended[-1].groups()
    return ("cancelled", f"scancel at {when}") if cause is None else ("failed", f"{cause.lower()} at {when}")


def _outcome(manifest: graph.Manifest, marker: dict, job_id: Optional[str], state: str) -> Tuple[str, str, str, str]:
    """(state, log, error, ending) of a stage: its `_state`, or for a SLURM task that left the queue without
    finishing, what its log says SLURM did (`slurm_ending`); its log where it is now; a failed task's error; why it
    ended, where SLURM said."""
    log = manifest.where_now(marker.get("log", ""))
    ending = ""
    if state == "failed" and job_id not in (None, "local") and marker.get("state") in ("running", "failed"):
        state, ending = slurm_ending(log) or (state, "")
    return state, log, marker.get("error", "") if state == "failed" else "", ending


CHECKPOINT_GONE = "no final.pt here"


def sweep_status(manifest: graph.Manifest, listing: Optional[Dict[str, Tuple[str, str]]] = None) -> List[Dict]:
    """A row per point: each stage's state, job, log, progress and reason. `listing`: `queue_of(manifest)`,
    asked here if not given."""
    jobs_of = {point.index: manifest.latest_jobs(point.index) for point in manifest.points}
    listing = queue_of(manifest) if listing is None else listing
    queue = _queue_states(listing)
    local_running = graph.local_executor_alive(Path(manifest.sweep_dir))
    rows = []
    for point in manifest.points:
        jobs = jobs_of[point.index]
        row = {"index": point.index, "point": point.name}
        for stage in graph.STAGES:
            marker = graph.read_state(Path(point.run_dir), stage) or {}
            state = _state(marker, jobs.get(stage), queue, local_running, manifest.executor == "local")
            state, log, error, ending = _outcome(manifest, marker, jobs.get(stage), state)
            row[stage], row[f"{stage}_job"], row[f"{stage}_log"], row[f"{stage}_error"] = (
                state, jobs.get(stage, "-"), log, error)
            # steps trained or evaluation tasks done (`120/400`), as the running task last recorded them
            running = state == "running" and marker.get("state") == "running"
            row[f"{stage}_progress"] = marker.get("progress", "") if running else ""
            # requeued after a time limit's signal (or a preemption): SLURM holds it a while (BeginTime; 10 s here)
            requeued = (state == "pending" and marker.get("state") == "running"
                        and marker.get("job_id") == jobs.get(stage))
            row[f"{stage}_requeued_at"] = marker.get("progress", "").split(",")[0] if requeued else ""
            row[f"{stage}_reason"] = ending or _reason(listing, jobs.get(stage), state)
        if row["train"] == "done" and not final_checkpoint(Path(point.run_dir)).is_file():
            row["train_reason"] = CHECKPOINT_GONE  # deleted for disk space, or left out of a copy: cannot be evaluated
        rows.append(row)
    return rows


def report_status(manifest: graph.Manifest, listing: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict:
    """The sweep's report job as a row of its own (`report`, `report_job`, `report_log`, `report_reason`), from
    the marker that the report task writes in the sweep directory. `listing`: as for `sweep_status`."""
    job = manifest.report_job()
    listing = queue_of(manifest) if listing is None else listing
    marker = graph.read_state(Path(manifest.sweep_dir), "report") or {}
    state = _state(marker, job, _queue_states(listing), graph.local_executor_alive(Path(manifest.sweep_dir)),
                   manifest.executor == "local")
    if not marker and state == "cancelled" and (Path(manifest.sweep_dir) / "report" / "results.md").exists():
        state = "done"  # a sweep from before the report task wrote its marker
    state, log, error, ending = _outcome(manifest, marker, job, state)
    return {"report": state, "report_job": job or "-", "report_log": log, "report_error": error,
            "report_reason": ending or _reason(listing, job, state)}


def stage_state(row: Dict, stage: str) -> str:
    """`done`, `running 120/400` (progress), `pending (Dependency)` (SLURM's reason), `pending (BeginTime), requeued
    at 120/400`, ..."""
    reason, requeued_at = row.get(f"{stage}_reason"), row.get(f"{stage}_requeued_at")
    shown = " ".join(filter(None, [row[stage], row.get(f"{stage}_progress"), f"({reason})" if reason else ""]))
    return f"{shown}, requeued at {requeued_at}" if requeued_at else shown


ERROR_SHOWN = 300  # characters of the error a failed task recorded; its log has the traceback


# (a text in a failed stage's error or reason, what a resubmission changes for it)
FIXES = (("timed-out too many times", "its requeues after a time limit ran out: resubmit with a larger "
                                      "launcher.{stage}.timeout_min or launcher.{stage}.max_num_timeout"),
         ("out of memory", "resubmit with a larger launcher.{stage}.mem_gb"))


def failure_lines(stage: str, row: Dict) -> List[str]:
    """Where a failed stage's log is, the error its task recorded (the exception's repr) if it did, and what to
    change where the failure says."""
    lines = [f"       {stage} failed, log: {row[f'{stage}_log'] or 'unknown'}"]
    error = " ".join(row.get(f"{stage}_error", "").split())
    if error:
        lines.append(f"         {error[:ERROR_SHOWN]}{'...' if len(error) > ERROR_SHOWN else ''}")
    said = f"{error} {row.get(f'{stage}_reason', '')}"
    lines += [f"         {fix.format(stage=stage)}" for text, fix in FIXES if text in said]
    return lines


def format_status(manifest: graph.Manifest, rows: List[Dict], report: Optional[Dict] = None) -> str:
    """The table of points and stages; then, given `report_status`, the report job's state."""
    shown = [{stage: stage_state(r, stage) for stage in ("train", "eval")} for r in rows]
    # a sweep of several settings has long point names, a task held back a long reason
    width = max([44] + [len(r["point"]) for r in rows])
    train_width, eval_width = (max([least] + [len(s[stage]) for s in shown]) for stage, least in
                               (("train", 20), ("eval", 14)))
    lines = [f"sweep {manifest.sweep_id} ({manifest.executor}) in {manifest.sweep_dir}",
             f"{'#':>3}  {'point':<{width}} {'train':<{train_width}} {'eval':<{eval_width}} jobs"]
    for r, s in zip(rows, shown):
        lines.append(f"{r['index']:>3}  {r['point']:<{width}} {s['train']:<{train_width}} {s['eval']:<{eval_width}} "
                     f"{r['train_job']} / {r['eval_job']}")
        for stage in graph.STAGES:
            if r[stage] == "failed":
                lines.extend(failure_lines(stage, r))
    done = sum(r["eval"] == "done" for r in rows)
    where = Path(manifest.sweep_dir) / "report"
    if report is None:
        lines.append(f"{done}/{len(rows)} point(s) evaluated; report: {where}")
    else:
        lines.append(f"{done}/{len(rows)} point(s) evaluated; report {stage_state(report, 'report')} "
                     f"(job {report['report_job']}): {where}")
        if report["report"] == "failed":
            lines.extend(failure_lines("report", report))
    return "\n".join(lines)


def plan_resubmission(rows: List[Dict]) -> Plan:
    """Only unfinished work that is not already queued: never reruns a finished stage."""
    train = [r["index"] for r in rows if r["train"] not in ("done",) + IN_FLIGHT and r["eval"] not in IN_FLIGHT]
    eval_only = [r["index"] for r in rows if r["train"] == "done" and r["eval"] not in ("done",) + IN_FLIGHT]
    return Plan(train=train, eval_only=eval_only)


def plan_reevaluation(rows: List[Dict]) -> Plan:
    """Every trained point whose evaluation is not queued, evaluated again (a benchmark added, say)."""
    return Plan(eval_only=[r["index"] for r in rows if r["train"] == "done" and r["eval"] not in IN_FLIGHT])


EVALUATION_KEYS = ("eval.", "launcher.eval.", "launcher.report.")


def changes_training(override: str) -> bool:
    """Whether a fix changes how a point is trained, which a trained point's config keeps."""
    key = graph.override_key(override)
    return key != graph.READ_BY_EVALUATION_ONLY and graph.section_of(key, graph.TRAINING_SECTIONS) is not None


def check_eval_overrides(overrides: List[str]) -> None:
    """An evaluation again may change the evaluation only (its settings, where its data is, its jobs' and the
    report's resources, plugins added for a new evaluator): the saved config must still say how the checkpoint was
    trained."""
    for override in overrides:
        key = graph.override_key(override)
        if key not in ("eval", "plugins", graph.READ_BY_EVALUATION_ONLY) and not key.startswith(EVALUATION_KEYS):
            raise ValueError(f"{override!r}: --evaluate-again takes eval=NAME, eval.*, data.eval_root, "
                             "launcher.eval.*, launcher.report.* and plugins=[...] (the sweep's, and more) overrides "
                             "only, as the points are not trained again")


def fixes_for(index: int, overrides: List[str], trained: Collection[int]) -> List[str]:
    """The fixes that apply to point `index`: all of them, but for a point whose training is done (resubmitted to be
    evaluated only) none that changes how it was trained, which its saved config and MLflow run say."""
    return [o for o in overrides if index not in trained or not changes_training(o)]


def skipped_fixes_note(manifest: graph.Manifest, skipped: List[str], trained: Collection[int]) -> str:
    """The line saying that the fixes of how points train, `skipped`, were not applied to the trained points of a
    resubmission, '' if none."""
    if not skipped or not trained:
        return ""
    points = ", ".join(f"{i} ({manifest.points[i].name})" for i in sorted(trained))
    return (f"note: {' '.join(skipped)} not applied to the point(s) whose training is done, which are evaluated "
            f"only: {points} (their configs say how their checkpoints were trained)")


SEARCHPATH = "hydra.searchpath"


def split_searchpath(overrides: List[str]) -> Tuple[List[str], List[str]]:
    """(the fixes, the config folders that `hydra.searchpath=[file://DIR, ...]` among them adds to the sweep's, in
    which a fix's `eval=NAME` or `masking=NAME` is looked for): a folder of this command, not a point's setting."""
    from .expand import config_folders

    fixes, folders = [], []
    for override in overrides:
        if graph.override_key(override) != SEARCHPATH:
            fixes.append(override)
            continue
        entries = _parse(override.partition("=")[2])
        if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
            raise ValueError(f"{override!r}: {SEARCHPATH} is a list, [file:///path/to/configs]")
        folders += config_folders(entries)
    return fixes, folders


def check_plugins_kept(index: int, trained_with: Sequence[str], plugins: Sequence[str]) -> None:
    """A trained point's evaluation may add plugins (a new evaluator's), not drop one that the point was trained
    with: its saved config says how the checkpoint was trained, and the strategy must stay registered."""
    dropped = [entry for entry in trained_with if entry not in plugins]
    if dropped:
        raise ValueError(f"plugins={list(plugins)} leaves out {dropped[0]}, which point {index} was trained with: "
                         f"its evaluation keeps the plugins it was trained with and adds to them, "
                         f"plugins=[{', '.join([*trained_with, '...'])}]; nothing changed")


FIXED_WITH_THE_SWEEP = {
    "tracking": "the sweep's MLflow store and experiment, which its runs are in",
    "sweep_name": "the sweep's name, which its folder and runs are under",
    "paths": "resolved into the points' configs when the sweep was made (fix the keys that used them: "
             "data.train_shards, data.eval_root)",
}


def check_fixable(overrides: List[str]) -> None:
    """A resubmission's fixes change the points' saved configs: not what the sweep fixed when it was made."""
    for override in overrides:
        setting = graph.section_of(graph.override_key(override), FIXED_WITH_THE_SWEEP)
        if setting is not None:
            raise ValueError(f"{override!r}: a resubmission cannot change {setting}: {FIXED_WITH_THE_SWEEP[setting]}")


def group_option(group: str, name: str, config_folders: Sequence[str] = ()):
    """<group>/<name>.yaml on its typed schema, as Hydra composes a config-group option: from configs/, else from
    the sweep's own config folders (its hydra.searchpath), in that order, as Hydra's search path has them."""
    from .expand import CONFIG_DIR
    from .schema import GROUP_SCHEMAS

    folders = [Path(folder) / group for folder in (CONFIG_DIR, *config_folders)]
    path = next((folder / f"{name}.yaml" for folder in folders if (folder / f"{name}.yaml").is_file()), None)
    if path is None:
        options = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
        raise ValueError(f"{group}={name!r}: no {name}.yaml in {', '.join(map(str, folders))}; the options are "
                         f"{', '.join(options)}")
    return OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[group]), OmegaConf.load(path))


def apply_override(cfg, override: str, config_folders: Sequence[str] = ()) -> None:
    """key=value (YAML-typed); +key=value (or ++) for a key the config does not have yet, as Hydra takes it (a
    plugin strategy's `masking.options.*`, an sbatch option in `launcher.*.additional_parameters`); or group=name
    for a config-group option, which replaces the whole group."""
    from .schema import GROUP_SCHEMAS

    key, sep, value = override.partition("=")
    if not sep or key.startswith("~"):
        raise ValueError(f"override {override!r} is not key=value or +key=value (a fix cannot delete a key)")
    adds, key = key.startswith("+"), key.lstrip("+")
    if key in GROUP_SCHEMAS:
        OmegaConf.update(cfg, key, group_option(key, value, config_folders), merge=False)
    else:  # a key added to a typed section is refused by preflight, naming the keys like it
        OmegaConf.update(cfg, key, _parse(value), merge=True, force_add=adds)


def follow_eval_root(cfg: DictConfig, earlier: str) -> None:
    """The evaluation tasks' roots under `earlier`, data.eval_root when the sweep was made (`${data.eval_root}/...`
    resolved then), follow a fix of data.eval_root (evaluation data moved), as the interpolation would have."""
    from clustermask.files import moved_with

    if OmegaConf.is_missing(cfg.data, "eval_root") or Path(cfg.data.eval_root) == Path(earlier):
        return  # not moved, or `data=shards` without it (preflight names it)
    for task in cfg.eval.tasks:
        task.root = moved_with(task.root, earlier, cfg.data.eval_root)


def apply_overrides(manifest: graph.Manifest, indices: List[int], overrides: List[str],
                    save: bool = True, more_folders: Sequence[str] = (),
                    trained: Collection[int] = ()) -> Dict[int, DictConfig]:
    """Fix the configs of the points about to be resubmitted (typed: a bad key or value is refused). Every
    point is checked before any is saved, so a fix refused for one point changes none. The fixes are tagged
    on each point's MLflow run (`resubmit_overrides`): its params keep the values it was created with.
    `save=False` (a dry run, or before sbatch is asked about them) checks them only. `more_folders`: config
    folders to look for a group option in after the sweep's (`split_searchpath`). `trained`: the points whose
    training is done, to be evaluated only: a fix of how they were trained is not applied to them (`fixes_for`), and
    one of `plugins` that leaves out a plugin they were trained with is refused. Returns the fixed configs."""
    from clustermask.plugins import is_file

    from .app import canonical_point_masking, preflight, unused_setting_note
    from .helpers import Registries

    fixed, shards_found, registries = {}, set(), {}  # registries: per list of plugins (a sweep has one)
    for i in indices:
        point = manifest.points[i]
        cfg = graph.load_point_config(Path(point.run_dir))
        OmegaConf.set_struct(cfg, True)
        eval_root, trained_with = cfg.data.eval_root, list(cfg.get("plugins") or [])
        for override in fixes_for(i, overrides, trained):
            try:
                apply_override(cfg, override, [*manifest.config_folders, *more_folders])
            except OmegaConfBaseException as exc:
                raise ValueError(f"{override!r}: {config_error(exc)}; nothing changed") from None
        follow_eval_root(cfg, eval_root)
        graph.pin_relative_paths(cfg, Path.cwd())  # a fix's relative path, or a sweep made before they were pinned
        if i in trained:  # pinned as the fixed config's are
            check_plugins_kept(i, [graph.pinned_path(entry, Path.cwd()) if is_file(entry) else entry
                                   for entry in trained_with], list(cfg.get("plugins") or []))
        try:
            plugins = tuple(cfg.get("plugins") or [])
            if plugins not in registries:
                registries[plugins] = Registries.here(plugins)
            preflight(cfg, registries[plugins], shards_found)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            problems = str(exc).replace("\n", "\n  ")  # preflight's error has a line per problem
            raise type(exc)(f"point {i} ({point.name}), nothing changed: {problems}") from exc
        # as the sweep recorded them: a fix that the point's strategy does not use must not set its points apart
        masking, unused = canonical_point_masking(OmegaConf.to_container(cfg.masking, resolve=True),
                                                  registries[plugins].strategies)
        for key, value in unused.items():
            print(f"point {i} ({point.name}): {unused_setting_note(masking, key, value)}")
            cfg.masking[key] = getattr(masking, key)
        fixed[i] = cfg
    if save:
        save_fixes(manifest, fixed, overrides, trained)
    return fixed


def save_fixes(manifest: graph.Manifest, fixed: Dict[int, DictConfig], overrides: List[str],
               trained: Collection[int] = ()) -> None:
    """Save `apply_overrides`' checked configs and tag the fixes applied to each on its MLflow run."""
    from clustermask.tracking import RunLogger

    # read before any config is saved: a tracking server that is down stops the fix here, with nothing changed
    loggers = {i: RunLogger(manifest.tracking_uri, manifest.points[i].mlflow_run_id)
               for i in fixed if manifest.points[i].mlflow_run_id}
    try:
        earlier = {i: logger.client.get_run(logger.run_id).data.tags.get("resubmit_overrides")
                   for i, logger in loggers.items()}
    except Exception as exc:  # MlflowException, or the HTTP client's own on a server that is down
        raise RuntimeError(f"the MLflow runs at {manifest.tracking_uri} cannot be read, nothing changed: "
                           f"{exc}") from exc
    for i, cfg in fixed.items():
        graph.save_point_config(Path(manifest.points[i].run_dir), cfg)
    for i, logger in loggers.items():
        logger.tags({"resubmit_overrides": merged_fixes(earlier[i], fixes_for(i, overrides, trained))})


def merged_fixes(earlier: Optional[str], overrides: List[str]) -> str:
    """The `resubmit_overrides` tag: the fixes on record, then these, a key fixed again only at its latest
    place and value. Applied in order they give the config the fixes in turn gave (a later `masking=...` still
    comes after an earlier `masking.threshold=...` that it replaced)."""
    fixes = [*shlex.split(earlier or ""), *overrides]
    latest = {graph.override_key(fix): place for place, fix in enumerate(fixes)}
    return " ".join(_quoted(fix) for place, fix in enumerate(fixes) if latest[graph.override_key(fix)] == place)


def _quoted(fix: str) -> str:
    # as the shell would need it only where shlex.split needs it: `recall_k=[1,5,10]` reads as typed
    return shlex.quote(fix) if re.search(r"[\s'\"\\]", fix) else fix


def _parse(value: str):
    import yaml

    return yaml.safe_load(value) if value else value


def resubmit(sweep_dir: Path, overrides: List[str], dry_run: bool = False,
             evaluate_again: bool = False) -> Optional[dict]:
    """The unfinished or failed points, or with `evaluate_again` every trained point's evaluation; then the
    report. `overrides` fix the configs of the points resubmitted."""
    overrides, folders = split_searchpath(overrides)
    check_fixable(overrides)
    if evaluate_again:
        check_eval_overrides(overrides)
    graph.Manifest.load(sweep_dir)  # a sweep? (else an error naming the folder, before a lock is written there)
    with contextlib.nullcontext() if dry_run else graph.submitting(sweep_dir):
        # read in the lock: a resubmission that held it has recorded its jobs by now
        return _plan_and_submit(graph.Manifest.load(sweep_dir), overrides, dry_run, evaluate_again, folders)


def _plan_and_submit(manifest: graph.Manifest, overrides: List[str], dry_run: bool,
                     evaluate_again: bool, folders: Sequence[str] = ()) -> Optional[dict]:
    rows = sweep_status(manifest)
    plan = (plan_reevaluation if evaluate_again else plan_resubmission)(rows)
    nothing = ("nothing to evaluate again: no point has finished training, or its evaluation is queued"
               if evaluate_again else "nothing to resubmit: every point is done or still queued")
    if plan.empty and overrides:  # else a fix meant to train a finished point otherwise would seem to have been taken
        raise ValueError(f"{nothing}, so {' '.join(overrides)} would change no point (a fix applies to the points "
                         "resubmitted; to train a finished point otherwise, make a new sweep); nothing changed")
    if plan.empty:
        print(nothing)
        return None
    # the points whose training is done and that are evaluated only: they keep how they were trained
    trained = set(plan.eval_only)
    check_checkpoints_there(manifest, [row for row in rows if row["index"] in trained])
    training_fixes = [o for o in overrides if changes_training(o)]
    if training_fixes and not plan.train:
        raise ValueError(f"{' '.join(training_fixes)} would change no point: the {len(trained)} point(s) resubmitted "
                         "are evaluated only, as their training is done, and a trained point's config keeps how it "
                         "was trained; nothing changed")
    if not dry_run:
        from clustermask.tracking import require_server

        try:
            require_server(manifest.tracking_uri)
        except ConnectionError as exc:
            raise ValueError(f"{exc}, nothing changed or submitted") from None
        check_runs_not_deleted(manifest, plan.train + plan.eval_only)
    indices = sorted(plan.train + plan.eval_only)
    fixed = apply_overrides(manifest, indices, overrides, save=False, more_folders=folders,
                            trained=trained) if overrides else {}
    # the resubmitted points' launcher, fixes included (point 0 may be done, its config not fixed)
    first = indices[0]
    launcher = copy.deepcopy((fixed[first] if first in fixed else
                              graph.load_point_config(Path(manifest.points[first].run_dir))).launcher)
    launcher.dry_run = dry_run
    executor = make_executor(launcher, Path(manifest.sweep_dir), manifest.sweep_id)
    if isinstance(executor, SlurmExecutor) and not dry_run:
        refused = executor.refusals(plan)
        if refused:
            raise ValueError("sbatch would refuse the resubmission, nothing changed or submitted:\n"
                             + "\n".join(f"  {r}" for r in refused))
    if fixed and not dry_run:
        save_fixes(manifest, fixed, overrides, trained)
    if plan.train:  # an evaluation again has no fix of how points were trained: check_eval_overrides refused it
        for note in (skipped_fixes_note(manifest, training_fixes, trained),
                     resume_note(manifest, plan.train, training_fixes)):
            if note:
                print(note)
    if evaluate_again and not dry_run:
        from clustermask.evaluate import forget_evaluated

        for i in plan.eval_only:  # else they would be read back: a plain resubmission goes on where it stopped
            forget_evaluated(Path(manifest.points[i].run_dir) / "results")
    print(("dry run, nothing is changed or submitted; would resubmit:\n" if dry_run else "resubmitting:\n")
          + describe(plan, manifest))
    if dry_run and manifest.executor == "local":
        return None  # the local executor runs what it is given: there are no job scripts to print
    earlier = earlier_code(manifest, plan.train)  # read before a job of this submission rewrites its markers
    record = executor.submit(manifest, plan)
    from .app import print_submission

    print_submission(manifest, record)
    note = code_change_note(earlier, Path(record["code"]).name)
    if note:
        print(note)
    return record


def check_runs_not_deleted(manifest: graph.Manifest, indices: List[int]) -> None:
    """The MLflow runs the jobs will log to, the points' and the sweep's, must not have been deleted (in the MLflow
    UI): MLflow would refuse every job's first log, after its wait in the queue."""
    from clustermask.tracking import deleted_runs

    runs = {manifest.points[i].mlflow_run_id: f"point {i} ({manifest.points[i].name})" for i in indices}
    runs[manifest.parent_run_id] = f"the sweep's own run ({manifest.sweep_id})"
    deleted = deleted_runs(manifest.tracking_uri, manifest.experiment, [run for run in runs if run])
    if deleted:
        raise ValueError(f"{len(deleted)} MLflow run(s) that the jobs would log to were deleted: "
                         + ", ".join(f"{runs[run]}: run {run}" for run in deleted)
                         + f"; restore them first (mlflow.MlflowClient({manifest.tracking_uri!r}).restore_run(RUN_ID), "
                         "or the MLflow UI's deleted runs), nothing changed or submitted")


def check_checkpoints_there(manifest: graph.Manifest, rows: List[Dict]) -> None:
    """The points to be evaluated only (their `sweep_status` rows) must still have their trained checkpoint: one
    deleted since (for disk space) would fail its evaluation job, after its wait in the queue."""
    gone = [row["index"] for row in rows if row["train_reason"] == CHECKPOINT_GONE]
    if gone:
        raise FileNotFoundError(
            f"{len(gone)} trained point(s) to be evaluated no longer have their checkpoint (deleted since they "
            "trained?): " + ", ".join(f"point {i} ({manifest.points[i].name}): "
                                      f"{final_checkpoint(Path(manifest.points[i].run_dir))}" for i in gone)
            + "; put it back to evaluate it, or make a new sweep to train it again; nothing changed or submitted")


def resume_note(manifest: graph.Manifest, indices: List[int], fixes: List[str]) -> str:
    """A line naming the points about to train that resume from a checkpoint, where `fixes` change how they train:
    those apply from the checkpoint on (a checkpoint of another model does not load at all)."""
    if not fixes:
        return ""
    latest = {i: checkpoint_paths(Path(manifest.points[i].run_dir))[0] for i in indices}
    resuming = [i for i in indices if latest[i].exists()]
    if not resuming:
        return ""
    return (f"note: {', '.join(f'point {i} ({manifest.points[i].name})' for i in resuming)} resume(s) from a "
            f"checkpoint, so {' '.join(fixes)} take(s) effect from there on; to train afresh with them, cancel, remove "
            f"{' '.join(str(latest[i]) for i in resuming)} and resubmit")


def earlier_code(manifest: graph.Manifest, indices: List[int]) -> Dict[int, str]:
    """Per point about to be resubmitted, the digest of the code copy its last training ran (its marker's), where
    one ran."""
    codes = {i: (graph.read_state(Path(manifest.points[i].run_dir), "train") or {}).get("code") for i in indices}
    return {i: Path(code).name for i, code in codes.items() if code}


def code_change_note(earlier: Dict[int, str], code: str) -> str:
    """A line naming the resubmitted points whose earlier training ran other code than this submission's copy: a
    training resumed from its checkpoint goes on with other code than it began with."""
    changed = {i: old for i, old in earlier.items() if old != code}
    if not changed:
        return ""
    return (f"note: {len(changed)} point(s) trained earlier with other code than this submission's (code/{code}): "
            + ", ".join(f"point {i} (code/{old})" for i, old in sorted(changed.items()))
            + "; one resumed from a checkpoint goes on with the new code, and the report names the points of each")


NO_SQUEUE = ("squeue not found here (a copy of the sweep?): a SLURM stage whose task has not written its last "
             "state shows as unknown")


def status_text(sweep_dir: str, asked: Optional[Dict[str, Dict]] = None) -> Tuple[str, bool, bool]:
    """One sweep's status table, whether a stage of it failed, and whether squeue was missing to tell. `asked`: as
    for `queue_of`, shared by the sweeps shown together."""
    manifest = graph.Manifest.load(sweep_dir)
    listing = queue_of(manifest, required=False, asked=asked)  # one squeue for the points and the report
    rows, report = sweep_status(manifest, listing), report_status(manifest, listing)
    failed = any(r[s] == "failed" for r in rows for s in graph.STAGES) or report["report"] == "failed"
    return format_status(manifest, rows, report), failed, isinstance(listing, QueueUnknown)


def main(argv=None) -> int:
    """Exit 2 if a sweep's state could not be read (the others are still shown), else 1 if a stage failed."""
    parser = argparse.ArgumentParser(
        description="State of every point and stage of one sweep or several",
        epilog="A stage is pending (with SLURM's reason), running (steps or tasks done, time left), done, failed (its "
               "log and error), cancelled or not submitted. Exit status: 0 when no stage failed, 1 when one did, 2 "
               "when a sweep could not be read.")
    parser.add_argument("sweep_dirs", nargs="+", metavar="sweep_dir", help="a sweep's folder (its manifest.json)")
    args = parser.parse_args(argv)
    tables, unreadable, failed, queue_unknown = [], False, False, False
    asked = {}  # one squeue for all the sweeps
    for sweep_dir in dict.fromkeys(args.sweep_dirs):
        try:
            table, sweep_failed, sweep_queue_unknown = status_text(sweep_dir, asked)
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            unreadable = True
            continue
        tables.append(table)
        failed, queue_unknown = failed or sweep_failed, queue_unknown or sweep_queue_unknown
    if tables:
        print("\n".join([NO_SQUEUE] * queue_unknown + ["\n\n".join(tables)]))
    return 2 if unreadable else 1 if failed else 0


# ---------------------------------------------------------------- cancel

CANCELLED_BY = "clustermask-cancel"


def sweep_jobs(manifest: graph.Manifest) -> List[str]:
    """Every SLURM job (an array by its base id) that the sweep's submissions queued, oldest first."""
    jobs = []
    for submission in manifest.submissions:
        jobs += [group["job_id"] for stage in graph.STAGES for group in submission.get(stage, [])]
        jobs += [submission["report"]["job_id"]] if "report" in submission else []
    return [job for job in dict.fromkeys(jobs) if job != "local"]


def still_listed(jobs: List[str], listing: Dict[str, Tuple[str, str]]) -> List[str]:
    """The jobs of `jobs` (arrays by their base id) that `listing` (squeue's, `queued_jobs()`) has a task of."""
    bases = {task.split("_")[0] for task in listing}
    return [job for job in jobs if job in bases]


def latest_stages(manifest: graph.Manifest) -> List[Tuple[Path, str, str]]:
    """(folder of its marker, stage, task id) of each point's newest training and evaluation, then the report."""
    stages = [(Path(point.run_dir), stage, task) for point in manifest.points
              for stage, task in manifest.latest_jobs(point.index).items() if stage != "report"]
    report = manifest.report_job()
    return stages + ([(Path(manifest.sweep_dir), "report", report)] if report else [])


def cancel(sweep_dir: Path, dry_run: bool = False, wait_s: float = 120.0) -> List[str]:
    """Stop what the sweep still has queued or running: scancel its SLURM jobs (every submission's), or interrupt
    the local sweep's process, as a Ctrl-C would. The stages stopped are marked cancelled (by this command), not
    shown failed as a task that left the queue mid-run without a verdict is, and their MLflow runs end KILLED;
    `clustermask-resubmit` resumes them. Returns the jobs (or the process) stopped."""
    manifest = graph.Manifest.load(sweep_dir)
    # a local sweep's process holds the submission lock while it runs
    stopped = (cancel_local if manifest.executor == "local" else cancel_slurm)(manifest, dry_run, wait_s)
    if stopped and not dry_run:
        print(f"cancelled: clustermask-resubmit {manifest.sweep_dir} resumes the sweep (a training from its last "
              "checkpoint)")
    return stopped


def cancel_slurm(manifest: graph.Manifest, dry_run: bool, wait_s: float) -> List[str]:
    """scancel every job of the sweep's submissions that SLURM still lists, wait until they leave the queue, and
    mark the stages they ran or queued cancelled."""
    sweep_dir = Path(manifest.sweep_dir)
    with contextlib.nullcontext() if dry_run else graph.submitting(sweep_dir):
        manifest = graph.Manifest.load(sweep_dir)  # read in the lock: a resubmission's jobs are recorded by now
        listing = queued_jobs()
        live = still_listed(sweep_jobs(manifest), listing)
        stopped = [(folder, stage, task) for folder, stage, task in latest_stages(manifest) if task in listing]
        if not live:
            print("nothing to cancel: SLURM lists none of the sweep's jobs")
            return []
        running = sum(listing[task][0] == "running" for _, _, task in stopped)
        print(f"{'would cancel' if dry_run else 'cancelling'} job(s) {' '.join(live)}: {running} stage(s) running, "
              f"{len(stopped) - running} queued")
        if dry_run:
            return live
        scancel = subprocess.run(["scancel", *live], capture_output=True, text=True, timeout=60)
        if scancel.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(live)} failed (exit {scancel.returncode}: "
                               f"{scancel.stderr.strip()[-500:]}); nothing marked")
        left = wait_until(lambda: still_listed(live, queued_jobs()), wait_s)
        if left:
            print(f"note: SLURM still lists job(s) {' '.join(left)} after {wait_s:.0f} s; their stages are marked "
                  "cancelled all the same")
        mark_cancelled(manifest, stopped)
    return live


def wait_until(still: Callable[[], list], wait_s: float) -> list:
    """Ask `still()` each second until it is empty or `wait_s` has passed; what it gave last."""
    deadline = time.monotonic() + wait_s
    left = still()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = still()
    return left


def cancel_local(manifest: graph.Manifest, dry_run: bool, wait_s: float) -> List[str]:
    """Interrupt the process that runs a local sweep, as a Ctrl-C in its terminal would: it ends its running task
    and starts no other. Only on the machine it runs on."""
    sweep_dir = Path(manifest.sweep_dir)
    if not graph.local_executor_alive(sweep_dir):
        print("nothing to cancel: no process runs the local sweep")
        return []
    holder = json.loads(graph.local_executor_path(sweep_dir).read_text())
    if holder["host"] != socket.gethostname():
        raise ValueError(f"the local sweep runs on {holder['host']} (pid {holder['pid']}): cancel it there")
    print(f"{'would stop' if dry_run else 'stopping'} the local sweep's process {holder['pid']}")
    if dry_run:
        return [str(holder["pid"])]
    os.kill(int(holder["pid"]), CANCEL_SIGNAL)
    if wait_until(lambda: [True] if graph.local_executor_alive(sweep_dir) else [], wait_s):
        raise RuntimeError(f"the local sweep's process {holder['pid']} still runs after {wait_s:.0f} s")
    # what it was running, and what would have run after: its stages without a verdict, and the report
    stopped = [(Path(p.run_dir), stage, "local") for p in manifest.points for stage in graph.STAGES
               if (graph.read_state(Path(p.run_dir), stage) or {}).get("state") not in FINAL_STATES]
    stopped.append((sweep_dir, "report", "local"))
    mark_cancelled(graph.Manifest.load(sweep_dir), stopped)
    return [str(holder["pid"])]


def mark_cancelled(manifest: graph.Manifest, stopped: List[Tuple[Path, str, str]]) -> None:
    """Each stage of `stopped` that did not finish, cancelled by this command; the MLflow runs of its points, and the
    sweep's run where the report was stopped, end KILLED (a store that does not answer is only warned of)."""
    from clustermask.tracking import RunLogger

    runs = {Path(p.run_dir): p.mlflow_run_id for p in manifest.points}
    killed = []
    for folder, stage, task in stopped:
        marker = graph.read_state(folder, stage) or {}
        if marker.get("state") == "done":
            continue
        graph.mark(folder, stage, "cancelled", job_id=task, log=marker.get("log", ""), reason=CANCELLED_BY)
        killed.append(manifest.parent_run_id if stage == "report" else runs[folder])
    for run_id in dict.fromkeys(killed):
        try:
            RunLogger(manifest.tracking_uri, run_id).finish("KILLED")
        except Exception as exc:  # noqa: BLE001 - the jobs are cancelled whatever MLflow says
            print(f"warning: MLflow run {run_id} not ended KILLED: {exc!r}"[:500], file=sys.stderr)


def cancel_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Cancel what a sweep still has queued or running (clustermask-"
                                     "resubmit resumes it)")
    parser.add_argument("sweep_dir")
    parser.add_argument("--dry-run", action="store_true", help="say what it would cancel; cancel nothing")
    args = parser.parse_args(argv)
    try:
        cancel(Path(args.sweep_dir), args.dry_run)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def resubmit_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Resubmit only the unfinished or failed points of a sweep")
    parser.add_argument("sweep_dir")
    parser.add_argument("overrides", nargs="*", help="key=value (or group=option) fixes applied to the "
                        "resubmitted points (a fix of how they train, model.*, masking.*, train.*, data.*, only to "
                        "those whose training is resubmitted)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the points it would resubmit (on SLURM, their job scripts too); change and submit "
                        "nothing")
    parser.add_argument("--evaluate-again", action="store_true",
                        help="evaluate every trained point again, then report (overrides: eval=NAME, eval.*, "
                        "data.eval_root, launcher.eval.*, launcher.report.*, plugins=[the sweep's, more.py] for a new "
                        "evaluator; hydra.searchpath=[file://DIR] adds a folder to look for eval=NAME in)")
    args = parser.parse_intermixed_args(argv)  # the flags may come after the overrides, or between them
    try:
        resubmit(Path(args.sweep_dir), args.overrides, args.dry_run, args.evaluate_again)
    except (ValueError, FileNotFoundError, RuntimeError, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, SubmissionError) and exc.interrupted else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
