import itertools
import json
import time
from types import SimpleNamespace

import pytest
import torch

from clustermask import train
from clustermask.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig
from conftest import NEEDS_CUDA, ON_GPU, free_port


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
    assert all(m["train/samples_per_s_per_rank"] == m["train/samples_per_s"] for m in logged.values())


def test_a_contrastive_batch_of_one_is_refused_before_the_first_step(tmp_path, synthetic_root):
    """CLIP's loss of one image and its caption is 0 whatever the weights: 200 steps learnt nothing, silently."""
    trainer = train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                            TrainConfig(steps=5, batch_size=1, warmup_steps=1, device="cpu"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"^train.batch_size=1 on 1 rank\(s\) is a contrastive batch of one"):
        trainer.run()
    assert not (tmp_path / "run").exists()


def test_the_hardware_a_training_ran_on_names_each_kind_its_attempts_ran_on(monkeypatch):
    """Its minutes depend on it: a point requeued onto other nodes names both kinds, each once."""
    description = train.hardware_description("cpu", 1, 3)
    assert description.startswith("1x cpu (3 threads") and description.endswith(")")
    model = train.cpu_model()
    assert model and model in description  # Linux names its CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU {device}")
    assert train.hardware_description("cuda", 8, 1) == "8x GPU cuda"
    trainer = train.Trainer(ModelConfig(), MaskingConfig(), DataConfig("x", "y"), TrainConfig(threads=5), ".")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert trainer.hardware().startswith("2x cpu (5 threads")
    assert train.hardware_description("cpu", 1, 1).startswith("1x cpu (1 thread, ")
    first = train.hardware_so_far(None, "8x A")
    assert first == "8x A" and train.hardware_so_far(first, "8x A") == "8x A"
    assert train.hardware_so_far(train.hardware_so_far(first, "8x B"), "8x A") == "8x A + 8x B"


def test_training_time_is_summed_over_a_resumption(tmp_path, synthetic_root, monkeypatch):
    """A clock that ticks one second per reading. Run 1 starts its loop at 0, logs steps 1 and 2 at 1 and 2,
    checkpoints at 3 (step 2), logs step 3 at 4, fails before step 4 and records the 5 s it spent. Run 2 resumes
    from step 2 with those 5 s (step 3 cost time, though it is redone), starts at 6, logs at 7 and 8, saves
    final.pt at 9: the point cost 5 + 3 s, not the 3 s of the last run alone nor the checkpoint's 3 + 3 s."""
    clock = itertools.count()
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    logged, spent_at_log = {}, {}

    def log(metrics, step):
        logged[step] = metrics
        spent_at_log[step] = train.read_spent(tmp_path / "run")  # on record at each log: a SIGKILL loses no more

    def trainer(fail_at_step):
        return train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                             DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                             TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                                         device="cpu", fail_at_step=fail_at_step),
                             tmp_path / "run", log=log)

    with pytest.raises(RuntimeError, match="injected failure"):
        trainer(fail_at_step=3).run()
    assert spent_at_log == {step: m["train/minutes"] * 60 for step, m in logged.items()} == {1: 1, 2: 2, 3: 4}
    assert torch.load(train.checkpoint_paths(tmp_path / "run")[0], weights_only=True)["train_seconds"] == 3.0
    assert train.read_spent(tmp_path / "run") == 5.0
    final = trainer(fail_at_step=-1).run()
    assert {step: m["train/minutes"] * 60 for step, m in logged.items()} == {1: 1.0, 2: 2.0, 3: 6.0, 4: 7.0}
    assert torch.load(final, weights_only=True)["train_seconds"] == 8.0
    assert not train.spent_path(tmp_path / "run").exists()


def test_an_attempt_killed_outright_counts_up_to_its_last_checkpoint(tmp_path, synthetic_root, monkeypatch):
    """As above, but the spent time on record (1 s) is older than the checkpoint (3 s), as when an attempt killed
    outright (SIGKILL, a node lost) had checkpointed after its last log. The resumed run counts from the
    checkpoint's 3 s."""
    clock = itertools.count()
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    logged = {}

    def trainer(fail_at_step):
        return train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                             DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                             TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                                         device="cpu", fail_at_step=fail_at_step),
                             tmp_path / "run", log=lambda metrics, step: logged.update({step: metrics}))

    with pytest.raises(RuntimeError, match="injected failure"):
        trainer(fail_at_step=3).run()
    train.record_spent(tmp_path / "run", 1.0)
    final = trainer(fail_at_step=-1).run()
    assert {step: logged[step]["train/minutes"] * 60 for step in (3, 4)} == {3: 4.0, 4: 5.0}
    assert torch.load(final, weights_only=True)["train_seconds"] == 6.0


def loader_that_jumps_the_clock(jump_s: float) -> dict:
    """`train`'s attributes to set: a training stream of 4 batches made in advance, which moves the run's clock
    `jump_s` on before handing over each (a loader that slow, without the wait), and that clock."""
    stream, real_clock, jumped = train.training_stream, time.perf_counter, [0.0]
    clock = lambda: real_clock() + jumped[0]  # noqa: E731

    def handed_over(batches):
        for batch in batches:
            jumped[0] += jump_s
            yield batch

    def loader(*args, **kwargs):  # the batches are made when the trainer opens the stream, before its loop times it
        return handed_over([batch for batch, _ in zip(stream(*args, **kwargs), range(4))])

    return {"time": SimpleNamespace(perf_counter=clock), "wait_clock": clock, "training_stream": loader}


def test_the_share_of_time_spent_waiting_for_the_loader_is_logged(tmp_path, synthetic_root, monkeypatch):
    """A loader slower than the step is nearly all the run's time; batches made in advance are none of it.
    The slow loader's wait is a 30 s jump of the run's clock rather than a real sleep, while the steps keep
    their real time (about 0.2 s each here, logging included): a real 0.5 s sleep gave shares of 0.71 in CI,
    where a step would now have to take 10 s for the share to fall under 0.75."""
    shares = {}
    for name, jump_s in (("slow", 30.0), ("made in advance", 0.0)):
        for attribute, value in loader_that_jumps_the_clock(jump_s).items():
            monkeypatch.setattr(train, attribute, value)
        logged = {}
        train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                      DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                      TrainConfig(steps=4, batch_size=8, log_every=2, warmup_steps=1, device="cpu"),
                      tmp_path / name, log=lambda metrics, step: logged.update({step: metrics})).run()
        shares[name] = [logged[step]["train/data_wait_share"] for step in (2, 4)]
    assert all(0.75 < share <= 1.0 for share in shares["slow"]), shares
    assert all(share < 0.05 for share in shares["made in advance"]), shares



def train_as_one_of_two_ranks(rank: int, port: int, run_dir, synthetic_root, logged_path) -> None:
    """In a forked process: rank `rank` of a 2-process gloo group, whose loader, on rank 1 only, makes the clock jump
    30 s before each batch; each rank writes its logged metrics to `logged_path`."""
    import os

    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for attribute, value in loader_that_jumps_the_clock(30.0 if rank == 1 else 0.0).items():
            setattr(train, attribute, value)  # this process is the test's fork: nothing to undo
        logged = {}
        train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                      DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                      TrainConfig(steps=4, batch_size=8, log_every=2, warmup_steps=1, device="cpu", threads=1),
                      run_dir, log=lambda metrics, step: logged.update({step: metrics})).run()
        logged_path.write_text(json.dumps(logged))
    finally:
        os._exit(0 if logged_path.exists() else 1)


def test_the_wait_share_logged_is_the_slowest_ranks(tmp_path, synthetic_root):
    """Two ranks, rank 1's loader slower than the step: rank 0 waits for rank 1 in DDP's all-reduce, not for its
    own loader, but the run is bound by a loader all the same, and rank 0 (the one whose metrics reach MLflow)
    says so."""
    import multiprocessing

    port = free_port()
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=train_as_one_of_two_ranks,
                          args=(rank, port, tmp_path / "run", synthetic_root, tmp_path / f"rank{rank}.json"))
             for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=240)
    assert [process.exitcode for process in ranks] == [0, 0]
    for rank in (0, 1):
        logged = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(0.75 < logged[step]["train/data_wait_share"] <= 1.0 for step in ("2", "4")), (rank, logged)


def train_weights(run_dir, synthetic_root, seed: int) -> dict:
    trainer = train.Trainer(ModelConfig(), MaskingConfig(strategy="cluster", ratio=0.5),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=2),
                            TrainConfig(steps=3, batch_size=16, warmup_steps=1, device="cpu", seed=seed), run_dir)
    return torch.load(trainer.run(), weights_only=True)["state_dict"]


def test_the_same_seed_trains_the_same_weights_on_the_cpu(tmp_path, synthetic_root):
    """Data (shards drawn, shuffle, crops, across loader workers), masks and initialisation all follow
    train.seed: a rerun reproduces a point exactly."""
    weights, again, other = (train_weights(tmp_path / name, synthetic_root, seed)
                             for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    assert not all(torch.equal(weights[key], other[key]) for key in weights)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_at_a_checkpoint_ends_as_one_that_went_on(tmp_path, synthetic_root, workers, device):
    """A preempted run (here: failed before step 5, resumed from its checkpoint at step 3) draws the batches and
    masks that the run would have drawn had it gone on, so it ends with the same weights and losses, bit for bit
    on the CPU, and on a GPU (with its fused AdamW and pinned batches). With two loader workers, step 3 is the
    second worker's in one run and the first's in the other. Calibration and the mask picture run in the first
    attempt only."""
    def trainer(run_dir, fail_at_step, logged, exact_resume=True):
        return train.Trainer(ModelConfig(),
                             MaskingConfig(strategy="cluster", ratio=0.5, target_coverage=0.3, calibration_batches=1),
                             DataConfig(train_shards=str(synthetic_root / "train"), workers=workers),
                             TrainConfig(steps=7, batch_size=8, log_every=1, checkpoint_every=3, warmup_steps=1,
                                         device=device, fail_at_step=fail_at_step, exact_resume=exact_resume),
                             run_dir, log=lambda metrics, step: logged.update({step: metrics}))

    went_on, resumed = {}, {}
    weights = torch.load(trainer(tmp_path / "a", -1, went_on).run(), weights_only=True)["state_dict"]
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer(tmp_path / "b", 5, resumed).run()
    assert torch.load(train.checkpoint_paths(tmp_path / "b")[0], weights_only=True)["step"] == 3
    resumed.update({step: None for step in (4, 5)})  # logged before the failure; the resumed run logs them again
    again = torch.load(trainer(tmp_path / "b", -1, resumed).run(), weights_only=True)["state_dict"]
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    losses = [{step: m["train/loss"] for step, m in logged.items() if step > 0} for logged in (went_on, resumed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5, 6, 7]
    # train.exact_resume=false: one stream from each (re)start, so the resumed run ends elsewhere
    afresh = {}
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer(tmp_path / "c", 5, afresh, exact_resume=False).run()
    elsewhere = torch.load(trainer(tmp_path / "c", -1, afresh, exact_resume=False).run(), weights_only=True)
    assert not all(torch.equal(weights[key], elsewhere["state_dict"][key]) for key in weights)


def test_checkpoint_intervals_start_at_the_resumed_step_then_at_each_multiple():
    assert train.interval_bounds(0, 6, 2) == [(0, 2), (2, 4), (4, 6)]
    assert train.interval_bounds(4, 6, 2) == [(4, 6)]
    assert train.interval_bounds(3, 10, 4) == [(3, 4), (4, 8), (8, 10)]  # checkpoint_every changed by a fix
    assert train.interval_bounds(0, 5, 10) == [(0, 5)]


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


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_trains_in_each_bf16_precision(tmp_path, synthetic_root, precision):
    """Pure bf16 casts the images to the model's dtype (else conv1 refuses fp32 input), in the steps, the
    threshold calibration and the mask picture alike; amp_bf16 keeps fp32 weights under autocast."""
    losses = {}
    trainer = train.Trainer(ModelConfig(precision=precision),
                            MaskingConfig(strategy="cluster", ratio=0.5, target_coverage=0.3, calibration_batches=1),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                            TrainConfig(steps=2, batch_size=8, log_every=1, warmup_steps=1, device="cpu"),
                            tmp_path / "run", log=lambda metrics, step: losses.update({step: metrics}))
    final = trainer.run()
    weights = torch.load(final, weights_only=True)["state_dict"]["visual.conv1.weight"]
    assert weights.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert 0 < losses[0]["mask/calibrated_threshold"] < 1
    assert all(torch.isfinite(torch.tensor(losses[step]["train/loss"])) for step in (1, 2))
    assert (tmp_path / "run" / "masks.png").stat().st_size > 1000


def test_trains_with_the_masking_op_compiled_alone(tmp_path, synthetic_root, monkeypatch):
    """What `model.compile: false` runs on a GPU (forced here on the CPU): the op compiled on its own under bf16
    autocast, through the threshold's calibration (the tower in evaluation mode, a hook on the masker), the
    mask picture (8 images, no gradient) and the steps."""
    maskers, logged = [], {}
    original_create = train.create
    monkeypatch.setattr(train, "create", lambda *a, **kw: maskers.append(original_create(*a, **kw)) or maskers[-1])
    trainer = train.Trainer(ModelConfig(precision="amp_bf16", compile_masking=True),
                            MaskingConfig(strategy="cluster", ratio=0.5, target_coverage=0.3, calibration_batches=1,
                                          attention=True),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                            TrainConfig(steps=2, batch_size=8, log_every=1, warmup_steps=1, device="cpu"),
                            tmp_path / "run", log=lambda metrics, step: logged.update({step: metrics}))
    trainer.run()
    masker = maskers[0][-1]
    assert masker.op_compiled and masker.last.keep.shape == (8, 32)
    assert 0 < logged[0]["mask/calibrated_threshold"] < 1
    assert logged[2]["mask/threshold"] == pytest.approx(logged[0]["mask/calibrated_threshold"])
    assert logged[2]["mask/drop_ratio"] >= 0.5 and torch.isfinite(torch.tensor(logged[2]["train/loss"]))
    assert (tmp_path / "run" / "masks.png").stat().st_size > 1000


def test_a_registered_strategy_that_declares_a_target_coverage_is_calibrated(tmp_path, synthetic_root,
                                                                             registered_strategy):
    """Training calibrates the threshold of any strategy declaring target_coverage, not only `cluster`'s; a
    strategy that does not declare it is not calibrated, whatever its config holds."""
    from clustermask import masking

    @registered_strategy("cluster_rest_first", settings=masking.CLUSTER_SETTINGS)
    def drop_unclustered_first(inputs, cfg):
        clustered, cluster_id = masking.cluster_membership(inputs, cfg)
        noise = torch.rand(clustered.shape, device=clustered.device)
        return masking.MaskScores((~clustered).float() + noise, clustered, cluster_id)

    registered_strategy("random_declared", settings=("ratio",))(masking.STRATEGIES["random"])

    def logged_by(strategy, features="rgb", steps=1):
        logged = {}
        train.Trainer(ModelConfig(), MaskingConfig(strategy=strategy, features=features, ratio=0.5,
                                                   target_coverage=0.3, calibration_batches=1),
                      DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                      TrainConfig(steps=steps, batch_size=8, log_every=1, warmup_steps=1, device="cpu"),
                      tmp_path / f"{strategy}-{features}",
                      log=lambda metrics, step: logged.setdefault(step, {}).update(metrics)).run()
        return logged

    logged = logged_by("cluster_rest_first")
    assert 0 < logged[0]["mask/calibrated_threshold"] < 1
    assert logged[1]["mask/threshold"] == pytest.approx(logged[0]["mask/calibrated_threshold"])
    # mixed features: a threshold schedule, as for `cluster`
    mixed = logged_by("cluster_rest_first", features="mixed", steps=4)
    assert sorted(step for step, m in mixed.items() if "mask/calibrated_threshold" in m) == [0, 1, 2, 3, 4]
    assert 0 not in logged_by("random_declared")


def test_a_mixed_threshold_schedule_is_calibrated_logged_and_resumed(tmp_path, synthetic_root):
    """`mixed` calibrates a threshold at 0, 1/4, ... 1 of training, logged at those steps; each step uses the
    schedule at its own progress, also after a resume from a checkpoint (which holds the schedule, not the
    threshold of the step it was written at)."""
    logged = []

    def trainer(fail_at_step):
        return train.Trainer(ModelConfig(),
                             MaskingConfig(strategy="cluster", features="mixed", ratio=0.5, target_coverage=0.3,
                                           calibration_batches=1),
                             DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                             TrainConfig(steps=4, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                                         device="cpu", fail_at_step=fail_at_step),
                             tmp_path / "run", log=lambda metrics, step: logged.append((step, metrics)))

    with pytest.raises(RuntimeError, match="injected failure"):
        trainer(fail_at_step=3).run()
    calibrated = {step: m["mask/calibrated_threshold"] for step, m in logged if "mask/calibrated_threshold" in m}
    assert sorted(calibrated) == [0, 1, 2, 3, 4]
    assert len(set(calibrated.values())) > 1
    saved = torch.load(train.checkpoint_paths(tmp_path / "run")[0], weights_only=True)["masking_thresholds"]
    assert saved == pytest.approx([calibrated[step] for step in range(5)])
    trainer(fail_at_step=-1).run()
    assert sum("mask/calibrated_threshold" in m for _, m in logged) == 5  # a resumed run does not recalibrate
    used = {step: m["mask/threshold"] for step, m in logged if "mask/threshold" in m}
    # the metrics logged at step s are those of the step that started at s - 1
    assert used == pytest.approx({step: calibrated[step - 1] for step in (1, 2, 3, 4)})


def first_step_mask(tmp_path, synthetic_root, monkeypatch, rank: int) -> torch.Tensor:
    """The kept-token indices of a 1-step random-masking run as process `rank` (the process group itself is
    not started: the seeding under test does not need it)."""
    maskers = []

    def create(*args, **kwargs):
        made = original_create(*args, **kwargs)
        maskers.append(made[-1])
        return made

    original_create = train.create
    monkeypatch.setattr(train, "create", create)
    monkeypatch.setattr(train, "init_distributed", lambda device: (rank, 1, device))
    # the picture is rank 0's only; it must not be what sets the ranks' masks apart
    monkeypatch.setattr(train.Trainer, "_save_mask_picture", lambda *args: None)
    run_dir = tmp_path / f"rank{rank}-{len(list(tmp_path.iterdir()))}"
    train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                  DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                  TrainConfig(steps=1, batch_size=8, warmup_steps=1, device="cpu"), run_dir).run()
    return maskers[0].last.keep


def test_each_rank_draws_its_own_masks(tmp_path, synthetic_root, monkeypatch):
    """Random masks are pure noise: with the same seed on every rank, image j of every rank's batch would be
    masked alike, and a multi-GPU run would see a fraction of the masks it should."""
    rank0, rank1, rank0_again = (first_step_mask(tmp_path, synthetic_root, monkeypatch, rank) for rank in (0, 1, 0))
    assert torch.equal(rank0, rank0_again)
    assert not torch.equal(rank0, rank1)


@pytest.mark.parametrize("log_every, checkpoint_every, seen", [(1, 100, "train/loss=nan"),
                                                               (100, 1, "non-finite weights")])
def test_a_diverged_run_stops_and_keeps_only_finite_checkpoints(tmp_path, synthetic_root, log_every,
                                                                 checkpoint_every, seen):
    """train.lr=1e3 makes the weights NaN in step 2. The job used to train on to the end, save NaN weights and
    have them evaluated; now it fails at the first log step (the loss) or checkpoint (the weights) after, and
    latest.pt, from before, is what a resubmission with a sane lr resumes from."""
    trainer = train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                            TrainConfig(steps=8, batch_size=8, lr=1e3, warmup_steps=0, log_every=log_every,
                                        checkpoint_every=checkpoint_every, device="cpu"),
                            tmp_path / "run", log=lambda metrics, step: None)
    with pytest.raises(FloatingPointError, match=rf"{seen} at step [2-7] with train.lr=1000: training diverged"):
        trainer.run()
    latest, final = train.checkpoint_paths(tmp_path / "run")
    assert not final.exists()
    if checkpoint_every == 1:
        state = torch.load(latest, weights_only=True)
        assert state["step"] >= 1 and all(torch.isfinite(w).all() for w in state["state_dict"].values())


@pytest.mark.gpu
@NEEDS_CUDA
def test_on_a_gpu_the_training_batches_come_pinned(tmp_path, synthetic_root, monkeypatch):
    """Each step's batch is in page-locked memory, from a loader worker too, so its copy to the GPU is queued
    behind the previous step's kernels rather than waiting for them on the host; the run trains."""
    pinned, logged = [], {}
    stream = train.training_stream

    def recording_stream(*args, **kwargs):
        for images, texts in stream(*args, **kwargs):
            pinned.append((images.is_pinned(), texts.is_pinned()))
            yield images, texts

    monkeypatch.setattr(train, "training_stream", recording_stream)
    trainer = train.Trainer(ModelConfig(precision="amp_bf16"), MaskingConfig(strategy="cluster", ratio=0.5),
                            DataConfig(train_shards=str(synthetic_root / "train"), workers=1),
                            TrainConfig(steps=3, batch_size=8, log_every=1, warmup_steps=1, device="cuda"),
                            tmp_path / "run", log=lambda metrics, step: logged.update({step: metrics}))
    trainer.run()
    assert pinned == [(True, True)] * 3
    assert all(torch.isfinite(torch.tensor(logged[step]["train/loss"])) for step in (1, 2, 3))
