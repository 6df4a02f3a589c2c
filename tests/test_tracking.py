"""MLflow records of a sweep: one parent run, a child per point, in a sqlite store started from a template."""
from clustermask.config import TrackingConfig
from clustermask.tracking import PointRun, artifact_location, client, create_sweep_runs, resolve_uri


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
        runs = {run.info.run_id: run for run in mlflow.search_runs([experiment.experiment_id])}
        assert set(runs) == {parent, *children}  # a copy per sweep: the other sweep's runs are not here
        assert runs[children[1]].data.params == {"masking.ratio": "0.5"}
        assert runs[children[0]].data.tags["mlflow.parentRunId"] == parent
    templates = list((tmp_path / "cache" / "clustermask").glob("mlflow-*-empty.db"))
    assert len(templates) == 1
    assert client(f"sqlite:///{templates[0]}").get_experiment_by_name("ablation") is None  # it stays empty
