"""Against a real single-node SLURM (CI starts one with .ci/start_slurm.sh): arrays, aftercorr, afterany,
failure handling, status, resubmission, requeue after a time-limit signal, and a 2-process gloo job."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launch import graph
from launch.status import (cancel, format_status, plan_resubmission, report_status, resubmit, stage_state,
                           status_text, sweep_status)

from conftest import REPO, one_eval_task

pytestmark = pytest.mark.slurm

SMALL_RESOURCES = ["launcher=slurm", "launcher.train.mem_gb=3", "launcher.train.cpus_per_task=1",
                   "launcher.eval.mem_gb=3", "launcher.report.mem_gb=2", "launcher.train.timeout_min=20",
                   "train.batch_size=32", "data.workers=1"]


def launch(root, data, *overrides, cwd=REPO):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={root}", f"paths.data={data}",
                             *SMALL_RESOURCES, *overrides], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, time.time() - started


def queued() -> set:
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def leaves_the_queue(job_id: str, within_s: float = 30) -> bool:
    """Whether `job_id` leaves squeue within `within_s`: a cancelled job that had started shows as completing a
    moment longer."""
    deadline = time.time() + within_s
    while job_id in queued():
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def base_ids(manifest, submission=-1):
    record = manifest.submissions[submission]
    ids = {g["job_id"] for stage in ("train", "eval") for g in record[stage]}
    return ids | {record["report"]["job_id"]}


def wait_for(ids, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not (ids & queued()):
            return
        time.sleep(2)
    raise TimeoutError(f"jobs {ids} still queued after {timeout}s:\n" + subprocess.run(
        ["squeue"], capture_output=True, text=True).stdout)


def test_sweep_with_a_failing_point_then_resubmit(slurm, tmp_path, synthetic_root):
    # four points; the one with fail_at_step=5 crashes during training
    # one evaluation task: the stages' order and states are under test here, the tasks in test_pipeline
    stdout, seconds = launch(tmp_path, synthetic_root, "sweep_name=faulty", "train.steps=12", "train.log_every=4",
                             "train.checkpoint_every=4", "train.fail_at_step=-1,-2,-3,5", one_eval_task(synthetic_root))
    assert seconds < 60, f"submission took {seconds:.1f}s"
    sweep_dir = tmp_path / "sweeps" / "faulty"
    manifest = graph.Manifest.load(sweep_dir)
    record = manifest.submissions[0]
    assert len(record["train"]) == 1 and len(record["eval"]) == 1 and "report" in record  # three sbatch calls
    assert "train job(s): " + record["train"][0]["job_id"] in stdout
    wait_for(base_ids(manifest))

    rows = {r["point"]: r for r in sweep_status(manifest)}
    failing = next(p for p in manifest.points if "train.fail_at_step=5" in p.overrides)
    others = [p for p in manifest.points if p is not failing]
    assert rows[failing.name]["train"] == "failed" and rows[failing.name]["eval"] == "cancelled"
    assert all(rows[p.name]["train"] == "done" and rows[p.name]["eval"] == "done" for p in others)
    log = Path(rows[failing.name]["train_log"])
    assert log.exists() and "injected failure" in log.read_text() + log.with_name(
        log.name.replace("log.out", "log.err")).read_text()
    assert "torch threads: 1 (SLURM_CPUS_PER_TASK)" in log.read_text()  # launcher.train.cpus_per_task=1
    text = format_status(manifest, list(rows.values()))
    assert f"train failed, log: {log}\n         RuntimeError('train.fail_at_step=5: injected failure')" in text
    report = (sweep_dir / "report" / "results.md").read_text()
    assert report.count("\n|") >= 4  # every point has a row (the failed one without eval metrics)
    sweep_run = MlflowClient(manifest.tracking_uri).get_run(manifest.parent_run_id)
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags["points_evaluated"] == "3/4"

    finished = {p.name: Path(p.run_dir, "checkpoints", "final.pt").stat().st_mtime for p in others}
    # a fix that sbatch would refuse is named before anything is written: the point's config keeps its values
    saved = (Path(failing.run_dir) / "config.yaml").read_text()
    with pytest.raises(ValueError, match="nothing changed or submitted:\n  launcher.train: sbatch --test-only "
                                         "refuses its job: .*partition"):
        resubmit(sweep_dir, ["train.fail_at_step=-1", "launcher.train.partition=no_such_partition"])
    assert (Path(failing.run_dir) / "config.yaml").read_text() == saved
    assert len(graph.Manifest.load(sweep_dir).submissions) == 1
    # point 0 is done and keeps its config: the jobs take the fixed launcher of the points resubmitted
    record = resubmit(sweep_dir, ["train.fail_at_step=-1", "launcher.train.mem_gb=2"])
    assert record["train"][0]["points"] == [failing.index] and record["eval"][0]["points"] == [failing.index]
    script = next((sweep_dir / "slurm" / "train").glob(f"**/{record['train'][0]['job_id']}*_submission.sh"))
    assert "#SBATCH --mem=2GB" in script.read_text()
    manifest = graph.Manifest.load(sweep_dir)
    assert len(manifest.submissions) == 2
    wait_for(base_ids(manifest))
    rows = {r["point"]: r for r in sweep_status(manifest)}
    assert all(r["train"] == "done" and r["eval"] == "done" for r in rows.values())
    assert finished == {p.name: Path(p.run_dir, "checkpoints", "final.pt").stat().st_mtime for p in others}
    sweep_run = MlflowClient(manifest.tracking_uri).get_run(manifest.parent_run_id)  # the second report job's
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["points_evaluated"] == "4/4"
    assert resubmit(sweep_dir, []) is None  # running it twice changes nothing
    assert len(graph.Manifest.load(sweep_dir).submissions) == 2


def test_jobs_run_the_code_of_their_submission_whatever_the_checkout_holds_when_they_start(slurm, tmp_path,
                                                                                          synthetic_root):
    """A job may wait in the queue for days while the checkout takes the next experiment's edits; it runs the copy
    of the code its submission made (launch/snapshot.py), not what the checkout holds when it starts. The sweep's
    plugin files are copied with it: `mine.py` edited for the next experiment is not this sweep's strategy."""
    import hashlib

    from launch.snapshot import PACKAGES

    checkout = tmp_path / "checkout"
    for folder in (*PACKAGES, "configs"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    plugin = checkout / "mine.py"
    plugin.write_text("from clustermask.masking import register_strategy, score_random\n"
                      "register_strategy('mine')(score_random)\n")
    submitted = hashlib.sha256(plugin.read_bytes()).hexdigest()[:12]
    # submitted from that checkout (the sweep command imports it), the training held until the checkout is edited
    launch(tmp_path, synthetic_root, "sweep_name=held", "train.steps=4", "train.log_every=2",
           "train.checkpoint_every=2", one_eval_task(synthetic_root), "+launcher.train.additional_parameters.hold=true",
           "plugins=[mine.py]", "masking.strategy=mine", cwd=checkout)
    sweep_dir = tmp_path / "sweeps" / "held"
    manifest = graph.Manifest.load(sweep_dir)
    code = Path(manifest.submissions[0]["code"])
    assert code.parent == sweep_dir / "code" and (code / "launch" / "jobs.py").is_file()
    edited = checkout / "launch" / "jobs.py"
    edited.write_text(edited.read_text() + "\nraise RuntimeError('the checkout was edited after the submission')\n")
    plugin.write_text("raise RuntimeError('mine.py was edited after the submission')\n")
    subprocess.run(["scontrol", "release", manifest.submissions[0]["train"][0]["job_id"]], check=True)
    wait_for(base_ids(manifest))
    run_dir = Path(manifest.points[0].run_dir)
    for stage in ("train", "eval"):
        state = graph.read_state(run_dir, stage)
        assert state["state"] == "done" and state["code"] == str(code), state
    assert "the checkout was edited" not in (code / "launch" / "jobs.py").read_text()
    tags = MlflowClient(manifest.tracking_uri).get_run(manifest.points[0].mlflow_run_id).data.tags
    assert tags["train_plugins"] == tags["eval_plugins"] == f"{plugin}@{submitted}"  # named as given, its code copied


def done_and_total(progress: str):
    """(done, total) of a stage's progress as the status shows it: "40/200", or "40/200, 22% waiting for data" while
    the loader holds training up."""
    done, total = re.match(r"(\d+)/(\d+)", progress).groups()
    return int(done), int(total)


def signal_when_running(manifest, stage: str, job_id: str, ready):
    """Send what SLURM sends ahead of the time limit (submitit asks for --signal=USR2@delay) once `ready(done,
    total)` holds for the stage's progress; returns that (done, total). The wait covers the stages before."""
    deadline = time.time() + 600
    while True:
        row = sweep_status(manifest)[0]
        progress = row[f"{stage}_progress"]
        if row[stage] == "running" and progress and ready(*done_and_total(progress)):
            break
        assert time.time() < deadline, f"{stage} never got far enough: {row}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    return done_and_total(progress)


def test_time_limit_signal_requeues_and_resumes(slurm, tmp_path, synthetic_root):
    """Training, then evaluation, signalled: each is requeued as the same job and goes on where it was."""
    # long enough to be signalled mid-way: the signal comes with the first checkpoint, 5-20 s in, and the 110
    # steps after it take 20 s or more; its one training job at a time has the node's two cores
    # a log each step: the signalled attempt logs steps after its checkpoint, which the requeued one redoes
    launch(tmp_path, synthetic_root, "sweep_name=requeue", "train.steps=120", "train.checkpoint_every=10",
           "train.log_every=1", "launcher.train.cpus_per_task=2")
    sweep_dir = tmp_path / "sweeps" / "requeue"
    manifest = graph.Manifest.load(sweep_dir)
    point = manifest.points[0]
    train_job, eval_job = (manifest.submissions[0][stage][0]["job_id"] for stage in ("train", "eval"))
    latest = Path(point.run_dir) / "checkpoints" / "latest.pt"
    trained, total = signal_when_running(manifest, "train", train_job,  # steps, as last logged
                                         lambda done, total: latest.exists() and done > 0)
    assert total == 120 and 0 < trained < 120
    # the job may log a step or two more before the signal reaches it (a log each step)
    shown = re.search(r"running (\d+)/120", format_status(manifest, [sweep_status(manifest)[0]]))
    assert shown and int(shown.group(1)) >= trained
    # requeued, SLURM holds the job a while (BeginTime): it was `pending (BeginTime)`, as if never started
    deadline = time.time() + 60
    while (row := sweep_status(manifest)[0])["train"] != "pending":
        assert time.time() < deadline, row
        time.sleep(0.2)
    requeued_at = re.search(r"^pending \(\w+\), requeued at (\d+)/120$", stage_state(row, "train"))
    assert requeued_at and int(requeued_at.group(1)) >= trained, row
    tasks = len(graph.load_point_config(Path(point.run_dir)).eval.tasks)
    evaluated, _ = signal_when_running(manifest, "eval", eval_job, lambda done, total: done >= 2)
    wait_for(base_ids(manifest), timeout=900)
    rows = sweep_status(manifest)
    assert rows[0]["train"] == "done" and rows[0]["eval"] == "done"
    logs = {stage: "".join(p.read_text() for p in (sweep_dir / "slurm" / stage).rglob("*_log.*"))
            for stage in ("train", "eval")}
    # submitit logs "Requeued job" after `scontrol requeue` returns, which can be after SLURM has already
    # killed the step; slurmstepd's own line says the same
    assert all("Requeued job" in log or "DUE TO JOB REQUEUE" in log for log in logs.values())
    assert "resumed from" in logs["train"]
    # each job's own process took the signal once, and left without an error: its loader workers, which SLURM
    # signals as well, leave the requeue to it
    for stage in ("train", "eval"):
        out = "".join(p.read_text() for p in (sweep_dir / "slurm" / stage).rglob("*_log.out"))
        assert out.count("Caught signal SIGUSR2") == 1, out[-3000:]
        assert "triggered an exception" not in logs[stage], logs[stage][-3000:]
        assert "saved nothing to resume from" not in logs[stage]  # each attempt checkpointed, or evaluated a task
    assert Path(point.run_dir, "checkpoints", "final.pt").exists() and not latest.exists()
    # the evaluation tasks finished before the signal are read back (and logged again, with the same value)
    read_back = logs["eval"].count("with the same settings: read back from")
    assert evaluated <= read_back < tasks, logs["eval"][-3000:]
    client = MlflowClient(manifest.tracking_uri)
    history = client.get_metric_history(point.mlflow_run_id, "zeroshot_classification/wds/shapes/acc1")
    assert len(history) == 2 and history[0].value == history[1].value
    # the steps that the requeued attempt redoes (those after the checkpoint it resumed from) draw the data and masks
    # that the signalled attempt drew: the same losses, to the last bit
    losses = {}
    for metric in client.get_metric_history(point.mlflow_run_id, "train/loss"):
        losses.setdefault(metric.step, []).append(metric.value)
    redone = {step: values for step, values in losses.items() if len(values) > 1}
    assert all(len(set(values)) == 1 for values in redone.values()), redone
    print(f"steps redone after the requeue, with the same losses: {sorted(redone)}")
    # the requeued attempt counts the signalled one's time up to the signal, steps it redoes included
    minutes = [m.value for m in sorted(client.get_metric_history(point.mlflow_run_id, "train/minutes"),
                                       key=lambda m: (m.timestamp, m.step))]
    assert minutes == sorted(minutes)
    assert len(list(Path(point.run_dir, "results").glob("*.json"))) == tasks
    # both attempts trained on this node: it is named once, with the threads of the job's two cpus
    assert client.get_run(point.mlflow_run_id).data.tags["train_hardware"].startswith("1x cpu (2 threads, ")
    assert " + " not in client.get_run(point.mlflow_run_id).data.tags["train_hardware"]


RANKS_RANDOM = """
import os
from pathlib import Path

from clustermask.masking import register_strategy, score_random


@register_strategy("ranks_random")  # random masking that says which ranks ran it
def ranks_random(inputs, cfg):
    Path(__file__).with_name(f"ran_on_rank_{os.environ.get('RANK', '-')}").touch()
    return score_random(inputs, cfg)
"""


@pytest.fixture
def ranks_random_plugin(tmp_path, restore_strategies):
    """A plugin file; the strategy it registers is unregistered after the test (a resubmission imports it here)."""
    (tmp_path / "ranks_random.py").write_text(RANKS_RANDOM)
    return tmp_path / "ranks_random.py"


def test_two_process_gloo_training_then_evaluating_again(slurm, tmp_path, synthetic_root, ranks_random_plugin):
    """Two ranks under srun, each importing the sweep's plugin; then an evaluation again."""
    launch(tmp_path, synthetic_root, "sweep_name=ddp", "train.steps=10", "launcher.train.tasks_per_node=2",
           "train.threads=1", one_eval_task(synthetic_root), f"plugins=[{ranks_random_plugin}]",
           "masking.strategy=ranks_random")
    sweep_dir = tmp_path / "sweeps" / "ddp"
    manifest = graph.Manifest.load(sweep_dir)
    wait_for(base_ids(manifest))
    rows = sweep_status(manifest)
    assert rows[0]["train"] == "done" and rows[0]["eval"] == "done", format_status(manifest, rows)
    logs = "".join(p.read_text() for p in (sweep_dir / "slurm" / "train").rglob("*_log.*"))
    assert "distributed: rank 0 of 2" in logs and "distributed: rank 1 of 2" in logs
    copied = Path(manifest.submissions[0]["code"]) / "plugin_files"  # the plugin file as its submission copied it
    assert (copied / "ran_on_rank_0").exists() and (copied / "ran_on_rank_1").exists()
    mlflow = MlflowClient(manifest.tracking_uri)
    run_id = manifest.points[0].mlflow_run_id
    both, one = (mlflow.get_metric_history(run_id, key)[-1].value
                 for key in ("train/samples_per_s", "train/samples_per_s_per_rank"))
    assert both == pytest.approx(2 * one)
    assert mlflow.get_run(run_id).data.tags["train_hardware"].startswith("2x cpu (1 thread, ")  # what it trained on
    results = json.loads(next(Path(manifest.points[0].run_dir, "results").glob("*.json")).read_text())
    assert results["metrics"]["acc1"] > 0
    # evaluating again: an eval-only array (no dependency) and the report after it, with the fixes saved
    record = resubmit(sweep_dir, ["eval.batch_size=32", "launcher.eval.mem_gb=2"], evaluate_again=True)
    assert record["train"] == [] and record["eval"][0]["points"] == [0] and "report" in record
    script = next((sweep_dir / "slurm" / "eval").glob(f"**/{record['eval'][0]['job_id']}*_submission.sh"))
    assert "#SBATCH --mem=2GB" in script.read_text()
    manifest = graph.Manifest.load(sweep_dir)
    wait_for(base_ids(manifest))
    rows = sweep_status(manifest)
    assert rows[0]["eval"] == "done" and rows[0]["eval_job"] == record["eval"][0]["task_ids"][0]
    assert graph.load_point_config(Path(manifest.points[0].run_dir)).eval.batch_size == 32


def test_cancelling_a_sweep_stops_its_jobs_marks_its_stages_cancelled_and_resubmission_resumes_it(
        slurm, tmp_path, synthetic_root, capsys):
    """A bug seen just after submitting: `clustermask-cancel SWEEP` rather than finding three job ids for scancel,
    after which the trainings it stopped showed as failed (they left the queue mid-run without a verdict)."""
    launch(tmp_path, synthetic_root, "sweep_name=cancel", "masking.ratio=0.3,0.5,0.7", "train.steps=2000",
           "launcher.train.array_parallelism=2", one_eval_task(synthetic_root))
    sweep_dir = tmp_path / "sweeps" / "cancel"
    manifest = graph.Manifest.load(sweep_dir)
    jobs = base_ids(manifest)
    deadline = time.time() + 300
    while [row["train"] for row in sweep_status(manifest)].count("running") < 2:  # two at a time: one waits
        assert time.time() < deadline, sweep_status(manifest)
        time.sleep(0.5)
    assert cancel(sweep_dir, dry_run=True) == sorted(jobs) and jobs <= queued()  # says, cancels nothing
    assert "would cancel job(s)" in capsys.readouterr().out
    assert cancel(sweep_dir) == sorted(jobs)
    assert not jobs & queued()
    out = capsys.readouterr().out
    assert "2 stage(s) running, 5 queued" in out and f"clustermask-resubmit {sweep_dir}" in out
    rows = sweep_status(manifest)
    assert all(row[stage] == "cancelled" for row in rows for stage in graph.STAGES), rows
    assert report_status(manifest)["report"] == "cancelled"
    assert graph.read_state(Path(manifest.points[0].run_dir), "train")["reason"] == "clustermask-cancel"
    mlflow = MlflowClient(manifest.tracking_uri)
    assert {mlflow.get_run(p.mlflow_run_id).info.status for p in manifest.points} == {"KILLED"}
    assert mlflow.get_run(manifest.parent_run_id).info.status == "KILLED"
    assert cancel(sweep_dir) == [] and "nothing to cancel" in capsys.readouterr().out
    assert plan_resubmission(rows).train == [0, 1, 2]  # all of it, each training from its last checkpoint


def test_a_training_stopped_with_scancel_shows_as_cancelled_not_failed(slurm, tmp_path, synthetic_root):
    """Seen by hand: a training stopped with scancel rather than clustermask-cancel showed as failed, with the error
    of its data workers (SLURM's SIGTERM kills them first), and clustermask-status exited 1. slurmstepd's line in
    the job's stderr says it was cancelled, and when."""
    launch(tmp_path, synthetic_root, "sweep_name=scancel", "train.steps=2000", "train.log_every=5",
           one_eval_task(synthetic_root))
    sweep_dir = tmp_path / "sweeps" / "scancel"
    manifest = graph.Manifest.load(sweep_dir)
    deadline = time.time() + 300
    while not sweep_status(manifest)[0]["train_progress"]:  # running, its data workers started
        assert time.time() < deadline, sweep_status(manifest)
        time.sleep(0.5)
    subprocess.run(["scancel", manifest.latest_jobs(0)["train"], manifest.report_job()], check=True)  # no report
    wait_for(base_ids(manifest))
    row, = sweep_status(manifest)
    assert (row["train"], row["eval"]) == ("cancelled", "cancelled"), row
    assert re.fullmatch(r"scancel at 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d", row["train_reason"]), row
    text, failed, _ = status_text(str(sweep_dir))
    assert not failed and f"cancelled ({row['train_reason']})" in text, text
    assert plan_resubmission([row]).train == [0]


def test_the_demo_sent_to_slurm_says_where_to_follow_it(slurm, tmp_path):
    """`clustermask-demo launcher=slurm` returns once the jobs are queued: it read a report that was not written yet
    and ended in a traceback. It now says how to follow the sweep. Its jobs are cancelled at once here."""
    demo = Path(sys.executable).parent / "clustermask-demo"
    result = subprocess.run([str(demo), "--root", str(tmp_path), *SMALL_RESOURCES], capture_output=True, text=True,
                            timeout=300)
    sweep_dir = next((tmp_path / "sweeps").iterdir())
    manifest = graph.Manifest.load(sweep_dir)
    subprocess.run(["scancel", *base_ids(manifest)], check=True)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    status = demo.parent / "clustermask-status"  # the venv's, runnable without activating it
    assert result.stdout.rstrip().endswith(f"[demo] the sweep was submitted to SLURM and runs on: follow it with "
                                           f"{status} {sweep_dir}; its report job writes the tables and "
                                           f"plots to {sweep_dir / 'report'}")
    assert manifest.executor == "slurm" and len(manifest.points) == 4


def test_a_sweep_that_slurm_would_refuse_is_stopped_before_anything_is_written(slurm, tmp_path, synthetic_root):
    """`sbatch --test-only` on each stage's script finds what the controller would refuse, naming the stage."""
    result = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                             f"paths.data={synthetic_root}", *SMALL_RESOURCES, "launcher.train.mem_gb=100000",
                             "launcher.eval.partition=no_such_partition", "masking=random,cluster"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-3] == "error: preflight failed, nothing was submitted:"
    assert lines[-2].startswith("  launcher.train: sbatch --test-only refuses its job: ")
    assert lines[-1].startswith("  launcher.eval: sbatch --test-only refuses its job: ") and "partition" in lines[-1]
    assert not (tmp_path / "sweeps").exists()


# sbatch, except that it refuses the second job it is asked to submit, as a QOS limit on the jobs a user may
# have queued does (MaxSubmitJobs): `--test-only` does not check it, so only the submission finds it
SBATCH_WITH_A_SUBMIT_LIMIT = """#!/bin/bash
for arg in "$@"; do [ "$arg" = --test-only ] && exec {sbatch} "$@"; done
count=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $count > {counter}
if [ $count -ge 2 ]; then
  echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2
  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit)" >&2
  exit 1
fi
exec {sbatch} "$@"
"""

# sbatch, except that from the third job it is asked to submit on, the user presses Ctrl-C (a SIGINT to the sweep
# command, which waits for it) once the controller has queued the job and before sbatch prints its id; every id it
# printed goes to {counter}.ids
SBATCH_INTERRUPTED_FROM_THE_THIRD_JOB = """#!/bin/bash
for arg in "$@"; do [ "$arg" = --test-only ] && exec {sbatch} "$@"; done
count=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $count > {counter}
out=$({sbatch} "$@") || exit 1
echo "$out" | grep -o '[0-9]*' >> {counter}.ids
[ $count -ge 3 ] && kill -INT $PPID
echo "$out"
"""


def sbatch_in_front(tmp_path, script: str) -> dict:
    """An environment whose `sbatch` is `script` ({sbatch}: the real one, {counter}: a file it may count in)."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "sbatch").write_text(script.format(sbatch=shutil.which("sbatch"), counter=tmp_path / "submitted"))
    (wrapper / "sbatch").chmod(0o755)
    return {**os.environ, "PATH": f"{wrapper}{os.pathsep}{os.environ['PATH']}"}


def test_a_ctrl_c_during_the_submission_cancels_every_job_the_sweep_had_queued(slurm, tmp_path, synthetic_root):
    """Nothing may stay queued that the manifest does not record: a resubmission would submit it again, and two
    jobs would train the same point into the same folder. The Ctrl-C comes during the last sbatch call, after the
    controller queued its job: the report job, which would run once the others are cancelled (afterany)."""
    interrupted = sbatch_in_front(tmp_path, SBATCH_INTERRUPTED_FROM_THE_THIRD_JOB)
    result = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                             f"paths.data={synthetic_root}", *SMALL_RESOURCES, "train.steps=4",
                             one_eval_task(synthetic_root)], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=interrupted, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr[-3000:]
    queued_by_sbatch = (tmp_path / "submitted.ids").read_text().split()
    assert len(queued_by_sbatch) == 3
    sweep_dir = next(tmp_path.glob("sweeps/*"))
    error = result.stderr.strip().splitlines()[-2:]
    assert error[0] == f"error: submission interrupted; cancelled what it had queued ({', '.join(queued_by_sbatch)})"
    assert error[1].endswith(f"none of it runs: submit it with `clustermask-resubmit {sweep_dir}`")
    assert "Traceback" not in result.stderr
    assert all(leaves_the_queue(job_id) for job_id in queued_by_sbatch)
    assert graph.Manifest.load(sweep_dir).submissions == []
    assert graph.read_state(sweep_dir, "report") is None  # the report job never started
    # the resubmission, interrupted during its first sbatch call: its training array is cancelled, nothing recorded
    resubmit_cli = Path(sys.executable).parent / "clustermask-resubmit"
    result = subprocess.run([str(resubmit_cli), str(sweep_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env=interrupted, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                             signal.SIG_DFL))
    assert result.returncode == 130, result.stderr[-3000:]
    train_array = (tmp_path / "submitted.ids").read_text().split()[-1]
    assert result.stderr.strip().splitlines()[-1] == ("error: submission interrupted; cancelled what it had queued "
                                                      f"({train_array})") and "Traceback" not in result.stderr
    assert leaves_the_queue(train_array)
    assert graph.Manifest.load(sweep_dir).submissions == []


def test_a_refused_sbatch_cancels_what_the_sweep_had_queued_and_resubmission_recovers(slurm, tmp_path,
                                                                                       synthetic_root):
    """The training array is queued, then sbatch refuses the evaluation array (a QOS submit limit): the launch
    fails naming sbatch's reason, cancels the training array, and the sweep is resubmitted whole."""
    result = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                             f"paths.data={synthetic_root}", *SMALL_RESOURCES, "train.steps=4",
                             one_eval_task(synthetic_root)], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=sbatch_in_front(tmp_path, SBATCH_WITH_A_SUBMIT_LIMIT))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-2:]
    assert error[0].startswith("error: submission failed; cancelled what it had queued (")
    assert "QOSMaxSubmitJobPerUserLimit" in error[0] and "clustermask-resubmit" in error[1]
    assert leaves_the_queue(error[0].split("(")[1].split(")")[0])
    sweep_dir = next(tmp_path.glob("sweeps/*"))
    manifest = graph.Manifest.load(sweep_dir)
    assert manifest.submissions == []
    rows = sweep_status(manifest)
    assert [(r["train"], r["eval"]) for r in rows] == [("not submitted", "not submitted")]
    assert format_status(manifest, rows, report_status(manifest)).endswith(f"report not submitted (job -): "
                                                                          f"{sweep_dir / 'report'}")
    record = resubmit(sweep_dir, [])
    waiting = []  # status says why the evaluation waits (squeue may not give the reason at once)
    for _ in range(20):
        waiting.append(format_status(manifest, sweep_status(graph.Manifest.load(sweep_dir))))
        if "pending (Dependency)" in waiting[-1]:
            break
        time.sleep(0.5)
    assert "pending (Dependency)" in waiting[-1], waiting
    wait_for(base_ids(graph.Manifest.load(sweep_dir)))
    manifest = graph.Manifest.load(sweep_dir)
    rows = sweep_status(manifest)
    assert (rows[0]["train"], rows[0]["eval"]) == ("done", "done"), format_status(manifest, rows)
    assert record["train"][0]["points"] == [0]
    report = report_status(manifest)
    assert (report["report"], report["report_job"]) == ("done", record["report"]["job_id"])
