"""Every stage's typed config, and the checks that need no model code.

Plain dataclasses that import neither torch nor open_clip: the launcher composes and checks every point
of a sweep with them before submitting, and should not pay seconds of imports for it. The stage modules
re-export their own config (`clustermask.masking.MaskingConfig` is this `MaskingConfig`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
FEATURES = ("rgb", "embedding", "mixed")
PRECISIONS = ("fp32", "amp_bf16", "bf16")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# the share of its time a training may wait for its loader before `clustermask-status` and the report say so
LOADER_BOUND = 0.2
# the kind of dataset each built-in evaluator reads (a wds one's dataset_type.txt says which it is)
EVALUATOR_KIND = {"zeroshot_classification": "classification", "linear_probe": "classification",
            "zeroshot_retrieval": "retrieval"}


@dataclass
class ModelConfig:
    name: str = "ViT-Tiny-8-64"  # any open_clip model name, e.g. ViT-B-16
    precision: str = "fp32"  # fp32 | amp_bf16 (autocast) | bf16 (pure)
    compile: bool = False
    # with compile false, compile the masking op on its own (its passes over the pixels fuse); None: on CUDA
    compile_masking: Optional[bool] = None
    grad_checkpointing: bool = False


@dataclass
class MaskingConfig:
    strategy: str = "none"  # a name in clustermask.masking.STRATEGIES
    ratio: float = 0.5  # fraction of patch tokens dropped
    features: str = "rgb"  # cluster features: rgb | embedding | mixed (rgb -> embedding over training)
    anchor_fraction: float = 0.03  # anchors per image, as a fraction of the patches (at least one)
    threshold: float = 0.5  # cosine similarity above which a patch joins an anchor's cluster
    target_coverage: Optional[float] = None  # if set, calibrate the threshold to this mean cluster coverage
    calibration_batches: int = 8
    kmeans_k: int = 8
    kmeans_iters: int = 3
    attention: bool = False  # also hide the clustered tokens that were kept, with a key-padding mask
    # a plugin strategy's own settings (`+masking.options.width=4`), for one that declares "options"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train_shards: str = "${paths.data}/train/{00000..00007}.tar"  # brace pattern, directory or glob; a::b both
    eval_root: str = "${paths.data}/eval"
    workers: int = 2
    shuffle_buffer: int = 1000


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 64  # per process: the contrastive batch of a multi-GPU run is batch_size x ranks
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 100
    # each checkpoint interval's data and masks drawn from seeds of its own, so that a resumed run draws what it
    # would have drawn had it gone on; false: one stream from each (re)start, which saves re-filling each loader
    # worker's shuffle buffer per interval (up to data.shuffle_buffer samples read and dropped)
    exact_resume: bool = True
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    device: str = "auto"  # auto | cpu | cuda
    fail_at_step: int = -1  # fault injection for tests: raise at this step (-1: never)


@dataclass
class EvalTask:
    name: str  # evaluator name in clustermask.evaluate.EVALUATORS
    dataset: str  # clip_benchmark dataset name: wds/<name>, sugar_crepe/<task>, ...
    root: str  # local dataset root
    options: Dict[str, Any] = field(default_factory=dict)


def metric_key(task: EvalTask, metric: str) -> str:
    """MLflow key `<task>/<dataset>/<metric>`. MLflow takes letters, digits, `_ - . / :` and spaces only, and
    refuses the whole batch otherwise, after the evaluation: `@` becomes `_at_` (`recall@5`), any other character
    `_` (a plugin evaluator's `acc(top-1)`; `:` too, which MLflow refuses on Windows)."""
    return re.sub(r"[^\w./ -]", "_", f"{task.name}/{task.dataset}/{metric}".replace("@", "_at_"))


@dataclass
class EvalConfig:
    tasks: List[EvalTask] = field(default_factory=list)
    batch_size: int = 128
    workers: int = 0
    device: str = "auto"
    amp: bool = False
    fail: bool = False  # fault injection for tests


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: sqlite:///<sweep_dir>/mlflow.db ; or an `mlflow server` URI
    experiment: str = "clustermask"


@functools.lru_cache(maxsize=None)
def model_config_files() -> Dict[str, Path]:
    """open_clip's model configs (its bundled ones) and ours, name -> JSON file, found as open_clip's registry
    finds them, without importing open_clip (tests/test_launch.py checks both lists agree)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    return {path.stem: path for folder in folders + [MODEL_CONFIG_DIR] for path in sorted(folder.glob("*.json"))}


def model_names() -> List[str]:
    return sorted(model_config_files())


def validate_model(cfg: ModelConfig) -> None:
    names = model_names()
    if cfg.name not in names:
        close = [n for n in names if n.lower().startswith(cfg.name.lower()[:5])][:5] or names[:5]
        raise ValueError(f"model.name={cfg.name!r} is not an open_clip model; e.g. {close}")
    objective = other_objective(model_config(cfg.name))
    if objective:
        raise ValueError(f"model.name={cfg.name!r} is {objective}; clustermask trains CLIP's contrastive objective "
                         "(open_clip's ClipLoss on image and text features), e.g. ViT-B-16")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"model.precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")


def other_objective(config: Dict[str, Any]) -> Optional[str]:
    """What, in an open_clip model config, makes the model train with another loss than CLIP's, or None: the job
    would fail at its first step (a CoCa model returns a dict) or silently train it with the wrong loss."""
    if "multimodal_cfg" in config:
        return "a CoCa model (a captioning decoder besides the towers, trained with open_clip's CoCaLoss)"
    if config.get("init_logit_bias") is not None:
        return "a SigLIP-style model (a learnt logit bias, trained with open_clip's SigLipLoss)"
    return None


@functools.lru_cache(maxsize=None)
def model_config(name: str) -> Dict[str, Any]:
    """open_clip's config of model `name` (read once: every point of a sweep is checked against it); {} for a name
    it does not know, which `validate_model` names."""
    path = model_config_files().get(name)
    return json.loads(path.read_text()) if path is not None else {}


def hub_repositories(name: str) -> List[Tuple[str, str]]:
    """(what, repository) for each part of open_clip's model `name` that it builds from the Hugging Face Hub: a
    tokenizer (`hf_tokenizer_name`), a text tower and its weights (`hf_model_name`)."""
    text_cfg = model_config(name).get("text_cfg", {})
    parts = [("tokenizer", text_cfg.get("hf_tokenizer_name")), ("text tower", text_cfg.get("hf_model_name"))]
    return [(what, repo) for what, repo in parts if repo]


# per part, the files it needs (`a|b`: either), as transformers' Auto classes read them
HUB_FILES = {"tokenizer": ("config.json", "tokenizer.json|vocab.txt|sentencepiece.bpe.model|spiece.model"),
             "text tower": ("config.json", "model.safetensors|pytorch_model.bin")}


def validate_model_offline(cfg: ModelConfig) -> None:
    """What `model.name` needs from the Hugging Face Hub is in the local Hugging Face cache: the jobs download
    nothing (they run with HF_HUB_OFFLINE=1), and without it the job would fail (or, online, download).
    The cache read is this machine's: on a cluster, the one the jobs share (HF_HOME)."""
    repositories = hub_repositories(cfg.name)
    if not repositories:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    def cached(repo: str, names: str) -> bool:
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names.split("|"))

    missing = [(what, repo) for what, repo in repositories if not all(cached(repo, names) for names in HUB_FILES[what])]
    if missing:
        parts = ", ".join(f"its {what} {repo!r}" for what, repo in missing)
        raise ValueError(f"model.name={cfg.name!r} needs {parts} from the Hugging Face Hub, not found in the Hugging "
                         f"Face cache {constants.HF_HUB_CACHE}; the jobs download nothing: fetch it once, e.g. "
                         f"`huggingface-cli download {missing[0][1]}`, into the cache the jobs read (HF_HOME)")


def image_tower_kind(vision_cfg: Dict[str, Any]) -> Optional[str]:
    """What an open_clip model's image tower is when it is not open_clip's own VisionTransformer, else None."""
    if vision_cfg.get("timm_model_name"):
        return f"timm's {vision_cfg['timm_model_name']!r}"
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        return "a ModifiedResNet"
    return None


def pooling_beyond_cls(vision_cfg: Dict[str, Any]) -> Optional[str]:
    """How a VisionTransformer's output reads other tokens than CLS (None when it reads CLS alone): with
    `masking.attention` the hidden tokens would still reach the output through it."""
    if vision_cfg.get("attentional_pool"):
        return "an attentional pooler over every token"
    pool_type = vision_cfg.get("pool_type", "tok")
    return None if pool_type == "tok" else f"pool_type={pool_type!r} over the tokens"


def patch_count(vision_cfg: Dict[str, Any]) -> Optional[int]:
    """The patch tokens of a VisionTransformer's config (None where it does not say)."""
    image, patch = vision_cfg.get("image_size"), vision_cfg.get("patch_size")
    if image is None or patch is None:
        return None
    (height, width), (patch_height, patch_width) = (v if isinstance(v, (list, tuple)) else (v, v)
                                                    for v in (image, patch))
    return (height // patch_height) * (width // patch_width)


def check_keeps_a_patch(masking: MaskingConfig, strategy_settings: Iterable[str], num_patches: int, tower: str) -> None:
    """A strategy that drops `ratio` of the patches keeps at least one: round(ratio x L) of L would leave the image
    tower its CLS token alone, whatever the image."""
    if "ratio" not in strategy_settings or not 0 <= masking.ratio < 1:  # validate_masking names a ratio out of range
        return
    if round(masking.ratio * num_patches) < num_patches:
        return
    most = math.floor((num_patches - 0.5) / num_patches * 10_000)  # in 1e-4: the largest ratio that keeps one
    while round(most / 10_000 * num_patches) >= num_patches:  # where the bound itself rounds up
        most -= 1
    raise ValueError(f"masking.ratio={masking.ratio!r} drops all {num_patches} patch tokens of {tower} "
                     f"(round({masking.ratio!r} x {num_patches}) = {num_patches}): its image tower would see the CLS "
                     f"token alone; a ratio of at most {most / 10_000:.4f} keeps one")


def check_clusters_fit(masking: MaskingConfig, strategy_settings: Iterable[str], num_patches: int, tower: str) -> None:
    """k-means asks for at most one centre per patch token: with more, the masker would quietly take one per patch
    (each patch its own cluster, the drops of `random`) while the point is recorded at the k it asked for."""
    if "kmeans_k" in strategy_settings and masking.kmeans_k > num_patches:
        raise ValueError(f"masking.kmeans_k={masking.kmeans_k!r} asks for more clusters than the {num_patches} patch "
                         f"tokens of {tower}: give at most {num_patches}")


def check_patch_count(masking: MaskingConfig, strategy_settings: Iterable[str], num_patches: int, tower: str) -> None:
    """What `masking` asks of an image tower of `num_patches` patch tokens (named `tower` in the errors)."""
    check_keeps_a_patch(masking, strategy_settings, num_patches, tower)
    check_clusters_fit(masking, strategy_settings, num_patches, tower)


def validate_model_for_masking(model: ModelConfig, masking: MaskingConfig, strategy_settings: Iterable[str]) -> None:
    """The image tower of `model.name` can take the masking: a VisionTransformer (the masker replaces its
    `patch_dropout`), and one that pools its CLS token alone where `masking.attention` hides tokens (attention
    mode hides them from the transformer's attention, not from a pooling over all tokens); a ratio that keeps a
    patch token, and no more k-means clusters than patch tokens. Read off open_clip's config file;
    `masking.install_masking` checks the built model the same way. `strategy_settings`: as for `calibrated`."""
    vision_cfg = model_config(model.name).get("vision_cfg", {})
    kind = image_tower_kind(vision_cfg)
    if kind is not None:
        raise ValueError(f"model.name={model.name!r}: its image tower is {kind}, not an open_clip VisionTransformer; "
                         "clustermask masks a VisionTransformer's patch tokens (e.g. ViT-B-16)")
    num_patches = patch_count(vision_cfg)
    if num_patches is not None:
        check_patch_count(masking, strategy_settings, num_patches, f"model.name={model.name!r}")
    pooling = pooling_beyond_cls(vision_cfg)
    if hides_tokens(masking, strategy_settings) and pooling is not None:
        raise ValueError(f"masking.attention=true with model.name={model.name!r}: attention mode hides tokens from "
                         f"attention only, and this tower's output reads them through {pooling}; use a model that "
                         "pools its CLS token (e.g. ViT-B-16) or masking.attention=false")


PLUGIN_HINT = " (one of your own? name the file that registers it in plugins=[...])"


def validate_masking(cfg: MaskingConfig, strategies: Iterable[str],
                     options_read: Optional[Sequence[str]] = None) -> None:
    """strategies: the names registered in clustermask.masking.STRATEGIES; options_read: the `masking.options`
    keys the strategy declares it reads (None: it does not say, and takes any)."""
    if cfg.strategy not in strategies:
        raise ValueError(f"masking.strategy={cfg.strategy!r} is not one of {sorted(strategies)}{PLUGIN_HINT}")
    if not 0.0 <= cfg.ratio < 1.0:
        raise ValueError(f"masking.ratio={cfg.ratio!r} must be in [0, 1)")
    if cfg.features not in FEATURES:
        raise ValueError(f"masking.features={cfg.features!r} is not one of {list(FEATURES)}")
    if not 0.0 < cfg.anchor_fraction <= 1.0:
        raise ValueError(f"masking.anchor_fraction={cfg.anchor_fraction!r} must be in (0, 1]")
    if not -1.0 <= cfg.threshold <= 1.0:
        raise ValueError(f"masking.threshold={cfg.threshold!r} must be a cosine similarity in [-1, 1]")
    if cfg.target_coverage is not None and not 0.0 < cfg.target_coverage < 1.0:
        raise ValueError(f"masking.target_coverage={cfg.target_coverage!r} must be in (0, 1)")
    if cfg.target_coverage is not None and cfg.target_coverage <= cfg.anchor_fraction:
        # no threshold covers less than the anchors: calibration would end at 1 and cover the anchors alone
        raise ValueError(f"masking.target_coverage={cfg.target_coverage!r} must be above "
                         f"masking.anchor_fraction={cfg.anchor_fraction!r}: the anchors are always in their cluster")
    check_minimums("masking", cfg, {"calibration_batches": 1, "kmeans_k": 1, "kmeans_iters": 0})
    if not isinstance(cfg.options, dict):
        raise ValueError(f"masking.options={cfg.options!r} must be a mapping of a strategy's own settings")
    check_options_read("masking.options", cfg.strategy, cfg.options, options_read)


def calibrated(cfg: MaskingConfig, strategy_settings: Iterable[str]) -> bool:
    """Whether training calibrates `cfg`'s threshold to a target coverage: one is given and the strategy
    declares it."""
    return cfg.target_coverage is not None and "target_coverage" in strategy_settings


def hides_tokens(cfg: MaskingConfig, strategy_settings: Iterable[str]) -> bool:
    """Whether `cfg`'s masker hides kept tokens from attention: `attention` is set and the strategy declares it."""
    return cfg.attention and "attention" in strategy_settings


def settings_in_effect(cfg: MaskingConfig, strategy_settings: Iterable[str]) -> Set[str]:
    """The MaskingConfig keys that shape `cfg`'s masks: its strategy's settings (STRATEGY_SETTINGS in
    clustermask.masking), less the fixed threshold when a target coverage calibrates it and the calibration's
    batch count when none does."""
    used = {"strategy", *strategy_settings}
    used.discard("threshold" if calibrated(cfg, used) else "calibration_batches")
    return used


def canonical_masking(cfg: MaskingConfig, strategy_settings: Iterable[str]) -> Tuple[MaskingConfig, Dict[str, Any]]:
    """`cfg` with every setting its strategy does not use at one fixed value (MaskingConfig's default; a ratio
    of 0 where the ratio is not used: such a strategy drops nothing), and {key: the value given} for each
    setting that changed. Two points of a sweep that differ only in unused settings are the same run."""
    used = settings_in_effect(cfg, strategy_settings)
    defaults = MaskingConfig(ratio=0.0)
    fixed = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cfg) if f.name not in used}
    given = {key: getattr(cfg, key) for key, value in fixed.items() if getattr(cfg, key) != value}
    return dataclasses.replace(cfg, **fixed), given


def check_minimums(section: str, cfg, minimums: Dict[str, float]) -> None:
    """Raise ValueError naming `section.key=value` for the first key below its minimum."""
    for key, low in minimums.items():
        value = getattr(cfg, key)
        if not value >= low:  # also refuses nan
            raise ValueError(f"{section}.{key}={value!r} must be at least {low}")


def check_device(key: str, name: str) -> None:
    # the syntax only: the login node that submits a sweep may have no GPU
    if not DEVICE.fullmatch(name):
        raise ValueError(f"{key}={name!r} is not one of auto, cpu, cuda, cuda:N")


def validate_data(cfg: DataConfig) -> None:
    check_minimums("data", cfg, {"workers": 0, "shuffle_buffer": 0})


def validate_eval(cfg: EvalConfig, evaluators: Mapping[str, Optional[Sequence[str]]],
                  check_paths: bool = True) -> None:
    """evaluators: the names registered in clustermask.evaluate.EVALUATORS, each with the options it reads (None:
    it does not say, and takes any)."""
    check_minimums("eval", cfg, {"batch_size": 1, "workers": 0})
    check_device("eval.device", cfg.device)
    for i, task in enumerate(cfg.tasks):
        if task.name not in evaluators:
            raise ValueError(f"eval.tasks[{i}].name={task.name!r} is not one of {sorted(evaluators)}{PLUGIN_HINT}")
        check_task_options(i, task, evaluators[task.name])
    # every dataset that is not ready, at once: a benchmark suite is set up by hand, a dozen folders
    problems = [path_problem(i, task) for i, task in enumerate(cfg.tasks)] if check_paths else []
    if any(problems):
        raise FileNotFoundError("\n".join(filter(None, problems)))
    check_tasks_apart(cfg.tasks)


def check_task_options(index: int, task: EvalTask, declared: Optional[Sequence[str]]) -> None:
    """An option its evaluator does not read (a typo: the probe would run at its default rate, recorded as run at
    the one asked for) or a value a built-in evaluator's job would fail on after the training."""
    if not isinstance(task.options, Mapping):
        raise ValueError(f"eval.tasks[{index}].options={task.options!r} must be a mapping of {task.name}'s options")
    check_options_read(f"eval.tasks[{index}].options", task.name, task.options, declared)
    for key, value in task.options.items():
        rule, check = BUILTIN_OPTIONS.get((task.name, key), ("", None))
        if check is not None and not check(value):
            raise ValueError(f"eval.tasks[{index}].options.{key}={value!r} ({task.name}) must be {rule}")


def check_options_read(where: str, reader: str, given: Mapping, read: Optional[Sequence[str]]) -> None:
    """An option in `given` (at `where`) that `reader` (a strategy, an evaluator) does not read, where it says
    which it reads (`read`); not iterated where it does not say: masking.options_asked records what a strategy's
    probe looks up."""
    unknown = [key for key in given if key not in read] if read is not None else []
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: {reader} reads no such option{close_hint(unknown[0], read)}; it "
                         f"reads {', '.join(read) or 'none'}")


def close_hint(key: str, known: Sequence[str]) -> str:
    """` (did you mean X?)` for the name in `known` closest to a mistyped `key`, or ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (evaluator, option) -> (what its value must be, the check), for the values a built-in evaluator's job fails on
BUILTIN_OPTIONS = {
    ("linear_probe", "lr"): ("a positive, finite number", lambda v: _number(v) and 0 < v < math.inf),
    ("linear_probe", "epochs"): ("a whole number of at least 1", lambda v: _number(v) and v == int(v) and v >= 1),
    ("zeroshot_retrieval", "recall_k"): (
        "a list of whole numbers of at least 1, e.g. [1, 5, 10]",
        lambda v: (isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
                   and all(_number(k) and k == int(k) and k >= 1 for k in v))),
}


def check_tasks_apart(tasks: List[EvalTask]) -> None:
    """Two tasks of one evaluator on one dataset (a linear probe at two learning rates) would log the same metric
    keys and write the same result JSON: the second would replace the first, unseen."""
    first_of: Dict[str, int] = {}
    for i, task in enumerate(tasks):
        prefix = metric_key(task, "")
        if prefix in first_of:
            raise ValueError(f"eval.tasks[{first_of[prefix]}] and eval.tasks[{i}] are both {task.name} on "
                             f"{task.dataset}: their metrics ({prefix}...) and result file would be one, the second's "
                             "replacing the first's; keep one (`clustermask-resubmit SWEEP --evaluate-again` "
                             "evaluates a sweep again with other settings)")
        first_of[prefix] = i


def path_problem(index: int, task: EvalTask) -> str:
    if "://" in task.root:  # clip_benchmark would stream a wds dataset from a Hugging Face URL
        return (f"eval.tasks[{index}].root={task.root!r} ({task.dataset}) is a URL: the jobs download nothing; clone "
                "the dataset (`git lfs install` first) and give its folder")
    if not os.path.exists(task.root):
        return f"eval.tasks[{index}].root={task.root!r} ({task.dataset}) does not exist"
    problem = layout_problem(task)
    return f"eval.tasks[{index}].root={task.root!r} ({task.name} on {task.dataset}): {problem}" if problem else ""


GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
LFS_POINTER_MOST = 1024  # bytes: a pointer is about 130


def is_git_lfs_pointer(path) -> bool:
    """Whether the file is a Git LFS pointer: a clone of a Hugging Face dataset made without git lfs (or with
    `GIT_LFS_SKIP_SMUDGE=1`) holds these ~130-byte texts in place of its shards, which webdataset reads as truncated
    tars: the evaluation job fails on them ("truncated header"), the training skips them with a warning each."""
    try:
        if os.path.getsize(path) > LFS_POINTER_MOST:  # a shard: not opened (a thousand of them on a shared disk)
            return False
        with open(path, "rb") as file:
            return file.read(len(GIT_LFS_POINTER)) == GIT_LFS_POINTER
    except OSError:  # a folder, a file it may not read: the reader names those
        return False


def lfs_pull_hint(pointers: List[str], where: str) -> str:
    return (f"{len(pointers)} shard(s) are Git LFS pointers, not shards, e.g. {pointers[0]}: fetch them with "
            f"`git lfs pull` in {where}")


IMAGENET_META = "meta.bin|ILSVRC2012_devkit_t12.tar.gz"  # torchvision's ImageNet: its class index, or the devkit
# clip_benchmark's own layouts (not wds) of the paper's benchmarks: dataset -> (its kind, {split: what the root holds});
# `name/` a folder, `a|b` either. Where one lacks, clip_benchmark's builder fetches it from the evaluation job (COCO's
# images, the Karpathy annotations: wget) or torchvision fails there, after the training.
RAW_LAYOUTS = {
    "cifar10": ("classification", {"train": ("cifar-10-batches-py/",), "test": ("cifar-10-batches-py/",)}),
    "cifar100": ("classification", {"train": ("cifar-100-python/",), "test": ("cifar-100-python/",)}),
    "imagenet1k": ("classification", {"train": ("train/|ILSVRC2012_img_train.tar", IMAGENET_META),
                                      "test": ("val/|ILSVRC2012_img_val.tar", IMAGENET_META)}),
    "mscoco_captions": ("retrieval", {"test": ("val2014/", "coco_test_karpathy.json")}),
    "flickr8k": ("retrieval", {"test": ("flickr8k_test_karpathy.txt",)}),  # beside the images
    "flickr30k": ("retrieval", {"test": ("flickr30k_test_karpathy.txt",)}),
}


def layout_problem(task: EvalTask) -> str:
    """What a local root lacks for clip_benchmark to read `task.dataset` from it; '' if nothing.

    Checked before submission because clip_benchmark finds out late and badly: it fetches (wget, from the
    evaluation job) any part of SugarCrepe, COCO or the Flickr annotations that it does not find, leaving a partial
    download in the dataset directory, and reads a dataset only once that job starts, after the training."""
    root = Path(task.root)
    if task.dataset.startswith("sugar_crepe/"):
        annotations = f"{task.dataset.split('/', 1)[1]}.json"
        missing = entries_lacking(root, ["val2017/", annotations])
        if missing:
            return (f"lacks {', '.join(missing)} (SugarCrepe's layout: COCO's val2017/ images and the edit's json)"
                    f"{folder_too_high(root, 'sugar_crepe')}")
        return images_problem(root, annotations, "val2017", sugar_crepe_images)
    if task.dataset.startswith("wds/"):
        return wds_layout_problem(task, root)
    if task.dataset in RAW_LAYOUTS:
        return raw_layout_problem(task, root)
    return ""  # another clip_benchmark dataset: evaluate.downloads_refused stops any fetch in the job


def wds_folder(task: EvalTask) -> str:
    """The folder a wds dataset is cloned into: `clip-benchmark/wds_<name>` on Hugging Face (`wds/vtab/cifar10`:
    `wds_vtab-cifar10`)."""
    return "wds_" + task.dataset.split("/", 1)[1].replace("/", "-")


def folder_too_high(root: Path, folder: str) -> str:
    """A hint where the root given is the folder above the dataset's (`data.eval_root` itself, say)."""
    return f"; {folder}/ is in it: give {root / folder}?" if (root / folder).is_dir() else ""


def splits_read(task: EvalTask) -> Tuple[str, ...]:
    return ("train", "test") if task.name == "linear_probe" else ("test",)


def kind_problem(task: EvalTask, kind: str, says: str) -> str:
    """Where `task`'s built-in evaluator needs another kind of dataset (`says`: what tells the dataset's kind)."""
    if task.name in EVALUATOR_KIND and (kind == "retrieval") != (EVALUATOR_KIND[task.name] == "retrieval"):
        return f"{says} {kind!r}; {task.name} needs a {EVALUATOR_KIND[task.name]} dataset"
    return ""


def wds_layout_problem(task: EvalTask, root: Path) -> str:
    kind_file = root / "dataset_type.txt"  # clip_benchmark's default, when absent, is classification
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    problem = kind_problem(task, kind, "dataset_type.txt says")
    if problem:
        return problem
    splits = splits_read(task)
    needed = [f"{split}/nshards.txt" for split in splits]
    if task.name == "zeroshot_classification":
        needed += ["classnames.txt", "zeroshot_classification_templates.txt"]
    missing = entries_lacking(root, needed)
    if missing:
        return f"lacks {', '.join(missing)} (clip_benchmark's wds layout){folder_too_high(root, wds_folder(task))}"
    for split in splits:
        count = (root / split / "nshards.txt").read_text().strip()
        if not count.isdigit() or int(count) < 1:
            return f"{split}/nshards.txt holds {count!r}, not a number of shards"
        shards = [f"{split}/{n}.tar" for n in range(int(count))]
        absent = [shard for shard in shards if not (root / shard).is_file()]
        if absent:
            return f"{split}/nshards.txt names {count} shards, {len(absent)} missing, e.g. {absent[0]}"
        pointers = [shard for shard in shards if is_git_lfs_pointer(root / shard)]
        if pointers:
            return lfs_pull_hint(pointers, "the dataset's clone")
    return ""


def raw_layout_problem(task: EvalTask, root: Path) -> str:
    kind, layout = RAW_LAYOUTS[task.dataset]
    problem = kind_problem(task, kind, f"{task.dataset} is")
    if problem:
        return problem
    needed = dict.fromkeys(entry for split in splits_read(task) for entry in layout.get(split, ()))
    missing = entries_lacking(root, needed)
    if missing:
        return f"lacks {', '.join(missing)} (clip_benchmark's layout for {task.dataset})"
    if task.dataset not in NAMED_IMAGES:
        return ""
    return images_problem(root, *NAMED_IMAGES[task.dataset])


def entries_lacking(root: Path, entries: Iterable[str]) -> List[str]:
    """Those of `entries` (`name/`: a folder, else a file; `a|b`: either) that `root` lacks."""
    def there(name: str) -> bool:
        return (root / name).is_dir() if name.endswith("/") else (root / name).is_file()

    return [entry for entry in entries if not any(there(name) for name in entry.split("|"))]


def sugar_crepe_images(annotations: Path) -> List[str]:
    return [entry["filename"] for entry in json.loads(annotations.read_text()).values()]


def karpathy_coco_images(annotations: Path) -> List[str]:
    return [image["file_name"] for image in json.loads(annotations.read_text())["images"]]


def karpathy_flickr_images(annotations: Path) -> List[str]:
    """clip_benchmark's Flickr reader: a header line, then `<image>.jpg,<caption>` per caption."""
    lines = annotations.read_text().splitlines()[1:]
    return [line.split(".jpg,", 1)[0] + ".jpg" for line in lines if line.strip()]


# dataset -> (its annotation file, the folder of the images it names ('': the root), how to read their names)
NAMED_IMAGES = {"mscoco_captions": ("coco_test_karpathy.json", "val2014", karpathy_coco_images),
                "flickr8k": ("flickr8k_test_karpathy.txt", "", karpathy_flickr_images),
                "flickr30k": ("flickr30k_test_karpathy.txt", "", karpathy_flickr_images)}


# Read once per version of the file or folder (its mtime): every point of a sweep is checked, with the same
# evaluation; COCO's val2014/ holds 40,504 images, listed in a second or so on a shared disk.
@functools.lru_cache(maxsize=64)
def image_names(path: str, mtime_ns: int, size: int, read_names) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(read_names(Path(path))))


@functools.lru_cache(maxsize=64)
def folder_listing(path: str, mtime_ns: int) -> frozenset:
    return frozenset(os.listdir(path))


def images_problem(root: Path, annotations: str, folder: str, read_names) -> str:
    """What `root/folder` ('': the root) lacks of the images that `root/annotations` names: a failed fetch's empty
    file, COCO unzipped one folder too deep (`val2017/val2017/`), a copy cut short. The evaluation job would fail
    on the first one it misses, after the training."""
    stat = (root / annotations).stat()
    if stat.st_size == 0:  # what a failed `wget --output-document` leaves
        return f"{annotations} is empty (a download that failed?)"
    try:
        names = image_names(str(root / annotations), stat.st_mtime_ns, stat.st_size, read_names)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{annotations} is not in the layout clip_benchmark reads ({exc!r})"
    if not names:
        return f"{annotations} names no image"
    images = root / folder
    there = folder_listing(str(images), images.stat().st_mtime_ns)
    missing = [name for name in names if name not in there and not (images / name).is_file()]
    if not missing:
        return ""
    deeper = f" ({folder}/{folder}/ is there: unzipped one folder too deep?)" if folder and (images / folder).is_dir() \
        else ""
    return (f"{f'{folder}/' if folder else 'the root'} lacks {len(missing)} of the {len(names)} images {annotations} "
            f"names, e.g. {missing[0]}{deeper}")


def validate_contrastive_batch(cfg: TrainConfig, ranks: int) -> None:
    """CLIP's loss contrasts each image with the other captions of the batch over all ranks: a batch of one has
    none, its loss is 0 whatever the weights, and the run would learn nothing without a word."""
    if cfg.batch_size * ranks < 2:
        raise ValueError(f"train.batch_size={cfg.batch_size} on {ranks} rank(s) is a contrastive batch of one: CLIP's "
                         "loss has no other caption to tell the image's from (it is 0, nothing is learnt); use at "
                         "least 2")


def validate_train(cfg: TrainConfig) -> None:
    # log_every and checkpoint_every divide the step count: 0 would fail the job after its first step
    check_minimums("train", cfg, {"steps": 1, "batch_size": 1, "log_every": 1, "checkpoint_every": 1,
                                  "warmup_steps": 0, "weight_decay": 0.0, "threads": 0})
    if not 0 < cfg.lr < math.inf:  # also refuses nan
        raise ValueError(f"train.lr={cfg.lr!r} must be positive and finite")
    check_device("train.device", cfg.device)
