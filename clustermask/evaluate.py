"""Evaluation stage: a registry of evaluators over clip_benchmark's datasets and metrics.

An evaluator is a function ``(model, transform, tokenizer, task, ctx) -> iterable of (metric, value)``,
registered by name. Results are written one JSON per (checkpoint, task) in clip_benchmark's output
format, so ``clip_benchmark build`` reads them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .config import EvalConfig, EvalTask, metric_key, validate_eval
from .files import write_atomic
from .plugins import check_name_free

# clip_benchmark is imported where it is used: composing and checking a 64-point sweep should not pay for it.

Metric = Tuple[str, float]


@dataclass
class EvalContext:
    device: str
    batch_size: int
    workers: int
    amp: bool
    feature_dir: Path


Evaluator = Callable[..., Iterable[Metric]]
EVALUATORS: Dict[str, Evaluator] = {}
# the `task.options` each evaluator reads (None: it does not say, and any are passed): a sweep with another is
# refused before submission
EVALUATOR_OPTIONS: Dict[str, Optional[Tuple[str, ...]]] = {}


def register_evaluator(name: str, options: Optional[Tuple[str, ...]] = None):
    """Register `fn` under `name`; `options`: the names of the `task.options` it reads."""
    check_name_free(EVALUATORS, name, "evaluator")

    def wrap(fn: Evaluator) -> Evaluator:
        EVALUATORS[name] = fn
        EVALUATOR_OPTIONS[name] = None if options is None else tuple(options)
        return fn

    return wrap


def validate(cfg: EvalConfig, check_paths: bool = True) -> None:
    validate_eval(cfg, EVALUATOR_OPTIONS, check_paths)


def _loader(dataset, ctx: EvalContext, collate_fn, task: EvalTask, split: str = "test") -> DataLoader:
    # pinned on a GPU: clip_benchmark's copies then go straight from the batch, not through a staging buffer
    return DataLoader(dataset, batch_size=ctx.batch_size, num_workers=_workers(task, split, ctx.workers),
                      collate_fn=collate_fn, pin_memory=ctx.device.startswith("cuda"))


def _workers(task: EvalTask, split: str, workers: int) -> int:
    """webdataset 1.x fails when a loader has more workers than the split has shards; clip_benchmark's wds
    layout gives their number in <root>/<split>/nshards.txt."""
    nshards = Path(task.root) / split / "nshards.txt"
    if task.dataset.startswith("wds/") and nshards.is_file():
        return min(workers, int(nshards.read_text()))
    return workers


def _dataset(task: EvalTask, transform, split: str = "test"):
    from clip_benchmark.datasets.builder import build_dataset

    with downloads_refused(task):
        return build_dataset(task.dataset, root=task.root, transform=transform, split=split, download=False,
                             task=task.name)


class DownloadRefused(RuntimeError):
    pass


@contextlib.contextmanager
def downloads_refused(task: EvalTask):
    """clip_benchmark's builder fetches what it does not find under a dataset's root whatever `download=False` says
    (wget, kaggle, gdown through `subprocess.call`; `requests.get` for the multilingual annotations): from an
    evaluation job, after the training, into the dataset's folder. A failed `wget --output-document` leaves an
    empty annotation file there, which the next evaluation reads as a dataset of no images. Here, any such fetch
    raises instead, naming what it would have run, before any file is written. The preflight names what the layouts
    it knows lack (`config.layout_problem`); this catches the rest."""
    import requests

    def refuse(what):
        raise DownloadRefused(f"{task.name} on {task.dataset}: clip_benchmark would fetch what it did not find under "
                              f"root={task.root!r} ({what}); the jobs download nothing: put the dataset there first, "
                              "in clip_benchmark's layout for it or its wds layout (configs/eval/benchmarks.yaml)")

    def refused_call(command, *args, **kwargs):
        refuse(f"`{command}`" if isinstance(command, str) else f"`{' '.join(map(str, command))}`")

    def refused_get(url, *args, **kwargs):
        refuse(f"GET {url}")

    # its modules bind `call` when imported (`from subprocess import call`): those loaded, and any loaded meanwhile
    bound = [module for name, module in list(sys.modules.items())
             if name.startswith("clip_benchmark.") and getattr(module, "call", None) is subprocess.call]
    swaps = [(module, "call", refused_call) for module in bound]
    swaps += [(subprocess, "call", refused_call), (requests, "get", refused_get)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


@register_evaluator("zeroshot_classification", options=())
def zeroshot_classification_eval(model, transform, tokenizer, task: EvalTask, ctx: EvalContext):
    from clip_benchmark.datasets.builder import get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_classification

    dataset = _dataset(task, transform)
    metrics = zeroshot_classification.evaluate(
        model, _loader(dataset, ctx, get_dataset_collate_fn(task.dataset), task), tokenizer, dataset.classes,
        dataset.templates, ctx.device, amp=ctx.amp)
    yield from metrics.items()
    yield "chance", 1.0 / len(dataset.classes)


@register_evaluator("zeroshot_retrieval", options=("recall_k",))
def zeroshot_retrieval_eval(model, transform, tokenizer, task: EvalTask, ctx: EvalContext):
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    dataset = _dataset(task, transform)
    recall_k = [int(k) for k in task.options.get("recall_k", [1, 5])]
    yield from zeroshot_retrieval.evaluate(model, _loader(dataset, ctx, image_captions_collate_fn, task), tokenizer,
                                           ctx.device, amp=ctx.amp, recall_k_list=recall_k).items()


@register_evaluator("image_caption_selection", options=())
def image_caption_selection_eval(model, transform, tokenizer, task: EvalTask, ctx: EvalContext):
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import image_caption_selection

    dataset = _dataset(task, transform)
    loader = _loader(dataset, ctx, image_captions_collate_fn, task)
    yield from image_caption_selection.evaluate(model, loader, tokenizer, ctx.device, amp=ctx.amp).items()


# the scores of clip_benchmark's linear probe, which the CPU path computes as well
LINEAR_PROBE_METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")


@register_evaluator("linear_probe", options=("lr", "epochs"))
def linear_probe_eval(model, transform, tokenizer, task: EvalTask, ctx: EvalContext):
    """clip_benchmark's linear probe; its `evaluate` asserts CUDA, so on CPU we drive its own parts."""
    from clip_benchmark.datasets.builder import get_dataset_collate_fn
    from clip_benchmark.metrics import linear_probe

    train, test = (_loader(_dataset(task, transform, split), ctx, get_dataset_collate_fn(task.dataset), task, split)
                   for split in ("train", "test"))
    lr, epochs = float(task.options.get("lr", 0.1)), int(task.options.get("epochs", 10))
    if ctx.device.startswith("cuda"):
        features = fresh_feature_dir(ctx, task)
        try:
            metrics = linear_probe.evaluate(model, train, test, fewshot_k=-1, batch_size=ctx.batch_size,
                                            num_workers=ctx.workers, lr=lr, epochs=epochs, model_id=features.name,
                                            seed=0, feature_root=str(features.parent), device="cuda", amp=ctx.amp)
        finally:
            shutil.rmtree(features, ignore_errors=True)
        # it returns its settings beside the scores (weight_decay, epochs, seed, fewshot_k, normalized)
        yield from ((name, metrics[name]) for name in LINEAR_PROBE_METRICS)
        return
    yield from _linear_probe_cpu(model, train, test, lr, epochs, ctx).items()


def fresh_feature_dir(ctx: EvalContext, task: EvalTask) -> Path:
    """An empty directory for this task's linear-probe features. clip_benchmark caches them in
    feature_root/model_id and reuses any it finds there: a second dataset under the same id would be probed
    on the first one's features, and a re-evaluated checkpoint on the old model's. Removed after the probe
    (an ImageNet train split's features are gigabytes)."""
    path = Path(ctx.feature_dir) / task.dataset.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _features(model, loader, device):
    from clip_benchmark.metrics import linear_probe

    featurizer = linear_probe.Featurizer(model).to(device)
    features, targets = [], []
    with torch.no_grad():
        for images, target in loader:
            features.append(featurizer(images.to(device)).cpu())
            targets.append(target)
    return torch.cat(features), torch.cat(targets)


def _linear_probe_cpu(model, train_loader, test_loader, lr: float, epochs: int, ctx: EvalContext) -> dict:
    from clip_benchmark.metrics import linear_probe
    from sklearn.metrics import balanced_accuracy_score

    train_x, train_y = _features(model, train_loader, ctx.device)
    test_x, test_y = _features(model, test_loader, ctx.device)
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    batches = DataLoader(linear_probe.FeatureDataset(train_x, train_y), batch_size=ctx.batch_size, shuffle=True)
    scheduler = linear_probe.cosine_lr(optimizer, lr, 0.0, epochs * len(batches))
    for epoch in range(epochs):
        for i, (x, y) in enumerate(batches):
            scheduler(i + epoch * len(batches))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        logits = probe(test_x)
    acc1, acc5 = probe_accuracies(logits, test_y)
    return {"lp_acc1": acc1, "lp_acc5": acc5,
            "lp_mean_per_class_recall": balanced_accuracy_score(test_y, logits.argmax(1))}


def probe_accuracies(logits: torch.Tensor, targets: torch.Tensor):
    """(top-1, top-5) as clip_benchmark's CUDA linear probe reports them: top-5 NaN where the test labels stay
    under 5 (a top-5 of 5 classes or fewer is 1 whatever the probe), so a CPU evaluation reports what a GPU one
    does."""
    from clip_benchmark.metrics import linear_probe

    if targets.max() >= 5:
        return tuple(linear_probe.accuracy(logits, targets, topk=(1, 5)))
    return linear_probe.accuracy(logits, targets, topk=(1,))[0], float("nan")


# ---------------------------------------------------------------- running and writing


def result_path(out_dir: Path, task: EvalTask, model_name: str, checkpoint: str) -> Path:
    """clip_benchmark's default output name: {dataset}_{pretrained}_{model}_{language}_{task}.json"""
    dataset = task.dataset.replace("wds/", "", 1).replace("/", "_")
    return Path(out_dir) / f"{dataset}_{os.path.basename(checkpoint)}_{model_name}_en_{task.name}.json"


def run_task(model, transform, tokenizer, task: EvalTask, ctx: EvalContext) -> Dict[str, float]:
    return {name: float(value) for name, value in EVALUATORS[task.name](model, transform, tokenizer, task, ctx)}


# in a folder of its own: `clip_benchmark build results/*.json` reads every JSON beside the results
EVALUATED_FILE = Path(".resume") / "evaluated.json"


def checkpoint_identity(checkpoint: str) -> dict:
    stat = os.stat(checkpoint)
    return {"path": os.path.abspath(checkpoint), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def evaluated_before(out_dir: Path, checkpoint: str) -> Dict[str, dict]:
    """Result file name -> task, for the tasks already evaluated on this very checkpoint (the same file, not
    written again since) and recorded in `out_dir`, until `forget_evaluated`."""
    path = Path(out_dir) / EVALUATED_FILE
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return record["tasks"] if record.get("checkpoint") == checkpoint_identity(checkpoint) else {}


def forget_evaluated(out_dir: Path) -> None:
    """The next `evaluate_checkpoint(resume=True)` in `out_dir` evaluates every task again."""
    (Path(out_dir) / EVALUATED_FILE).unlink(missing_ok=True)


def evaluate_checkpoint(model_name: str, checkpoint: str, cfg: EvalConfig, out_dir: Path,
                        log: Optional[Callable[[Dict[str, float]], None]] = None,
                        resume: bool = False) -> Dict[str, float]:
    """Evaluate one checkpoint on every task; write one JSON per task; return the flat metric dict.

    Each task evaluated is recorded in `out_dir` with the checkpoint's identity. With `resume`, a task recorded
    for the same checkpoint with the same settings is read back from its JSON instead of being run again (an
    evaluation that stopped half-way, requeued at a time limit or resubmitted after a failure, goes on from its
    first unfinished task; `forget_evaluated` starts afresh)."""
    from .model import load_for_eval
    from .train import resolve_device

    if cfg.fail:
        raise RuntimeError("eval.fail=true: injected failure")
    validate(cfg)
    device = resolve_device(cfg.device)
    model, transform, tokenizer = load_for_eval(model_name, checkpoint, device)
    out_dir = Path(out_dir)
    (out_dir / EVALUATED_FILE).parent.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext(device, cfg.batch_size, cfg.workers, cfg.amp, out_dir / "features")
    already = evaluated_before(out_dir, checkpoint) if resume else {}
    # what was recorded stays until its task is run again: a stop while reading back loses nothing
    record = {"checkpoint": checkpoint_identity(checkpoint), "tasks": dict(already)}
    write_atomic(out_dir / EVALUATED_FILE, json.dumps(record, indent=1))
    flat = {}
    for task in cfg.tasks:
        path = result_path(out_dir, task, model_name, checkpoint)
        if already.get(path.name) == asdict(task) and path.is_file():
            print(f"eval: {task.name} on {task.dataset} was evaluated before on this checkpoint with the same "
                  f"settings: read back from {path}", flush=True)
            metrics = json.loads(path.read_text())["metrics"]
        else:
            metrics = run_task(model, transform, tokenizer, task, ctx)
            write_atomic(path, json.dumps({"dataset": task.dataset, "model": model_name, "pretrained": checkpoint,
                                           "task": task.name, "metrics": metrics, "language": "en"}, indent=1))
            record["tasks"][path.name] = asdict(task)
            write_atomic(out_dir / EVALUATED_FILE, json.dumps(record, indent=1))
        task_metrics = {metric_key(task, k): v for k, v in metrics.items()}
        if log is not None:
            log(task_metrics)
        flat.update(task_metrics)
    set_aside_other_results(out_dir, [result_path(out_dir, task, model_name, checkpoint) for task in cfg.tasks])
    return flat


SUPERSEDED = "superseded"


def set_aside_other_results(out_dir: Path, current: List[Path]) -> List[Path]:
    """Move the result JSONs in `out_dir` of tasks this evaluation did not run (an earlier evaluation's, evaluated
    again with other tasks) into `out_dir/superseded/`, out of `clip_benchmark build results/*.json`; returns
    where they went."""
    moved = []
    for path in sorted(set(Path(out_dir).glob("*.json")) - set(current)):
        (Path(out_dir) / SUPERSEDED).mkdir(exist_ok=True)
        moved.append(path.replace(Path(out_dir) / SUPERSEDED / path.name))
    return moved
