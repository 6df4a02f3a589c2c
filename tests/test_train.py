import itertools
from types import SimpleNamespace

import torch

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


def test_each_cuda_process_takes_its_local_gpu_before_nccl_starts(monkeypatch):
    """Multi-GPU jobs (8 tasks per node, each seeing the node's 8 GPUs): rank 1 must work on cuda:1, and be
    bound to it before the NCCL group starts (no GPU here, so the two calls are recorded, not made)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    assert train.init_distributed("cuda") == (1, 2, "cuda:1")
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]
    calls.clear()
    assert train.init_distributed("cpu") == (1, 2, "cpu")
    assert calls == [("init", "gloo")]
