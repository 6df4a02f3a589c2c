"""Typed configuration: the library's dataclasses plus the launcher's, registered in Hydra's ConfigStore.

YAML files in configs/ extend these; struct mode rejects unknown keys, and OmegaConf checks types.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import MISSING

from clustermask.config import DataConfig, EvalConfig, MaskingConfig, ModelConfig, TrackingConfig, TrainConfig


@dataclass
class StageResources(SlurmQueueConf):
    """hydra-submitit-launcher's SLURM schema, one per stage (train, eval, report)."""

    _target_: str = "launch.executors.SlurmExecutor"
    submitit_folder: str = ""  # empty: <sweep_dir>/slurm
    name: str = ""  # empty: clustermask-<sweep>-<stage>
    timeout_min: int = 60
    mem_gb: Optional[int] = 4
    cpus_per_task: Optional[int] = 1
    max_num_timeout: int = 3  # requeues after a time limit / preemption


@dataclass
class DataSchema(DataConfig):
    """A sweep's data has no default location: a data preset gives it (data/synthetic.yaml) or leaves `???`,
    which the command line must fill (data/shards.yaml); a `???` left unset stops the sweep, naming the key."""

    train_shards: str = MISSING
    eval_root: str = MISSING


@dataclass
class LauncherConfig:
    executor: str = "local"  # local | slurm: the one attribute that differs
    max_parallel: int = 1  # local: tasks run at once (on several GPUs, each on its own while there are enough)
    dry_run: bool = False  # print job scripts and the dependency graph, submit nothing
    train: StageResources = field(default_factory=lambda: StageResources(timeout_min=240))
    eval: StageResources = field(default_factory=lambda: StageResources(timeout_min=60))
    report: StageResources = field(default_factory=lambda: StageResources(timeout_min=15, mem_gb=2))


@dataclass
class PathsConfig:
    root: str = "outputs"
    data: str = "${paths.root}/data/synthetic"


@dataclass
class ReportConfig:
    # one more metric key (`<task>/<dataset>/<metric>`, as in MLflow) to plot against the mask ratio, besides
    # zero-shot and linear-probe accuracy on every dataset and SugarCrepe's swap-attribute accuracy
    plot_metric: str = ""


@dataclass
class Config:
    sweep_name: str = "default"
    paths: PathsConfig = field(default_factory=PathsConfig)
    # a researcher's own masking strategies and evaluators: .py files or module names that register them when
    # imported (clustermask/plugins.py), imported by the sweep command and by every job
    plugins: List[str] = field(default_factory=list)
    model: ModelConfig = MISSING
    masking: MaskingConfig = MISSING
    data: DataSchema = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: TrackingConfig = MISSING
    launcher: LauncherConfig = MISSING
    report: ReportConfig = field(default_factory=ReportConfig)


GROUP_SCHEMAS = {"model": ModelConfig, "masking": MaskingConfig, "data": DataSchema, "train": TrainConfig,
                 "eval": EvalConfig, "tracking": TrackingConfig, "launcher": LauncherConfig}


def register_configs() -> None:
    """The typed primary config: each group's YAML merges into its typed node (`masking` a MaskingConfig), so one
    schema entry types them all, and `--help` lists no schema among a group's options."""
    ConfigStore.instance().store(name="base_config", node=Config)


def _node_type(hint: Any) -> Any:
    """A field's type, less Optional[...]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _node_at(path: str) -> Any:
    """The type of the config node at `path`, from `Config` down: a dataclass; the type of the first node on the
    way that is not one (a mapping that takes any key, such as `masking.options`, and whatever lies under it); or
    None where a typed node has no such key."""
    node: Any = Config
    for part in filter(None, path.split(".")):
        if not dataclasses.is_dataclass(node):
            return node
        hint = typing.get_type_hints(node).get(part)
        if hint is None:
            return None
        node = _node_type(hint)
    return node


def schema_at(path: str) -> Optional[type]:
    """The dataclass of the config node at `path` (`launcher.train`), from `Config` down; None where the node
    takes any key (`masking.options`) or is not a mapping. (Typed lists such as `eval.tasks` OmegaConf
    checks itself, even under `+`.)"""
    node = _node_at(path)
    return node if dataclasses.is_dataclass(node) else None


def in_open_mapping(full_key: str) -> bool:
    """Whether `full_key` lies in a mapping that takes any key (`masking.options.width`), rather than in a typed
    node, or under a key no typed node has (`trian.steps`)."""
    node = _node_at(full_key.rpartition(".")[0])
    return node is not None and not dataclasses.is_dataclass(node)


def typed_keys(node: type = Config, prefix: str = "") -> List[str]:
    """Every key of the typed config under `node`, in full (`launcher.train.partition`)."""
    keys = []
    for name, hint in typing.get_type_hints(node).items():
        full_key = f"{prefix}{name}"
        keys.append(full_key)
        if dataclasses.is_dataclass(_node_type(hint)):
            keys += typed_keys(_node_type(hint), f"{full_key}.")
    return keys


def close_keys(full_key: str) -> List[str]:
    """The keys of `full_key`'s node that look like it: `masking.ratoi` -> masking.ratio, `masking.k` ->
    masking.kmeans_k (a word of the key); then the keys of that name elsewhere: `masking.lr` -> train.lr,
    `launcher.train.max_parallel` -> launcher.max_parallel."""
    parent, _, name = full_key.rpartition(".")
    schema = schema_at(parent)
    if schema is None:
        return []
    keys = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.75)
    close += [k for k in keys if name in k.split("_") and k not in close]
    close = [f"{parent}.{k}" if parent else k for k in close]
    return close + [k for k in typed_keys() if k.rpartition(".")[2] == name and k not in close]


def did_you_mean(full_key: str) -> str:
    """` (did you mean masking.kmeans_k?)` for `masking.k`: the keys like it (`close_keys`); for a SLURM stage's
    resources, where any other sbatch option goes; or nothing."""
    close = close_keys(full_key)
    if close:
        return f" (did you mean {' or '.join(close)}?)"
    parent, _, name = full_key.rpartition(".")
    if schema_at(parent) is StageResources:  # submitit passes any other sbatch option through
        return f" (another sbatch option goes in +{parent}.additional_parameters.{name}=...)"
    return ""


# Hydra's advice for a key the config lacks, which a typed node refuses all the same (`unknown_settings`)
APPEND_ADVICE = re.compile(r"\. To append to your config use \+(\S+)=.*?: ")


def config_error(exc: BaseException, say_plus: bool = True) -> str:
    """OmegaConf's error on one line: its first, with the keys like the one it did not find (`say_plus`: and, in
    an open mapping, how to add one; Hydra's own message says it)."""
    text = str(exc).strip()
    first = text.split("\n")[0]
    full_key = re.search(r"^\s*full_key: (\S+)$", text, re.MULTILINE)
    if full_key is None or " not in " not in first:
        return first
    if first.endswith("is not in struct"):  # an open mapping (masking.options) without the key yet
        return f"{first} (a new key there: +{full_key.group(1)}=...)" if say_plus else first
    return first + did_you_mean(full_key.group(1))


def without_append_advice(message: str) -> str:
    """Hydra's `Could not override 'masking.k'. To append to your config use +masking.k=3: ...` less the advice,
    where the key's node is typed: added with `+`, the key would be refused too. An open mapping keeps it."""
    advice = APPEND_ADVICE.search(message)
    if advice is None or in_open_mapping(advice.group(1)):
        return message
    return message[:advice.start()] + ": " + message[advice.end():]


def unknown_settings(cfg: Mapping, path: str = "", schema: type = Config) -> List[str]:
    """A line for each key of a composed config (the node at `path`, of type `schema`) that its schema does not
    have: added with `+key=value`, which struct mode lets through, it would be recorded and then ignored, or fail
    inside a job. Open mappings (`masking.options`, `launcher.<stage>.additional_parameters`) take any key."""
    hints = typing.get_type_hints(schema)
    lines = []
    for key, value in cfg.items():
        full_key = f"{path}.{key}" if path else str(key)
        if key not in hints:
            lines.append(f"{full_key} is not a setting of {schema.__name__}{did_you_mean(full_key)}")
            continue
        node = _node_type(hints[key])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(node):
            lines += unknown_settings(value, full_key, node)
    return lines
