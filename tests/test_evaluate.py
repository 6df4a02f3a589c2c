from pathlib import Path

from clip_benchmark.metrics import linear_probe

from clustermask.evaluate import EvalContext, EvalTask, linear_probe_eval, run_task
from clustermask.model import ModelConfig, create

from conftest import SMALL


def test_each_cuda_linear_probe_starts_from_an_empty_feature_cache(tmp_path, synthetic_root, monkeypatch):
    """clip_benchmark's linear probe (CUDA only, so replaced here by a recorder that caches as it does) keeps
    features in feature_root/model_id and reuses a cache it finds there. Each dataset must get its own empty
    directory, a stale cache from an earlier evaluation must not be read, and nothing is left behind."""
    calls = []

    def caching_evaluate(model, train, test, *, model_id, feature_root, **options):
        cache = Path(feature_root) / model_id
        calls.append((cache, sorted(p.name for p in cache.glob("*"))))
        cache.mkdir(exist_ok=True)
        (cache / "targets_train.pt").write_bytes(b"features of this model on this dataset")
        return {"lp_acc1": 0.5}

    monkeypatch.setattr(linear_probe, "evaluate", caching_evaluate)
    ctx = EvalContext("cuda", batch_size=32, workers=0, amp=False, feature_dir=tmp_path / "features")
    stale = ctx.feature_dir / "wds_shapes"
    stale.mkdir(parents=True)
    (stale / "targets_train.pt").write_bytes(b"features of the previous model")
    root = str(synthetic_root / "eval" / "shapes")
    for dataset in ("wds/shapes", "wds/shapes_again"):
        task = EvalTask("linear_probe", dataset, root)
        assert dict(linear_probe_eval(None, None, None, task, ctx)) == {"lp_acc1": 0.5}
    assert [files for _, files in calls] == [[], []]
    assert calls[0][0] != calls[1][0]
    assert not any(cache.exists() for cache, _ in calls)


def test_more_loader_workers_than_shards_give_the_same_metrics(tmp_path, synthetic_root):
    """webdataset 1.x fails a loader that has more workers than the split has shards: evaluation takes at most
    one worker per shard, as training does."""
    model, _, transform, tokenizer, _ = create(ModelConfig(), None)
    model.eval()
    task = EvalTask("zeroshot_classification", "wds/shapes", str(synthetic_root / "eval" / "shapes"))
    results = [run_task(model, transform, tokenizer, task, EvalContext("cpu", 32, workers, False, tmp_path))
               for workers in (0, SMALL["eval_shards"] + 2)]
    assert results[0] == results[1] and results[0]["acc1"] >= 0
