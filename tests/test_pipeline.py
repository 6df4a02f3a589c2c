"""The whole vertical slice on the embedded default (local executor): train -> eval -> MLflow -> report."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from launch import graph
from launch.status import cancel, format_status, plan_resubmission, report_status, sweep_status

from conftest import REPO, interrupt_when, one_eval_task, process_group

STEPS = 60


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("outputs")
    result = subprocess.run(
        [sys.executable, "-m", "launch.app", "-m", "experiment=demo", f"paths.root={root}",
         f"paths.data={synthetic_root}", f"train.steps={STEPS}", "train.checkpoint_every=30", "sweep_name=e2e",
         "report.plot_metric=linear_probe/wds/shapes/lp_acc5"],
        capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "sweeps" / "e2e", result.stdout


OWN_STRATEGY = """
from pathlib import Path

import torch
from clustermask.masking import MaskScores, register_strategy


@register_strategy("first_rows_first")
def score_first_rows_first(inputs, cfg):
    Path(__file__).with_name("strategy_ran").touch()
    b, length, _ = inputs.tokens.shape
    return MaskScores(torch.arange(length, 0, -1, device=inputs.tokens.device).float().expand(b, length), None, None)
"""

OWN_EVALUATOR = """
from clustermask.evaluate import register_evaluator


@register_evaluator("logit_scale", options=("log",))
def logit_scale(model, transform, tokenizer, task, ctx):
    yield "value", float(model.logit_scale if task.options.get("log") else model.logit_scale.exp())
"""


def test_a_researchers_own_strategy_and_evaluator_run_from_plugins_and_their_yaml(tmp_path, synthetic_root):
    """Extending the method without editing the library: a .py file that registers a strategy (`plugins=[file]`,
    relative to where the command runs), a module on PYTHONPATH that registers an evaluator (`lab`, relative too:
    the jobs run in their copy of the code, elsewhere) and a YAML for each in the researcher's config folder
    (`hydra.searchpath`). The sweep command checks the point against them, the jobs import them, and the
    evaluator's metrics land in MLflow as the built-in ones'. A resubmission finds a group option in that folder
    too: `--evaluate-again eval=NAME` of the researcher's own YAML. What that evaluation no longer evaluates is
    superseded: its metric's latest value in MLflow is NaN (its history keeps the value), its JSON is set aside and
    the report has no column of it."""
    (tmp_path / "mine.py").write_text(OWN_STRATEGY)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "labeval.py").write_text(OWN_EVALUATOR)
    task = "{name: logit_scale, dataset: own/logit_scale, root: '${data.eval_root}'}"
    for group, text in (("masking", "strategy: first_rows_first\nratio: 0.5\n"), ("eval", f"tasks:\n  - {task}\n")):
        (tmp_path / "conf" / group).mkdir(parents=True)
        (tmp_path / "conf" / group / "mine.yaml").write_text(text)
    command = [sys.executable, "-m", "launch.app", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
               "plugins=[mine.py,labeval]", "masking=mine", "eval=mine", "paths.root=out",
               f"paths.data={synthetic_root}", "train.steps=4", "train.batch_size=8", "train.log_every=2",
               "sweep_name=own"]
    # the options the plugin evaluator declares reach the sweep command's checks: a typo is refused there
    typo = subprocess.run(command + ["+eval.tasks.0.options.lgo=true"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env={**os.environ, "PYTHONPATH": "lab"})
    assert typo.returncode == 2 and ("eval.tasks[0].options.lgo: logit_scale reads no such option (did you mean "
                                     "log?); it reads log") in typo.stderr, typo.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    dry = subprocess.run(command + ["launcher.dry_run=true"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600, env={**os.environ, "PYTHONPATH": "lab"})
    named = re.search(r"copies the code its jobs run to (\S+)\)$", dry.stdout, re.MULTILINE).group(1)
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "PYTHONPATH": "lab"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = graph.Manifest.load(tmp_path / "out" / "sweeps" / "own")
    run = mlflow.MlflowClient(manifest.tracking_uri).get_run(manifest.points[0].mlflow_run_id)
    assert run.data.params["masking.strategy"] == "first_rows_first"
    assert run.data.params["plugins"] == str([str(tmp_path / "mine.py"), "labeval"])
    # the jobs ran the copy of mine.py made with the code (the dry run named it); the sweep command's check, the file
    code = Path(manifest.submissions[0]["code"])
    assert str(code) == named and (code / "plugin_files" / "strategy_ran").exists()
    assert (tmp_path / "strategy_ran").exists()
    digests = [hashlib.sha256(text.encode()).hexdigest()[:12] for text in (OWN_STRATEGY, OWN_EVALUATOR)]
    assert run.data.tags["train_plugins"] == run.data.tags["eval_plugins"] == \
        f"{tmp_path / 'mine.py'}@{digests[0]} labeval@{digests[1]}"
    assert run.data.metrics["logit_scale/own/logit_scale/value"] > 1
    assert run.data.metrics["mask/drop_ratio"] == 0.5

    (tmp_path / "conf" / "eval" / "more.yaml").write_text(
        "tasks:\n  - {name: logit_scale, dataset: own/again, root: '${data.eval_root}'}\n")
    resubmit = Path(sys.executable).parent / "clustermask-resubmit"  # from elsewhere: the sweep knows its folder
    again = subprocess.run([str(resubmit), str(tmp_path / "out" / "sweeps" / "own"), "--evaluate-again", "eval=more"],
                           capture_output=True, text=True, cwd=REPO, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "lab")})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client, run_id = mlflow.MlflowClient(manifest.tracking_uri), manifest.points[0].mlflow_run_id
    metrics, before = client.get_run(run_id).data.metrics, run.data.metrics["logit_scale/own/logit_scale/value"]
    assert metrics["logit_scale/own/again/value"] == before
    assert math.isnan(metrics["logit_scale/own/logit_scale/value"])
    assert [m.value for m in client.get_metric_history(run_id, "logit_scale/own/logit_scale/value")][0] == before
    run_dir = Path(manifest.points[0].run_dir)
    assert metrics["train/loss"] == run.data.metrics["train/loss"]
    assert "no longer evaluated" in (run_dir / "logs" / "eval.log").read_text()
    results = run_dir / "results"
    assert [p.name.split("_")[:2] for p in results.glob("*.json")] == [["own", "again"]]
    assert [p.name.split("_")[:3] for p in (results / "superseded").glob("*.json")] == [["own", "logit", "scale"]]
    report = (tmp_path / "out" / "sweeps" / "own" / "report" / "results_all_metrics.csv").read_text()
    assert "logit_scale/own/again/value" in report and "logit_scale/own/logit_scale/value" not in report


def test_manifest_and_run_directories(local_sweep):
    sweep_dir, stdout = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    assert len(manifest.points) == 4 and manifest.executor == "local"
    assert all("train.steps=60" in p.overrides for p in manifest.points)  # common overrides are part of a point
    assert {tuple(o for o in p.overrides if o.startswith("masking")) for p in manifest.points} == {
        ("masking.ratio=0.3", "masking=random"), ("masking.ratio=0.5", "masking=random"),
        ("masking.ratio=0.3", "masking=cluster"), ("masking.ratio=0.5", "masking=cluster")}
    for point in manifest.points:
        run_dir = graph.Path(point.run_dir)
        assert (run_dir / "checkpoints" / "final.pt").exists()
        # latest.pt (written at step 30, with the optimizer state) has no use once final.pt is there
        assert not (run_dir / "checkpoints" / "latest.pt").exists()
        assert (run_dir / "masks.png").stat().st_size > 1000
        results = list((run_dir / "results").glob("*.json"))
        assert len(results) == 10
        dump = json.loads(results[0].read_text())
        assert set(dump) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert "manifest:" in stdout
    # the tasks ran the copy of the code the sweep made, not the checkout the command ran in (launch/snapshot.py)
    code = Path(manifest.submissions[-1]["code"])
    assert code.parent == sweep_dir / "code" and (code / "launch" / "jobs.py").read_bytes() == \
        (REPO / "launch" / "jobs.py").read_bytes()
    states = [graph.read_state(Path(p.run_dir), stage) for p in manifest.points for stage in ("train", "eval")]
    assert {state["code"] for state in states + [graph.read_state(sweep_dir, "report")]} == {str(code)}


def test_models_beat_chance_by_a_clear_margin(local_sweep):
    sweep_dir, _ = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    for point in manifest.points:
        path = next((graph.Path(point.run_dir) / "results").glob("shapes_*zeroshot_classification.json"))
        metrics = json.loads(path.read_text())["metrics"]
        assert metrics["acc1"] >= 2 * metrics["chance"], (point.name, metrics)


def test_the_demos_summary_shows_the_table_and_commands_that_run_without_the_venv_activated(local_sweep, capsys):
    """What `clustermask-demo` prints at its end, on the demo's own sweep (the e2e one): its commands are the venv's
    scripts, which exist; a name clash in it once ended the demo in a TypeError after the sweep had run."""
    from launch import demo

    sweep_dir, _ = local_sweep
    demo.print_summary(sweep_dir, 12.0)
    out = capsys.readouterr().out
    assert (sweep_dir / "report" / "results.md").read_text() in out and "[demo] finished in 12s" in out
    mlflow_ui = re.search(r"MLflow UI +: (\S+) ui --backend-store-uri sqlite:///(\S+)  ", out)
    status = re.search(r"status +: (\S+) (\S+)$", out, re.MULTILINE)
    assert mlflow_ui and Path(mlflow_ui[1]) == Path(sys.executable).parent / "mlflow" and Path(mlflow_ui[1]).exists()
    assert Path(mlflow_ui[2]) == sweep_dir / "mlflow.db" and Path(mlflow_ui[2]).exists()
    assert status and Path(status[1]).name == "clustermask-status" and Path(status[1]).exists()
    plots = re.search(r"plots +: (.+)$", out, re.MULTILINE)[1].split(", ")
    assert plots and all((sweep_dir / "report" / name).exists() for name in plots)


def test_mlflow_holds_one_run_per_point_with_the_metrics(local_sweep):
    sweep_dir, _ = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    mlflow.set_tracking_uri(manifest.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[manifest.experiment],
                              filter_string=f"tags.sweep_id = '{manifest.sweep_id}' and tags.kind = 'point'")
    assert len(runs) == 4
    assert set(runs["run_id"]) == {p.mlflow_run_id for p in manifest.points}
    assert (runs["tags.mlflow.parentRunId"] == manifest.parent_run_id).all()
    assert (runs["status"] == "FINISHED").all()
    expected = ["metrics.zeroshot_classification/wds/shapes/acc1", "metrics.linear_probe/wds/shapes/lp_acc1",
                "metrics.zeroshot_retrieval/wds/scenes/image_retrieval_recall_at_1",
                "metrics.image_caption_selection/sugar_crepe/swap_att/acc", "metrics.train/loss"]
    for column in expected:
        assert runs[column].notna().all(), column
    assert (runs["metrics.train/minutes"] > 0).all()
    # what its minutes were measured on, once (each point trained in one attempt here)
    hardware = runs["tags.train_hardware"]
    assert hardware.str.fullmatch(r"1x cpu \(\d+ threads?, [^+]+\)").all(), hardware
    assert set(runs["params.masking.strategy"]) == {"random", "cluster"}
    cluster = runs[runs["params.masking.strategy"] == "cluster"]
    assert cluster["metrics.mask/coverage_mean"].notna().all()
    history = mlflow.tracking.MlflowClient().get_metric_history(runs["run_id"][0], "train/loss")
    assert len(history) == STEPS // 20
    artifacts = mlflow.tracking.MlflowClient().list_artifacts(runs["run_id"][0])
    assert [a.path for a in artifacts] == ["masks.png"]
    assert list((sweep_dir / "mlartifacts").rglob("masks.png")) and not (REPO / "mlruns").exists()
    # the sweep's own run holds the report and ends with it
    sweep_run = mlflow.tracking.MlflowClient().get_run(manifest.parent_run_id)
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["points_evaluated"] == "4/4"
    report = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(manifest.parent_run_id, "report")}
    assert {"report/results.md", "report/results_all_metrics.csv",
            "report/zeroshot_classification_wds_shapes_acc1.png"} <= report


def test_report_has_every_point(local_sweep):
    sweep_dir, _ = local_sweep
    report = sweep_dir / "report"
    table = (report / "results.md").read_text().splitlines()
    rows = [line for line in table[2:] if line.startswith("|")]
    assert len(rows) == 4
    labels = {(r.split("|")[1].strip(), float(r.split("|")[2])) for r in rows}
    assert labels == {("random", 0.3), ("random", 0.5), ("cluster-rgb", 0.3), ("cluster-rgb", 0.5)}
    assert "zs_acc1" in table[0] and "sc_mean" in table[0] and table[0].rstrip(" |").endswith("train_min")
    assert (report / "results.tex").read_text().count("\\\\") >= 5
    mean_rows = [line for line in (report / "results_mean.md").read_text().splitlines()[2:] if line.startswith("|")]
    assert len(mean_rows) == 4 and all(r.split("|")[3].strip() == "1" for r in mean_rows)  # one seed each
    for plot in ("zeroshot_classification_wds_shapes_acc1", "linear_probe_wds_shapes_lp_acc1",
                 "image_caption_selection_sugar_crepe_swap_att_acc", "linear_probe_wds_shapes_lp_acc5",
                 "zeroshot_classification_wds_shapes_acc1_vs_train_minutes"):
        assert (report / f"{plot}.png").stat().st_size > 5000, plot  # the last one: report.plot_metric
    assert len(list(report.glob("masks_*.png"))) == 4
    code = Path(graph.Manifest.load(sweep_dir).submissions[-1]["code"]).name  # what each point trained with
    every_metric = pd.read_csv(report / "results_all_metrics.csv", dtype={"code": str})
    assert set(every_metric["code"]) == {code}
    assert every_metric["hardware"].str.startswith("1x cpu (").all()
    header = (report / "results_all_metrics.csv").read_text().splitlines()[0].split(",")
    metrics = header[header.index("label") + 1:]  # every metric of every point, findable by name
    assert metrics == sorted(metrics) and "train/loss" in metrics and len(metrics) >= 40, header


def test_plot_draws_a_line_per_strategy_over_every_ratio(local_sweep):
    from analysis.report import plot_metric, sweep_frame

    sweep_dir, _ = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    frame = sweep_frame(manifest.tracking_uri, manifest.experiment, manifest.sweep_id)
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Axes.plot

    def spy(self, x, y, *args, **kwargs):
        captured[kwargs.get("label")] = (list(x), list(y))
        return original(self, x, y, *args, **kwargs)

    plt.Axes.plot = spy
    try:
        plot_metric(frame, "zeroshot_classification/wds/shapes/acc1", sweep_dir / "check.png")
    finally:
        plt.Axes.plot = original
    assert set(captured) == {"random", "cluster-rgb"}
    assert all(x == [0.3, 0.5] for x, _ in captured.values())


def test_status_shows_done_and_resubmit_has_nothing_to_do(local_sweep):
    sweep_dir, _ = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    rows = sweep_status(manifest)
    assert all(r["train"] == "done" and r["eval"] == "done" for r in rows)
    assert format_status(manifest, rows, report_status(manifest)).endswith(
        f"4/4 point(s) evaluated; report done (job local): {sweep_dir / 'report'}")
    assert plan_resubmission(rows).empty
    again = subprocess.run([sys.executable, "-m", "launch.status", str(sweep_dir)], capture_output=True, text=True)
    assert again.returncode == 0


def test_a_sweep_copied_elsewhere_reads_its_own_runs_and_mlflow_store(local_sweep, tmp_path):
    """rsync'd from the cluster to a laptop: status and the report read the copy's run directories and MLflow
    store, not those at the place the manifest says the sweep was made (the original here; often nothing, where
    MLflow would create an empty store and the report find no run)."""
    from analysis.report import build_report
    from clustermask.tracking import RunLogger

    sweep_dir, _ = local_sweep
    copy = tmp_path / "laptop" / "e2e"
    shutil.copytree(sweep_dir, copy)
    manifest = graph.Manifest.load(copy)
    assert manifest.sweep_dir == str(copy) and manifest.tracking_uri == f"sqlite:///{copy / 'mlflow.db'}"
    # its MLflow UI shows the copy's own artifacts (the mask pictures, the report), not the original's
    copied_store = mlflow.MlflowClient(manifest.tracking_uri)
    for run_id, artifact in ((manifest.points[0].mlflow_run_id, "masks.png"), (manifest.parent_run_id, "report")):
        assert copied_store.get_run(run_id).info.artifact_uri.startswith(copy.as_uri() + "/mlartifacts/")
        assert Path(copied_store.download_artifacts(run_id, artifact, str(tmp_path / "got"))).exists()
    assert copied_store.get_experiment("0").artifact_location == (copy / "mlartifacts").as_uri()  # `Default` too
    assert mlflow.MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}").get_run(
        manifest.points[0].mlflow_run_id).info.artifact_uri.startswith(sweep_dir.as_uri())
    assert all(Path(point.run_dir).parent.parent == copy for point in manifest.points)
    graph.state_path(manifest.points[1].run_dir, "eval").unlink()
    rows = sweep_status(manifest)
    assert [row["eval"] for row in rows] == ["done", "cancelled", "done", "done"]
    assert rows[0]["train_log"] == str(Path(manifest.points[0].run_dir) / "logs" / "train.log")  # the copy's log
    RunLogger(manifest.tracking_uri, manifest.points[0].mlflow_run_id).metrics({"extra/copied": 7.0})
    build_report(copy, out_dir=tmp_path / "report")
    assert pd.read_csv(tmp_path / "report" / "results_all_metrics.csv")["extra/copied"].max() == 7.0
    original = graph.Manifest.load(sweep_dir)
    assert original.tracking_uri != manifest.tracking_uri
    assert "extra/copied" not in mlflow.MlflowClient(original.tracking_uri).get_run(
        manifest.points[0].mlflow_run_id).data.metrics
    assert [row["eval"] for row in sweep_status(original)] == ["done"] * 4
    (copy / "mlflow.db").unlink()  # copied without its store: named, and none is made
    with pytest.raises(FileNotFoundError, match=f"no MLflow store at {copy / 'mlflow.db'}"):
        build_report(copy, out_dir=tmp_path / "again")
    assert not (copy / "mlflow.db").exists()


def test_the_report_job_plots_a_plot_metric_that_a_resubmission_fixed(local_sweep, tmp_path):
    """A fix reaches only the points it resubmits; the report job read point 0's config, and plotted the fixed
    metric only if point 0 was among them."""
    from launch import jobs
    from launch.status import apply_overrides

    copy = tmp_path / "e2e"
    shutil.copytree(local_sweep[0], copy)
    manifest = graph.Manifest.load(copy)
    apply_overrides(manifest, [2], ["report.plot_metric=zeroshot_classification/wds/shapes/acc5"])
    report = Path(jobs.report(str(copy)))
    for plot in ("linear_probe_wds_shapes_lp_acc5", "zeroshot_classification_wds_shapes_acc5"):
        assert (report / f"{plot}.png").stat().st_size > 5000, plot


def test_relaunching_into_an_existing_sweep_is_refused(local_sweep, synthetic_root):
    sweep_dir, _ = local_sweep
    before = (sweep_dir / "manifest.json").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "launch.app", "-m", "experiment=demo", f"paths.root={sweep_dir.parent.parent}",
         f"paths.data={synthetic_root}", "sweep_name=e2e"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and "already holds a sweep" in (result.stderr + result.stdout)
    assert (sweep_dir / "manifest.json").read_text() == before


def test_evaluating_again_adds_the_new_metric_to_every_trained_point_and_the_report(local_sweep):
    """A researcher wants recall@10 of every trained point: `clustermask-resubmit SWEEP --evaluate-again
    eval...` evaluates each again (no training), logs to the same MLflow runs, and rebuilds the report."""
    sweep_dir, _ = local_sweep
    manifest = graph.Manifest.load(sweep_dir)
    checkpoints = {p.index: (graph.Path(p.run_dir) / "checkpoints" / "final.pt").stat().st_mtime_ns
                   for p in manifest.points}
    report_time = (sweep_dir / "report" / "results.md").stat().st_mtime_ns
    fix = "eval.tasks.2.options.recall_k=[1,5,10]"
    resubmit = graph.Path(sys.executable).parent / "clustermask-resubmit"  # the installed command
    result = subprocess.run([str(resubmit), str(sweep_dir), "--evaluate-again", fix], capture_output=True, text=True,
                            cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("(already trained)") == 4 and "train[" not in result.stdout
    key = "zeroshot_retrieval/wds/scenes/image_retrieval_recall_at_10"
    client = mlflow.tracking.MlflowClient(manifest.tracking_uri)
    for point in manifest.points:
        run = client.get_run(point.mlflow_run_id)
        assert 0 <= run.data.metrics[key] <= 1 and run.data.tags["resubmit_overrides"] == fix
        dump = next((graph.Path(point.run_dir) / "results").glob("scenes_*zeroshot_retrieval.json"))
        assert "image_retrieval_recall@10" in json.loads(dump.read_text())["metrics"]
        assert (graph.Path(point.run_dir) / "checkpoints" / "final.pt").stat().st_mtime_ns == checkpoints[point.index]
        # every task evaluated again, not read back as a resubmission after a failure would
        assert "read back from" not in (graph.Path(point.run_dir) / "logs" / "eval.log").read_text()
    rows = sweep_status(graph.Manifest.load(sweep_dir))
    assert all(r["train"] == "done" and r["eval"] == "done" for r in rows)
    assert (sweep_dir / "report" / "results.md").stat().st_mtime_ns > report_time
    header = (sweep_dir / "report" / "results_retrieval.md").read_text().splitlines()[0]
    assert all(f"scenes_{direction}_r{k}" in header for direction in ("i2t", "t2i") for k in (1, 5, 10)), header


def test_status_shows_how_far_a_running_evaluation_has_got(local_sweep, monkeypatch):
    """Beside a running stage, `clustermask-status` shows its progress as the task records it: here the
    evaluation tasks done (training's steps are checked on SLURM, in test_time_limit_signal_requeues_and_resumes)."""
    from launch import jobs

    sweep_dir, _ = local_sweep
    point = graph.Manifest.load(sweep_dir).points[0]
    shown, mark = [], graph.mark

    def mark_then_read_status(run_dir, stage, state, **info):
        mark(run_dir, stage, state, **info)
        manifest = graph.Manifest.load(sweep_dir)
        row = sweep_status(manifest)[0]
        shown.append((row["eval"], row["eval_progress"], format_status(manifest, [row]).splitlines()[2]))

    monkeypatch.setattr(graph, "mark", mark_then_read_status)
    jobs.eval_point(point.run_dir)
    assert [s[:2] for s in shown] == [("running", "")] + [("running", f"{i}/10") for i in range(1, 11)] + [("done", "")]
    assert "running 3/10" in shown[3][2] and "done" in shown[-1][2]


def test_a_killed_local_sweep_is_shown_failed_and_resubmission_resumes_it(tmp_path, synthetic_root):
    """Ctrl-C, the OOM killer, a closed laptop: a local task killed mid-run leaves its running marker behind. There
    is no queue to ask, so status reads the marker's pid: gone, the point is failed, not running for ever (when
    resubmission would skip it as still queued), its evaluation is no longer pending, and resubmission resumes it
    from its checkpoint."""
    command = [sys.executable, "-m", "launch.app", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
               "sweep_name=killed", "masking=random", "train.steps=40", "train.batch_size=32", "train.log_every=5",
               "train.checkpoint_every=10", one_eval_task(synthetic_root)]
    sweep_dir = tmp_path / "sweeps" / "killed"
    with process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as sweep:
        deadline = time.time() + 300
        while not list(sweep_dir.glob("points/*/checkpoints/latest.pt")):
            assert time.time() < deadline and sweep.poll() is None, "the sweep never checkpointed"
            time.sleep(0.2)
        manifest = graph.Manifest.load(sweep_dir)
        row = sweep_status(manifest)[0]
        assert (row["train"], row["eval"]) == ("running", "pending")  # the evaluation waits for its training
    # leaving the block killed the sweep command and its training task, as the OOM killer would
    deadline = time.time() + 30  # SIGKILL is delivered, and the dead task reaped, a moment later
    while (row := sweep_status(manifest)[0])["train"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert (row["train"], row["eval"]) == ("failed", "cancelled")  # nothing will run it now
    assert plan_resubmission([row]).train == [0]
    # as if the code had been edited since: the training resumes from its checkpoint with other code, said
    marker = graph.state_path(Path(manifest.points[0].run_dir), "train")
    began_with = json.loads(marker.read_text())["code"]
    assert Path(began_with).parent == sweep_dir / "code"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "code": str(sweep_dir / "code" / ("0" * 12))}))
    resubmit = graph.Path(sys.executable).parent / "clustermask-resubmit"
    result = subprocess.run([str(resubmit), str(sweep_dir)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (f"note: 1 point(s) trained earlier with other code than this submission's (code/{Path(began_with).name}):"
            " point 0 (code/000000000000); one resumed from a checkpoint goes on with the new code") in result.stdout
    row = sweep_status(graph.Manifest.load(sweep_dir))[0]
    assert (row["train"], row["eval"]) == ("done", "done")
    assert "resumed from" in (graph.Path(manifest.points[0].run_dir) / "logs" / "train.log").read_text()


def test_a_point_trained_again_with_a_fix_is_reported_with_the_setting_it_trained_with(tmp_path, synthetic_root):
    """A point's training fails; resubmitted with `train.lr=0.0005`, it trains at that rate. Its MLflow params keep
    the value it was created with (MLflow's params cannot change), so its training job tags what it trained with
    otherwise, and the report labels it by that: `random lr=0.0005` beside `random lr=0.001`, not two alike."""
    command = [sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
               "sweep_name=fixed", "masking=random", "train.steps=4", "train.batch_size=8", "train.log_every=2",
               "train.fail_at_step=-1,2", one_eval_task(synthetic_root)]
    made = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert made.returncode == 1, made.stdout[-3000:] + made.stderr[-3000:]  # one training failed
    sweep_dir = tmp_path / "sweeps" / "fixed"
    manifest = graph.Manifest.load(sweep_dir)
    failing = next(i for i, p in enumerate(manifest.points) if "train.fail_at_step=2" in p.overrides)
    resubmit = graph.Path(sys.executable).parent / "clustermask-resubmit"
    result = subprocess.run([str(resubmit), str(sweep_dir), "train.fail_at_step=-1", "train.lr=0.0005"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(manifest.tracking_uri)
    runs = [client.get_run(p.mlflow_run_id).data for p in manifest.points]
    assert [run.params["train.lr"] for run in runs] == ["0.001", "0.001"]  # as created
    assert json.loads(runs[failing].tags["train_fixed_settings"]) == {"train.fail_at_step": "-1", "train.lr": "0.0005"}
    assert "train_fixed_settings" not in runs[1 - failing].tags
    table = pd.read_csv(sweep_dir / "report" / "results_all_metrics.csv")
    assert sorted(table["label"]) == ["random lr=0.0005", "random lr=0.001"]
    assert table.set_index("label").loc["random lr=0.0005", "point"] == manifest.points[failing].name


def test_a_local_task_killed_by_the_os_is_shown_failed_with_how_it_ended(tmp_path, synthetic_root):
    """The OOM killer's SIGKILL leaves a task no moment to record its verdict. The local executor, which outlives
    it, records how it ended, and status shows it (with what to change for memory) instead of a bare `failed`."""
    from launch.status import status_text

    command = [sys.executable, "-m", "launch.app", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
               "sweep_name=oom", "masking=random", "train.steps=400", "train.batch_size=16", "train.log_every=2",
               one_eval_task(synthetic_root)]
    sweep_dir = tmp_path / "sweeps" / "oom"
    with process_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sweep:
        deadline = time.time() + 300
        while not (marker := graph.read_state(next(iter(sweep_dir.glob("points/*")), sweep_dir), "train") or {}).get(
                "progress"):
            assert time.time() < deadline and sweep.poll() is None, "the training never logged a step"
            time.sleep(0.2)
        os.kill(marker["pid"], signal.SIGKILL)
        out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 1, out[-3000:]
    assert re.search(r"\[local\] train \S+: FAILED \(killed by SIGKILL\), log ", out), out[-3000:]
    text, failed, _ = status_text(str(sweep_dir))
    assert failed and "killed by SIGKILL (the kernel's OOM killer sends it when memory runs short" in text, text
    assert graph.read_state(next(sweep_dir.glob("points/*")), "eval")["state"] == "cancelled"


@pytest.mark.parametrize("reaches", ["process group", "sweep command only"])
def test_ctrl_c_stops_a_local_sweep_at_once_and_says_how_to_resume(tmp_path, synthetic_root, reaches):
    """Ctrl-C reaches the sweep command and its running task (one process group): the sweep must stop there,
    not start the points still queued behind it, and say how to go on. A task can miss its SIGINT (a library's
    bare `except:` while it imports; seen once in CI, where the sweep then waited on it): the sweep command ends
    it itself, which the second case checks by sending the SIGINT to the sweep command alone."""
    command = [sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
               "sweep_name=interrupted", "masking=random", "train.seed=0,1", "train.steps=400", "train.batch_size=32"]
    sweep_dir = tmp_path / "sweeps" / "interrupted"
    code, stderr = interrupt_when(command, lambda: list(sweep_dir.glob("points/*/status/train.json")),
                                  "the first point's training", group=reaches == "process group")
    assert code == 130 and f"clustermask-resubmit {sweep_dir}` resumes the rest" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    rows = sweep_status(graph.Manifest.load(sweep_dir))
    assert [(r["train"], r["eval"]) for r in rows] == [("failed", "cancelled"), ("cancelled", "cancelled")]
    assert not (graph.Path(graph.Manifest.load(sweep_dir).points[1].run_dir) / "status").exists()  # never started


def test_cancelling_a_local_sweep_stops_it_as_a_ctrl_c_would_and_marks_what_it_stopped(tmp_path, synthetic_root,
                                                                                       capsys):
    """`clustermask-cancel` of a local sweep started in the background of a script (SIGINT ignored, so no Ctrl-C
    reaches it): its process stops its running task and starts no other, and the training it stopped is cancelled,
    not failed."""
    import signal

    command = [sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
               "sweep_name=cancelled", "masking=random", "train.seed=0,1", "train.steps=400", "train.batch_size=32"]
    sweep_dir = tmp_path / "sweeps" / "cancelled"
    with process_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) as run:
        deadline = time.time() + 300
        while not list(sweep_dir.glob("points/*/status/train.json")):
            assert time.time() < deadline and run.poll() is None, "the first training never started"
            time.sleep(0.05)
        assert cancel(sweep_dir, dry_run=True) == [str(run.pid)] and run.poll() is None
        assert cancel(sweep_dir) == [str(run.pid)]
        stdout, stderr = run.communicate(timeout=90)
    assert run.returncode == 130 and f"clustermask-resubmit {sweep_dir}` resumes the rest" in stderr, stderr[-2000:]
    assert re.search(r"^\[local\] train \S+: stopped$", stdout, re.M) and "Traceback" not in stderr
    manifest = graph.Manifest.load(sweep_dir)
    rows = sweep_status(manifest)
    assert [(r["train"], r["eval"]) for r in rows] == [("cancelled", "cancelled")] * 2
    assert graph.read_state(graph.Path(manifest.points[0].run_dir), "train")["reason"] == "clustermask-cancel"
    runs = mlflow.tracking.MlflowClient(manifest.tracking_uri)
    assert {runs.get_run(point.mlflow_run_id).info.status for point in manifest.points} == {"KILLED"}  # ran or not
    assert report_status(manifest)["report"] == "cancelled"
    assert runs.get_run(manifest.parent_run_id).info.status == "KILLED"
    assert cancel(sweep_dir) == [] and "nothing to cancel" in capsys.readouterr().out
    assert plan_resubmission(rows).train == [0, 1]


def test_ctrl_c_stops_the_demo_as_it_stops_its_sweep(tmp_path):
    """`clustermask-demo` runs the sweep command as a child, which gets the Ctrl-C too: the demo waits while the
    sweep ends its task, marks what never ran and says how to resume (`subprocess.call` killed it a quarter second
    after the Ctrl-C), then exits 130 without a traceback. Interrupted while it writes its data, it keeps none."""
    demo = graph.Path(sys.executable).parent / "clustermask-demo"
    command = [str(demo), "--root", str(tmp_path), "train.steps=400"]
    code, stderr = interrupt_when(command, lambda: list(tmp_path.glob("data/.synthetic.partial-*/train/*.tar")),
                                  "writing the data")
    assert code == 130 and stderr.rstrip().endswith("[demo] interrupted while writing the synthetic data "
                                                    "(none of it kept)"), stderr[-2000:]
    assert "Traceback" not in stderr and list((tmp_path / "data").iterdir()) == []
    code, stderr = interrupt_when(command, lambda: list(tmp_path.glob("sweeps/*/points/*/status/train.json")),
                                  "the demo's first point")
    sweep_dir = next(tmp_path.glob("sweeps/*"))
    assert code == 130 and stderr.rstrip().endswith("[demo] interrupted"), stderr[-2000:]
    assert f"clustermask-resubmit {sweep_dir}` resumes the rest" in stderr and "Traceback" not in stderr
    rows = sweep_status(graph.Manifest.load(sweep_dir))
    assert [(r["train"], r["eval"]) for r in rows] == [("failed", "cancelled")] + [("cancelled", "cancelled")] * 3


def test_a_dry_run_of_the_demo_ends_saying_so(tmp_path):
    """`clustermask-demo launcher.dry_run=true` printed the jobs, then a traceback: it read the report of a sweep
    that was never written."""
    demo = graph.Path(sys.executable).parent / "clustermask-demo"
    result = subprocess.run([str(demo), "--root", str(tmp_path), "launcher=slurm", "launcher.dry_run=true"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "# ---- train: array of 4 task(s) ----" in result.stdout
    assert result.stdout.rstrip().endswith("[demo] a dry run: nothing was trained, so there is no table to show")
    assert not (tmp_path / "sweeps").exists()
