"""MLflow records of a sweep: one parent run, a child per point, in a sqlite store started from a template,
or on a real `mlflow server`."""
import contextlib
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from clustermask.config import TrackingConfig
from clustermask.tracking import (PointRun, artifact_location, client, create_sweep_runs, new_sqlite_store,
                                  resolve_uri)

from conftest import free_port


def test_new_sqlite_stores_start_from_one_migrated_template(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = TrackingConfig(experiment="ablation")
    for sweep in ("a", "b"):
        uri = resolve_uri(cfg, tmp_path / sweep)
        points = [PointRun("p0", "masking.ratio=0.3", {"masking.ratio": "0.3"}),
                  PointRun("p1", "masking.ratio=0.5", {"masking.ratio": "0.5"})]
        parent, children = create_sweep_runs(cfg, uri, f"sweep-{sweep}", {"points": "2"}, points,
                                             artifact_location(cfg, tmp_path / sweep))
        mlflow = client(uri)
        experiment = mlflow.get_experiment_by_name("ablation")
        assert experiment.artifact_location == (tmp_path / sweep / "mlartifacts").as_uri()
        # not ./mlruns of the folder the template was made in (this test's, the first time)
        assert mlflow.get_experiment("0").artifact_location == experiment.artifact_location
        runs = {run.info.run_id: run for run in mlflow.search_runs([experiment.experiment_id])}
        assert set(runs) == {parent, *children}  # a copy per sweep: the other sweep's runs are not here
        assert runs[children[1]].data.params == {"masking.ratio": "0.5"}
        assert runs[children[0]].data.tags["mlflow.parentRunId"] == parent
        new_sqlite_store(tmp_path / sweep / "mlflow.db")  # made again by a process that found none a moment ago
        with contextlib.closing(sqlite3.connect(tmp_path / sweep / "mlflow.db")) as db:  # the file, not a connection
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (3,)
        assert [p.name for p in (tmp_path / sweep).iterdir()] == ["mlflow.db"]
    templates = list((tmp_path / "cache" / "clustermask").glob("mlflow-*-empty.db"))
    assert len(templates) == 1
    assert client(f"sqlite:///{templates[0]}").get_experiment_by_name("ablation") is None  # it stays empty


@contextlib.contextmanager
def mlflow_server_at(root, port: int):
    """A real `mlflow server` (sqlite backend, artifacts served over HTTP), as a team would run one: its URI once
    it answers; stopped at the end."""
    server_log = open(root / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                                "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=server_log)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        server_log.close()


@pytest.fixture(scope="module")
def failing_fast():
    """The client's default retries a failing server for minutes per call; here a failure should show at once."""
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    yield
    env.undo()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, failing_fast):
    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server_at(root, free_port()) as uri:
        yield uri, root

def test_a_tracking_server_holds_the_same_records(mlflow_server, tmp_path):
    """tracking.uri=http://...: runs, params, metrics, tags and the mask picture go to the server, and the
    report reads them back as from the sqlite default."""
    from analysis.report import sweep_frame
    from clustermask.tracking import RunLogger

    uri, root = mlflow_server
    cfg = TrackingConfig(uri=uri, experiment="team")
    assert resolve_uri(cfg, tmp_path) == uri and artifact_location(cfg, tmp_path) is None
    params = {"masking.strategy": "cluster", "masking.features": "rgb", "masking.attention": "False",
              "masking.ratio": "0.5", "train.seed": "0"}
    parent, (run_id,) = create_sweep_runs(cfg, uri, "s", {}, [PointRun("p0", "masking=cluster", params)])
    logger = RunLogger(uri, run_id)
    logger.metrics({"zeroshot_classification/wds/shapes/acc1": 0.4, "train/loss": 2.0}, step=3)
    logger.tags({"train_state": "done"})
    picture = tmp_path / "masks.png"
    picture.write_bytes(b"\x89PNG not really")
    logger.artifact(picture)
    logger.finish()
    frame = sweep_frame(uri, "team", "s")
    assert frame.loc[0, "label"] == "cluster-rgb" and frame.loc[0, "zeroshot_classification/wds/shapes/acc1"] == 0.4
    stored = list((root / "artifacts").rglob("masks.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == picture.read_bytes()
    assert client(uri).get_run(run_id).data.tags["train_state"] == "done"
    report = tmp_path / "report"  # a folder, as the report job puts the report into the sweep's run
    report.mkdir()
    (report / "results.md").write_text("| label |")
    RunLogger(uri, parent).artifact(report, "report")
    assert [a.path for a in client(uri).list_artifacts(parent, "report")] == ["report/results.md"]
    # rebuilt without a plot that the one before had: the server's copy goes too
    (report / "lp.png").write_bytes(b"\x89PNG")
    assert RunLogger(uri, parent).replace_artifacts(report, "report") == []
    (report / "lp.png").unlink()
    assert RunLogger(uri, parent).replace_artifacts(report, "report") == ["report/lp.png"]
    assert [a.path for a in client(uri).list_artifacts(parent, "report")] == ["report/results.md"]
    assert [p.name for p in (root / "artifacts").rglob("*") if p.parent.name == "report"] == ["results.md"]


def test_a_report_rebuilt_replaces_the_sweep_runs_report_in_the_sweeps_own_store(tmp_path, monkeypatch):
    """The default store (sqlite, artifacts in the sweep's mlartifacts/): a report rebuilt without a file that the
    one before had leaves the sweep run's artifacts without it too, as the report's folder is."""
    from clustermask.tracking import RunLogger

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = TrackingConfig(experiment="sweeps")
    uri = resolve_uri(cfg, tmp_path / "sweep")
    parent, _ = create_sweep_runs(cfg, uri, "s", {}, [], artifact_location(cfg, tmp_path / "sweep"))
    report = tmp_path / "sweep" / "report"
    report.mkdir()
    for name in ("results.md", "lp.png", "zs.png"):
        (report / name).write_text(name)
    assert RunLogger(uri, parent).replace_artifacts(report, "report") == []
    (report / "lp.png").unlink()
    (report / "zs.png").write_text("rebuilt")
    assert RunLogger(uri, parent).replace_artifacts(report, "report") == ["report/lp.png"]
    assert [a.path for a in client(uri).list_artifacts(parent, "report")] == ["report/results.md", "report/zs.png"]
    stored = next((tmp_path / "sweep" / "mlartifacts").rglob("zs.png"))
    assert stored.read_text() == "rebuilt" and not (stored.parent / "lp.png").exists()


def test_training_metrics_the_server_cannot_take_wait_for_the_next_log(tmp_path, failing_fast):
    """The server stops (a restart) between two logs: the training's metrics of the log in between warn and wait,
    and go with the next log once it is back; none is lost, and nothing is sent twice."""
    from mlflow.exceptions import MlflowException

    from clustermask.tracking import MetricsThatWait, RunLogger

    port = free_port()
    with mlflow_server_at(tmp_path, port) as uri:
        _, (run_id,) = create_sweep_runs(TrackingConfig(uri=uri, experiment="team"), uri, "s", {},
                                         [PointRun("p0", "", {})])
        log = MetricsThatWait(RunLogger(uri, run_id))
        log({"train/loss": 3.0, "train/lr": 0.1}, 10)
    with pytest.warns(UserWarning, match=r"MLflow did not take the metrics of step 20; .* \(2 values\)"):
        log({"train/loss": 2.0, "train/lr": 0.2}, 20)
    with mlflow_server_at(tmp_path, port):
        log({"train/loss": 1.0, "train/lr": 0.3}, 30)
        history = {key: sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))
                   for key in ("train/loss", "train/lr")}
    assert history == {"train/loss": [(10, 3.0), (20, 2.0), (30, 1.0)], "train/lr": [(10, 0.1), (20, 0.2), (30, 0.3)]}
    assert log.unsent == []
    with pytest.raises(MlflowException, match="recall@1"):  # what no store takes fails at once: no outage to wait out
        MetricsThatWait(RunLogger(f"sqlite:///{tmp_path / 'runs.db'}", "no-run"))({"recall@1": 0.5}, 40)


def test_every_metric_name_an_evaluator_may_yield_is_a_key_mlflow_takes(tmp_path):
    """An evaluator's metric names are its own (a plugin's `acc(top-1)`): MLflow refused a batch with one it does not
    take, after the whole evaluation, and the evaluation job failed on every resubmission."""
    from clustermask.evaluate import EvalTask, metric_key
    from clustermask.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, (run_id,) = create_sweep_runs(TrackingConfig(uri=uri), uri, "s", {}, [PointRun("p0", "", {})])
    task = EvalTask("own_eval", "wds/own-set.v2", "")
    names = ["acc1", "recall@5", "acc(top-1)", "f1%", "mean ± std", "a:b", "per class/cat", "précision"]
    keys = [metric_key(task, name) for name in names]
    RunLogger(uri, run_id).metrics(dict.fromkeys(keys, 0.5))
    assert sorted(client(uri).get_run(run_id).data.metrics) == sorted(keys)
    assert keys[:5] == ["own_eval/wds/own-set.v2/acc1", "own_eval/wds/own-set.v2/recall_at_5",
                        "own_eval/wds/own-set.v2/acc_top-1_", "own_eval/wds/own-set.v2/f1_",
                        "own_eval/wds/own-set.v2/mean _ std"]
    assert len(set(keys)) == len(keys)
