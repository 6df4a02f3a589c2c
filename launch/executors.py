"""Backends that run a sweep's graph: train tasks -> their evaluations -> one report.

Both take the same plan (which points to train, which to evaluate), record what they submitted in the
manifest, and return that record. `SlurmExecutor` submits one train array, one eval array whose task i depends on
train task i (aftercorr), and one report job (afterany), through submitit, and returns at once.
`LocalExecutor` runs the same graph on this machine as subprocesses, with a parallelism cap. The jobs of both run
in the submission's copy of the code (launch/snapshot.py).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional
from unittest import mock

from omegaconf import OmegaConf

from . import graph, snapshot


@dataclass
class Plan:
    train: List[int] = field(default_factory=list)  # points to train, each evaluated after its training
    eval_only: List[int] = field(default_factory=list)  # points already trained that still need evaluation
    report: bool = True

    @property
    def empty(self) -> bool:
        return not self.train and not self.eval_only


def describe(plan: Plan, manifest: graph.Manifest) -> str:
    """The dependency graph in words."""
    lines = []
    for i in plan.train:
        lines.append(f"  train[{i}] {manifest.points[i].name} -> eval[{i}] (aftercorr)")
    for i in plan.eval_only:
        lines.append(f"  eval[{i}] {manifest.points[i].name} (already trained)")
    if plan.report:
        lines.append("  report (afterany: every train and eval task above)")
    return "\n".join(lines)


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------- local


class LocalExecutor:
    """Runs the graph here, each task a subprocess whose log lands in <run_dir>/logs/<stage>.log."""

    STOP_GRACE_S = 20  # after Ctrl-C, how long a task may take to exit on SIGTERM before it is killed

    def __init__(self, max_parallel: int = 1):
        self.max_parallel = max_parallel
        self.code: Optional[Path] = None  # the copy of the code the tasks run, made by `submit`
        self._children: set = set()  # the task processes running now
        self._lock = threading.Lock()
        self._stopping = False
        # tasks running on each GPU, where several run at once on a machine with several: each would take GPU 0
        self._gpu_tasks: Dict[str, int] = dict.fromkeys(visible_gpus(), 0) if max_parallel > 1 else {}

    def _task(self, stage: str, path: str, log: Path) -> bool:
        """`python -m launch.jobs STAGE PATH` in the submission's copy of the code (launch/snapshot.py), which it
        then imports."""
        log.parent.mkdir(parents=True, exist_ok=True)
        env = snapshot.environment_elsewhere(CLUSTERMASK_LOG=str(log))  # the task runs in the code copy
        if self.max_parallel > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.max_parallel)))
        with open(log, "ab") as out, self._gpu_for(stage, path) as gpu:
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            with self._lock:
                if self._stopping:
                    return False
                child = subprocess.Popen([sys.executable, "-m", "launch.jobs", stage, path], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.code)
                self._children.add(child)
            try:
                code = child.wait()
            finally:
                with self._lock:
                    self._children.discard(child)
        where = f" (GPU {gpu})" if gpu is not None else ""
        killed = None if code == 0 or self._stopping else record_unsaid_failure(Path(path), stage, code)
        outcome = ("done" if code == 0 else "stopped" if self._stopping
                   else f"FAILED ({killed or f'exit {code}'}), log {log}")
        print(f"[local] {stage} {Path(path).name}{where}: {outcome}", flush=True)
        return code == 0

    @contextlib.contextmanager
    def _gpu_for(self, stage: str, path: str):
        """The GPU a point's task runs on, the one running the fewest tasks, while it runs; None where the machine
        has fewer than two GPUs, for the report, and for a task whose config names its device (`cuda:1`, `cpu`)."""
        if len(self._gpu_tasks) < 2 or stage == "report" or not picks_its_gpu(stage, Path(path)):
            yield None
            return
        with self._lock:
            gpu = min(self._gpu_tasks, key=self._gpu_tasks.get)
            self._gpu_tasks[gpu] += 1
        try:
            yield gpu
        finally:
            with self._lock:
                self._gpu_tasks[gpu] -= 1

    def _train_then_eval(self, point: graph.Point) -> None:
        run_dir = Path(point.run_dir)
        if self._task("train", point.run_dir, run_dir / "logs" / "train.log"):
            self._task("eval", point.run_dir, run_dir / "logs" / "eval.log")
        else:
            graph.mark(run_dir, "eval", "cancelled", reason="training failed")

    def _stop(self, pool: ThreadPoolExecutor) -> None:
        """Ctrl-C: start nothing more (a plain shutdown would run every queued task) and end the running tasks.
        They got the SIGINT too, but one can miss it (a bare `except:` in a library it was importing), and the
        sweep would wait on it for ever: SIGTERM, then SIGKILL after STOP_GRACE_S."""
        with self._lock:
            self._stopping, children = True, list(self._children)
        pool.shutdown(wait=False, cancel_futures=True)
        for child in children:
            child.terminate()
        deadline = time.monotonic() + self.STOP_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        pool.shutdown(wait=True)

    def submit(self, manifest: graph.Manifest, plan: Plan) -> Dict:
        try:
            with cancel_as_interrupt(), graph.local_executor_running(Path(manifest.sweep_dir)):
                self.code = snapshot.code_folder(Path(manifest.sweep_dir), plugin_files=graph.plugin_files(manifest))
                record = self._run(manifest, plan)
                manifest.record(record)
                return record
        except KeyboardInterrupt:
            print(f"interrupted: `clustermask-status {manifest.sweep_dir}` shows what was done, "
                  f"`clustermask-resubmit {manifest.sweep_dir}` resumes the rest", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    def _run(self, manifest: graph.Manifest, plan: Plan) -> Dict:
        points = manifest.points
        pool = ThreadPoolExecutor(self.max_parallel)
        try:
            futures = [pool.submit(self._train_then_eval, points[i]) for i in plan.train]
            futures += [pool.submit(self._task, "eval", points[i].run_dir, Path(points[i].run_dir) / "logs" / "eval.log")
                        for i in plan.eval_only]
            for future in futures:
                future.result()
        except BaseException:
            self._stop(pool)
            raise
        pool.shutdown()
        record = {"time": _now(), "executor": "local", "code": str(self.code),
                  "train": [{"job_id": "local", "points": plan.train, "task_ids": ["local"] * len(plan.train)}],
                  "eval": [{"job_id": "local", "points": plan.train + plan.eval_only,
                            "task_ids": ["local"] * (len(plan.train) + len(plan.eval_only))}]}
        if plan.report:
            self._task("report", manifest.sweep_dir, Path(manifest.sweep_dir) / "logs" / "report.log")
            record["report"] = {"job_id": "local"}
        return record


def exit_description(code: int) -> str:
    """How a process ended, from its exit status (negative: the signal that killed it)."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


SIGKILL_HINT = (" (the kernel's OOM killer sends it when memory runs short, as does `kill -9`: a smaller "
                "train.batch_size or eval.batch_size, or fewer tasks at once, launcher.max_parallel)")


def record_unsaid_failure(where: Path, stage: str, code: int) -> Optional[str]:
    """A local task that ended without recording its verdict (killed: the OOM killer's SIGKILL, a crash in native
    code) is marked failed with how it ended (`exit_description`, and what to change after a SIGKILL), which
    `clustermask-status` shows; returns how it ended, None where the task recorded its own verdict."""
    marker = graph.read_state(where, stage) or {}
    if marker.get("state") != "running":
        return None
    how = exit_description(code)
    error = how + (SIGKILL_HINT if code == -signal.SIGKILL else "")
    graph.mark(where, stage, "failed", **{k: v for k, v in marker.items() if k not in ("state", "time")}, error=error)
    return how


# what `clustermask-cancel` sends a local sweep's process: a Ctrl-C's effect, where SIGINT may be ignored (a sweep
# started in the background of a script)
CANCEL_SIGNAL = signal.SIGUSR1


@contextlib.contextmanager
def cancel_as_interrupt():
    """While the block runs, CANCEL_SIGNAL raises KeyboardInterrupt in this process's main thread, as a Ctrl-C does
    (a process that is not the main thread's keeps the signal's own action)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(CANCEL_SIGNAL, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(CANCEL_SIGNAL, previous)


def visible_gpus() -> List[str]:
    """The GPUs a task here may use, as CUDA_VISIBLE_DEVICES names them: its entries where it is set (up to an
    invalid one, `-1`, which hides the rest from CUDA), else nvidia-smi's indices; none without NVIDIA's driver, and
    none where a GPU is split into MIG instances (CUDA_VISIBLE_DEVICES must then name the instances' UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",")]
        return list(itertools.takewhile(lambda entry: entry and not entry.startswith("-"), entries))
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index,mig.mode.current", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = [line.split(",") for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []
    if any(len(gpu) > 1 and gpu[1].strip() == "Enabled" for gpu in gpus):
        return []
    return [gpu[0].strip() for gpu in gpus]


def picks_its_gpu(stage: str, run_dir: Path) -> bool:
    """Whether a point's stage takes whichever GPU it is given (`device: auto` or `cuda`), rather than one its
    config names (`cuda:1`, which a single visible GPU would not have) or none."""
    cfg = graph.load_point_config(run_dir)
    return (cfg.train if stage == "train" else cfg.eval).device in ("auto", "cuda")


# ---------------------------------------------------------------- SLURM

_INIT_KEYS = ("_target_", "submitit_folder", "max_num_timeout")


def executor_parameters(resources, name: str) -> Dict:
    """hydra-submitit-launcher's mapping: base keys as they are, SLURM-specific ones prefixed `slurm_`."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k: v for k, v in OmegaConf.to_container(resources, resolve=True).items()
              if k not in _INIT_KEYS and v is not None}
    params["name"] = graph.safe_name(params.get("name") or name, 100)
    return {k if k in base_keys else f"slurm_{k}": v for k, v in params.items()}


SLURM_COMMANDS = ("sbatch", "srun")  # submitting, and submitit's check that it is on a cluster


def check_launcher(launcher) -> None:
    """The launcher's values, checked before the sweep writes anything (launcher: a mapping)."""
    if launcher["executor"] not in ("local", "slurm"):
        raise ValueError(f"launcher.executor={launcher['executor']!r} is not one of local, slurm")
    if launcher["max_parallel"] < 1:
        raise ValueError(f"launcher.max_parallel={launcher['max_parallel']} must be at least 1")
    if launcher["executor"] == "slurm" and launcher["max_parallel"] != 1:
        raise ValueError(f"launcher.max_parallel={launcher['max_parallel']} is the local executor's: on SLURM, "
                         "launcher.<stage>.array_parallelism limits a stage's tasks that run at once "
                         f"(launcher.train.array_parallelism={launcher['max_parallel']})")
    missing = [command for command in SLURM_COMMANDS if not shutil.which(command)] \
        if launcher["executor"] == "slurm" and not launcher["dry_run"] else []
    if missing:
        raise FileNotFoundError(f"launcher=slurm: {' and '.join(missing)} not found on PATH, so this is no SLURM "
                                "login node (launcher=local runs here; launcher.dry_run=true prints the job scripts)")
    for stage in ("train", "eval", "report"):
        check_resources(stage, launcher[stage])
        if launcher["executor"] == "slurm":
            check_time_limit(stage, launcher[stage])


def check_resources(stage: str, resources) -> None:
    gpus, tasks, nodes = resources["gpus_per_node"], resources["tasks_per_node"], resources["nodes"]
    if gpus and tasks != gpus:
        raise ValueError(f"launcher.{stage}: tasks_per_node={tasks} must equal gpus_per_node={gpus} "
                         "(one rank per GPU)")
    if nodes < 1 or tasks < 1:
        raise ValueError(f"launcher.{stage}: nodes={nodes} and tasks_per_node={tasks} must be >= 1")


# sbatch(1) on --signal: "the signal may be sent up to 60 seconds earlier than specified"
SIGNAL_EARLY_S = 60


def check_time_limit(stage: str, resources) -> None:
    """A time limit that leaves a SLURM job no time before its requeue signal: signalled as it starts, it would
    requeue max_num_timeout times without a step, then fail (timeout_min=1 under the default delay of 120 s)."""
    minutes, delay = resources["timeout_min"], resources["signal_delay_s"]
    if minutes < 0 or delay < 0:
        bad = f"timeout_min={minutes}" if minutes < 0 else f"signal_delay_s={delay}"
        raise ValueError(f"launcher.{stage}.{bad} must be at least 0 (timeout_min=0: no time limit)")
    if 0 < minutes * 60 <= delay + SIGNAL_EARLY_S:
        raise ValueError(
            f"launcher.{stage}.timeout_min={minutes} leaves the job no time before its requeue signal: SLURM sends "
            f"it launcher.{stage}.signal_delay_s={delay} s before the time limit, or up to {SIGNAL_EARLY_S} s "
            f"earlier, so it may come as the job starts, and the job would requeue {resources['max_num_timeout']} "
            f"times (max_num_timeout) getting nowhere, then fail; give timeout_min="
            f"{(delay + SIGNAL_EARLY_S) // 60 + 1} or more, or a smaller signal_delay_s")


class SubmissionError(RuntimeError):
    """sbatch refused a job of the sweep, or a Ctrl-C stopped the submission (`interrupted`); nothing of this
    submission is left queued."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


class SlurmExecutor:
    def __init__(self, launcher_cfg, sweep_dir: Path, sweep_id: str, dry_run: bool = False):
        self.cfg = launcher_cfg
        self.sweep_dir = Path(sweep_dir)
        self.sweep_id = sweep_id
        self.dry_run = dry_run
        self.code: Optional[Path] = None  # the copy of the code the jobs run, made by `submit`
        # the sweep's plugin files where its points' configs are not written (a dry run); else read from them
        self.plugin_files: Optional[List[Path]] = None

    def _executor(self, stage: str, dependency: Optional[str] = None):
        import submitit

        resources = getattr(self.cfg, stage)
        folder = resources.submitit_folder or str(self.sweep_dir / "slurm" / stage / "%j")
        # submitit builds no SLURM executor where srun is missing (its `affinity`); a dry run only writes the
        # scripts, and may do so on a laptop
        srun_not_needed = mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2)) \
            if self.dry_run else contextlib.nullcontext()
        with srun_not_needed:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                             slurm_max_num_timeout=resources.max_num_timeout)
        params = executor_parameters(resources, f"cm-{self.sweep_id}-{stage}")
        extra = dict(params.pop("slurm_additional_parameters", {}) or {})
        if dependency:
            extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        # the job runs in the submission's copy of the code, which `python -m` then imports (launch/snapshot.py);
        # without it (deleted) the job fails rather than import whatever the folder it was submitted from holds.
        # The user's setup lines (`source .venv/bin/activate`) run before, in the folder the job was submitted from.
        code = self.code or snapshot.code_folder(self.sweep_dir, write=False)
        # sbatch passes the submission's environment on, relative folders too
        absolute = [f"export {name}={shlex.quote(value)}" for name, value in snapshot.jobs_environment().items()]
        params["slurm_setup"] = [*absolute, *(params.get("slurm_setup") or []),
                                 f"cd {shlex.quote(str(code))} || exit 1"]
        executor.update_parameters(**params, slurm_additional_parameters=extra)
        return executor

    def refusals(self, plan: Plan) -> List[str]:
        """What the controller would refuse in the job script of each stage that `plan` submits (a partition,
        account or QOS that is not there, more memory or GPUs than a node has, a longer array than it allows), from
        `sbatch --test-only`: found before the sweep, or a resubmission's fixes, are written. One line per refused
        stage."""
        sizes = {"train": len(plan.train), "eval": max(len(plan.train), len(plan.eval_only)), "report": int(plan.report)}
        refused = []
        for stage, size in ((stage, size) for stage, size in sizes.items() if size):
            script = self._script(self._executor(stage), size)
            out = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                refused.append(f"launcher.{stage}: sbatch --test-only refuses its job: {' '.join(out.stderr.split())}")
        return refused

    @staticmethod
    def _script(executor, tasks: int) -> str:
        """The job script that submitit would submit for `tasks` tasks (an array if more than one)."""
        inner = executor._executor
        inner.parameters["map_count"] = tasks if tasks > 1 else None
        return inner._make_submission_file_text(inner._submitit_command_str, "")

    def _array(self, stage: str, paths: List[str], dependency: Optional[str] = None):
        from .jobs import StageTask

        raise_if_interrupted()
        executor = self._executor(stage, dependency)
        if self.dry_run:
            print(f"# ---- {stage}: array of {len(paths)} task(s) ----")
            print(self._script(executor, len(paths)))
            return [f"DRYRUN-{stage}_{i}" for i in range(len(paths))], f"DRYRUN-{stage}"
        jobs = executor.map_array(StageTask(stage), paths)
        job_id = jobs[0].job_id.split("_")[0]
        return [job.job_id for job in jobs], job_id

    @staticmethod
    def _after(kind: str, job_id: str, array: bool) -> str:
        return f"{kind}:{job_id}" if array else f"afterok:{job_id}"

    def submit(self, manifest: graph.Manifest, plan: Plan) -> Dict:
        """The plan's three sbatch calls at most, then their record in the manifest. If one is refused (a
        partition, account or QOS that is not there, a time over the partition's limit) or the user presses
        Ctrl-C, the jobs already queued by this call are cancelled: no job runs that the manifest does not
        record, and a resubmission (with the fix) submits every stage again.

        A Ctrl-C is held back until the sbatch call in flight returns, so that the id of a job it queued is
        known and can be cancelled; one that comes once the record is saved is too late to undo it."""
        queued: List[str] = []
        recorded = False
        try:
            plugin_files = self.plugin_files if self.plugin_files is not None else graph.plugin_files(manifest)
            self.code = snapshot.code_folder(self.sweep_dir, write=not self.dry_run, plugin_files=plugin_files)
            with sigint_held():
                record = self._submit(manifest, plan, queued)
                if not self.dry_run:
                    raise_if_interrupted()
                    manifest.record(record)
                    recorded = True
        # submitit's FailedJobError (a RuntimeError) carries sbatch's stderr
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if self.dry_run:
                raise
            raise SubmissionError(f"submission failed{self._cancel(queued)}: {' '.join(str(exc).split())}") from exc
        except KeyboardInterrupt:
            if not recorded:
                raise SubmissionError(f"submission interrupted{self._cancel(queued)}", interrupted=True) from None
        return record

    @staticmethod
    def _cancel(queued: List[str]) -> str:
        """scancel the jobs `queued`; what to add to the error."""
        if not queued:
            return ""
        subprocess.run(["scancel", *queued], capture_output=True, timeout=60)
        return f"; cancelled what it had queued ({', '.join(queued)})"

    def _submit(self, manifest: graph.Manifest, plan: Plan, queued: List[str]) -> Dict:
        record: Dict = {"time": _now(), "executor": "slurm", "code": str(self.code), "train": [], "eval": []}
        waits = []
        if plan.train:
            paths = [manifest.points[i].run_dir for i in plan.train]
            task_ids, train_id = self._array("train", paths)
            queued.append(train_id)
            record["train"].append({"job_id": train_id, "points": plan.train, "task_ids": task_ids})
            eval_ids, eval_id = self._array("eval", paths, self._after("aftercorr", train_id, len(paths) > 1))
            queued.append(eval_id)
            record["eval"].append({"job_id": eval_id, "points": plan.train, "task_ids": eval_ids})
            waits += [train_id, eval_id]
        if plan.eval_only:
            paths = [manifest.points[i].run_dir for i in plan.eval_only]
            eval_ids, eval_id = self._array("eval", paths)
            queued.append(eval_id)
            record["eval"].append({"job_id": eval_id, "points": plan.eval_only, "task_ids": eval_ids})
            waits.append(eval_id)
        if plan.report:
            raise_if_interrupted()
            executor = self._executor("report", "afterany:" + ":".join(waits) if waits else None)
            from .jobs import StageTask

            if self.dry_run:
                print("# ---- report: one job ----")
                print(self._script(executor, 1))
                record["report"] = {"job_id": "DRYRUN-report"}
            else:
                record["report"] = {"job_id": executor.submit(StageTask("report"), manifest.sweep_dir).job_id}
                queued.append(record["report"]["job_id"])
        return record


_HELD: List[list] = []  # per `sigint_held` block in progress, the SIGINTs its handler recorded


@contextlib.contextmanager
def sigint_held():
    """SIGINT blocked for the block, and raised as KeyboardInterrupt at its end if one came. Blocked, so that the
    sbatch children inherit the block and a Ctrl-C at the terminal does not kill one between the controller queueing
    its job and its printing the job's id; and caught, by a handler that only records it: a thread that does not
    block it (MLflow's client starts native ones) would otherwise take the signal, and Python would raise it in the
    main thread mid-block, the id of a job just queued unknown."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    _HELD.append(came)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # one still pending reaches the handler now
        signal.signal(signal.SIGINT, handler)
        _HELD.pop()
        if came:
            raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Inside `sigint_held`: a Ctrl-C that came meanwhile, raised now (before the next sbatch call)."""
    if signal.SIGINT in signal.sigpending() or (_HELD and _HELD[-1]):
        raise KeyboardInterrupt


def make_executor(launcher_cfg, sweep_dir: Path, sweep_id: str):
    check_launcher(launcher_cfg)
    if launcher_cfg.executor == "local":
        return LocalExecutor(launcher_cfg.max_parallel)
    return SlurmExecutor(launcher_cfg, sweep_dir, sweep_id, dry_run=launcher_cfg.dry_run)
