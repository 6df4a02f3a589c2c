import itertools
from types import SimpleNamespace

from clustermask import train
from clustermask.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig


def test_throughput_counts_the_steps_of_each_log_interval(tmp_path, synthetic_root, monkeypatch):
    """5 steps logged every 2: intervals of 2, 2 and 1 steps, each one clock second long."""
    clock = itertools.count()
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    logged = {}
    trainer = train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                            TrainConfig(steps=5, batch_size=8, log_every=2, warmup_steps=1, device="cpu"),
                            tmp_path / "run", log=lambda metrics, step: logged.setdefault(step, metrics))
    trainer.run()
    assert {step: m["train/samples_per_s"] for step, m in logged.items()} == {2: 16.0, 4: 16.0, 5: 8.0}
