"""Training stage: masked CLIP training that checkpoints in open_clip's format and resumes from its run dir."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import open_clip
import torch
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from . import masking as masking_lib
from .config import (DataConfig, MaskingConfig, ModelConfig, TrainConfig, validate_contrastive_batch, validate_data,
                     validate_train as validate)
from .data import derive_seed, sample_batches, split_transform, training_stream
from .files import checkpoint_paths, write_atomic
from .model import create

LogFn = Callable[[Dict[str, float], int], None]
# the clock of the loader wait, apart from `time.perf_counter` (tests fake that one and count its readings)
wait_clock = time.perf_counter


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return name


def spent_path(run_dir: Path) -> Path:
    """The training loop's seconds up to the last log of an attempt, or up to the moment it failed or was
    preempted (JSON): the steps after its last checkpoint are redone, and cost twice."""
    return Path(run_dir) / "checkpoints" / "train_seconds_spent.json"


def record_spent(run_dir: Path, seconds: float) -> None:
    path = spent_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"train_seconds": seconds}))


def read_spent(run_dir: Path) -> float:
    try:
        return float(json.loads(spent_path(run_dir).read_text())["train_seconds"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or cut short by a kill: the checkpoint's
        return 0.0


def save_checkpoint(path: Path, model, optimizer, step: int, name: str, thresholds: List[float],
                    train_seconds: float = 0.0) -> None:
    """open_clip's checkpoint layout; only plain containers and tensors so weights_only loading works.
    `thresholds`: the masker's threshold schedule; `train_seconds`: the training loop's wall-clock time up to
    `step`, summed over resumptions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 1, "step": step, "name": name, "state_dict": model.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "masking_thresholds": [float(t) for t in thresholds], "train_seconds": float(train_seconds)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def interval_bounds(start: int, steps: int, every: int) -> List[Tuple[int, int]]:
    """(first, end) of each checkpoint interval from `start` (a checkpoint's step, or 0) to `steps`."""
    firsts = [start] + list(range((start // every + 1) * every, steps, every))
    return list(zip(firsts, firsts[1:] + [steps]))


def finite_loss(loss: torch.Tensor, step: int, lr: float) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"train/loss={value} at step {step} with train.lr={lr:g}: training diverged")
    return value


def check_finite_weights(model: torch.nn.Module, step: int, lr: float) -> None:
    """Before a checkpoint (one host sync each): a diverged run stops instead of saving NaN weights that a
    resume would continue from and the evaluation would score as if trained."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise FloatingPointError(f"non-finite weights at step {step} with train.lr={lr:g}: training diverged, "
                                 "any checkpoint saved is from before")


def load_checkpoint(path: Path, device: str) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def param_groups(model: torch.nn.Module, weight_decay: float):
    """As open_clip_train: no weight decay on gains, biases and the logit scale."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def calibrate(model, masker, masking: MaskingConfig, data: DataConfig, transform, tokenizer, batch_size,
              to_inputs: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> List[float]:
    """The masker's threshold schedule calibrated to masking.target_coverage on the first batches of a training
    stream, their crops and the anchors drawn from `seed`; `to_inputs` makes a batch the model's input."""
    batches = sample_batches(data, transform, tokenizer, batch_size, masking.calibration_batches, seed=seed)
    inputs = [masking_lib.collect_features(model, to_inputs(images)) for images, _ in batches]
    thresholds = masking_lib.calibrate_threshold_schedule(inputs, masking, masking.target_coverage, seed=seed)
    masker.set_threshold(thresholds)
    return thresholds


def init_distributed(device: str):
    """(rank, world size, this process's device); joins the process group when WORLD_SIZE > 1 (set from SLURM
    by submitit). On CUDA each process takes the GPU of its LOCAL_RANK before NCCL starts: every task sees all
    of the node's GPUs, and NCCL's device-less collectives (the final barrier) would otherwise all use GPU 0."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return rank, world, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def cpu_model() -> str:
    """The CPU's model name as Linux gives it (`/proc/cpuinfo`), else what Python finds, else ''."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def hardware_description(device: str, world: int, threads: int) -> str:
    """What a training runs on, as its minutes depend on it: `8x NVIDIA H100 80GB HBM3`, `1x cpu (2 threads,
    Intel(R) Xeon(R) ...)`; `world` processes, each on `device` (a rank's) with `threads` torch threads."""
    if device.startswith("cuda"):
        return f"{world}x {torch.cuda.get_device_name(torch.device(device))}"
    model = cpu_model()
    return f"{world}x cpu ({threads} thread{'s' * (threads != 1)}{', ' + model if model else ''})"


HARDWARE_JOIN = " + "


def hardware_so_far(earlier: Optional[str], now: str) -> str:
    """The hardware of a run's attempts: `earlier` (theirs, joined by ` + `, or None before the first), with `now`
    added unless an attempt already ran on it. A run requeued onto other nodes names both: its minutes add them."""
    attempts = earlier.split(HARDWARE_JOIN) if earlier else []
    return HARDWARE_JOIN.join(attempts if now in attempts else attempts + [now])


def largest_over_ranks(value: float, device: str, world: int) -> float:
    """The largest of the ranks' `value`s, on every rank (a collective: all ranks call it at the same step)."""
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


class Trainer:
    """One training run in one run directory. `run()` resumes from the latest checkpoint there."""

    def __init__(self, model_cfg: ModelConfig, masking: MaskingConfig, data: DataConfig, train: TrainConfig,
                 run_dir: Path, log: Optional[LogFn] = None):
        for check, cfg in ((masking_lib.validate, masking), (validate_data, data), (validate, train)):
            check(cfg)
        self.model_cfg, self.masking, self.data, self.cfg = model_cfg, masking, data, train
        self.run_dir = Path(run_dir)
        self.log = log or (lambda metrics, step: None)
        self.device = resolve_device(train.device)
        # a model in pure bf16 takes bf16 images (open_clip_train casts them the same way); None keeps fp32
        self.input_dtype = open_clip.get_input_dtype(model_cfg.precision)
        self.finish_images: Callable[[torch.Tensor], torch.Tensor] = lambda images: images  # set by run()
        self.rank, self.world = 0, 1
        self.seconds_before = 0.0  # the training loop's time in the runs before a resumption
        self.loop_started: Optional[float] = None  # time.perf_counter() when this process's loop started
        self.waited_for_data = 0.0  # seconds the loop waited for the loader since the last log

    def hardware(self) -> str:
        """What this training runs on (`hardware_description`), before `run()`: its ranks, the device each takes
        and the torch threads it will use."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        threads = self.cfg.threads if self.cfg.threads > 0 else torch.get_num_threads()
        return hardware_description(self.device, world, threads)

    def train_seconds(self, now: float) -> float:
        """The training loop's wall-clock time so far, summed over resumptions: what a point cost to train
        (an attempt that failed or was preempted counts up to that moment, so the steps after its last checkpoint,
        redone by the next, count twice; writing checkpoints counts, the threshold's calibration before the first
        step does not)."""
        return self.seconds_before + now - self.loop_started

    def run(self) -> Path:
        latest, final = checkpoint_paths(self.run_dir)
        if final.exists():
            return final
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        self.rank, self.world, self.device = init_distributed(self.device)
        validate_contrastive_batch(self.cfg, self.world)
        if self.world > 1:
            print(f"distributed: rank {self.rank} of {self.world} on {self.device}", flush=True)
        torch.manual_seed(self.cfg.seed)
        model, train_tf, _, tokenizer, masker = create(self.model_cfg, self.masking, self.cfg.steps, self.device)
        # the loader hands over uint8 images, normalised once on the device (`_inputs`)
        train_tf, self.finish_images = split_transform(train_tf)
        # fused on a GPU: one kernel over all the parameters instead of foreach's passes (as bench/masking.py's step)
        optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr, betas=(0.9, 0.98),
                                      eps=1e-6, fused=self.device.startswith("cuda") or None)
        start = self._resume(latest, model, optimizer, masker)
        if start == 0 and masking_lib.calibrates_threshold(self.masking):
            thresholds = calibrate(model, masker, self.masking, self.data, train_tf, tokenizer, self.cfg.batch_size,
                                   self._inputs, seed=self.cfg.seed)
            # each at the step where the schedule holds it (one point unless features are mixed)
            for progress, threshold in zip(masking_lib.schedule_progress(len(thresholds)), thresholds):
                self.log({"mask/calibrated_threshold": threshold}, round(progress * self.cfg.steps))
        if start == 0 and self.rank == 0:
            self._save_mask_picture(model, masker, train_tf, tokenizer)
        try:
            self._loop(model, optimizer, masker, train_tf, tokenizer, start, latest)
            check_finite_weights(model, self.cfg.steps, self.cfg.lr)
        except BaseException:  # a failure, or submitit's exit on a preemption or time limit
            if self.rank == 0 and self.loop_started is not None:
                record_spent(self.run_dir, self.train_seconds(time.perf_counter()))
            raise
        if self.rank == 0:
            save_checkpoint(final, model, None, self.cfg.steps, self.model_cfg.name, masker.threshold_schedule.tolist(),
                            self.train_seconds(time.perf_counter()))
            # nothing resumes from it once final.pt is there, and with its optimizer state it is 3x the size
            # (1.8 GB for ViT-B-16): a 64-point sweep would keep 115 GB of them
            latest.unlink(missing_ok=True)
            spent_path(self.run_dir).unlink(missing_ok=True)
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return final

    def _resume(self, latest: Path, model, optimizer, masker) -> int:
        self.seconds_before = read_spent(self.run_dir)
        if not latest.exists():
            return 0
        state = load_checkpoint(latest, self.device)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        # checkpoints written before 2026-11-28 hold one threshold
        masker.set_threshold(state.get("masking_thresholds", state.get("masking_threshold")))
        # an attempt killed outright (SIGKILL, node failure) may have checkpointed after its last log
        self.seconds_before = max(self.seconds_before, float(state.get("train_seconds", 0.0)))
        print(f"resumed from {latest} at step {state['step']}", flush=True)
        return int(state["step"])

    def _save_mask_picture(self, model, masker, transform, tokenizer) -> None:
        if self.masking.strategy == "none":
            return
        from .visualize import save_mask_grid

        images, _ = sample_batches(self.data, transform, tokenizer, 8, 1, seed=self.cfg.seed)[0]
        save_mask_grid(model, self._inputs(images), self.run_dir / "masks.png")

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch from the loader (uint8, `data.split_transform`) as the model takes it: normalised on the device,
        in the model's input dtype. Copied as it is, then converted: a copy that converts does so on the host first,
        into memory that is not pinned."""
        return self.finish_images(images.to(self.device, non_blocking=True)).to(dtype=self.input_dtype)

    def _autocast(self):
        if self.model_cfg.precision == "amp_bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return nullcontext()

    def _batches(self, transform, tokenizer, start: int):
        """(step, images, texts) from `start` to the end. Each checkpoint interval's data and mask noise are seeded
        by train.seed, the rank and its first step: a run resumed at a checkpoint draws what it would have drawn
        had it gone on. Without train.exact_resume, the one interval is from `start` to the end."""
        cfg = self.cfg
        intervals = interval_bounds(start, cfg.steps, cfg.checkpoint_every if cfg.exact_resume else cfg.steps)
        # pinned on a GPU: each batch's copy is queued behind the previous step's kernels instead of stopping the
        # host until the GPU has finished them and copied it (38.5 MB of uint8 per step for ViT-B-16 at batch 256)
        stream = iter(training_stream(self.data, transform, tokenizer, cfg.batch_size,
                                      seed=derive_seed(cfg.seed, self.rank, "data"), intervals=intervals,
                                      pin_memory=self.device.startswith("cuda")))
        firsts = {first for first, _ in intervals}
        for step in range(start, cfg.steps):
            if step in firsts:  # before the batch: without loader workers the crops draw from this state too
                torch.manual_seed(derive_seed(cfg.seed, self.rank, "masks", step))
            asked = wait_clock()
            images, texts = next(stream)
            self.waited_for_data += wait_clock() - asked
            yield step, images, texts

    def _loop(self, model, optimizer, masker, transform, tokenizer, start: int, latest: Path) -> None:
        cfg = self.cfg
        loss_fn = open_clip.ClipLoss(gather_with_grad=True, rank=self.rank, world_size=self.world)
        scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
        forward = model
        if self.world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(model)
        if self.model_cfg.compile:
            forward = torch.compile(forward)
        model.train()
        timer, logged_step, self.waited_for_data = time.perf_counter(), start, 0.0
        self.loop_started = timer
        progress = tqdm(total=cfg.steps, initial=start, desc=f"train[{self.rank}]", mininterval=5, disable=None)
        for step, images, texts in self._batches(transform, tokenizer, start):
            if step == cfg.fail_at_step:
                raise RuntimeError(f"train.fail_at_step={cfg.fail_at_step}: injected failure")
            scheduler(step)
            masker.set_step(step)
            images, texts = self._inputs(images), texts.to(self.device, non_blocking=True)
            with self._autocast():
                image_features, text_features, logit_scale = forward(images, texts)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                # the interval since the last log: shorter than log_every at the end or after a resume
                now, samples = time.perf_counter(), (step - logged_step) * cfg.batch_size
                interval = max(now - timer, 1e-9)
                metrics = {"train/loss": finite_loss(loss, step, cfg.lr), "train/lr": optimizer.param_groups[0]["lr"],
                           "train/logit_scale": logit_scale.item(),
                           # all ranks', as open_clip logs it: they step together (DDP's all-reduce)
                           "train/samples_per_s": samples * self.world / interval,
                           "train/samples_per_s_per_rank": samples / interval,
                           # near 1: the loader bounds the run (more data.workers and cores); near 0: the step does.
                           # The slowest rank's: the others wait for it in DDP's all-reduce, which is step time to them
                           "train/data_wait_share": largest_over_ranks(
                               min(1.0, self.waited_for_data / interval), self.device, self.world),
                           "train/minutes": self.train_seconds(now) / 60}
                timer, logged_step, self.waited_for_data = now, step, 0.0
                if self.rank == 0:  # an attempt killed outright then loses only the time since this log
                    record_spent(self.run_dir, self.train_seconds(now))
                metrics.update({k: v.item() for k, v in masker.stats.items()})
                self.log(metrics, step)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                check_finite_weights(model, step, cfg.lr)  # on every rank, so that all stop together
                if self.rank == 0:
                    save_checkpoint(latest, model, optimizer, step, self.model_cfg.name,
                                    masker.threshold_schedule.tolist(),
                                    self.train_seconds(time.perf_counter()))
        progress.close()
