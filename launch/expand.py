"""Hydra's multirun expansion, composing each distinct config-group selection once.

`clustermask-sweep -m a=1,2 b=x,y` means what it means to Hydra's basic sweeper: the cartesian product of
the command-line sweeps and the experiment's `hydra.sweeper.params` (the command line wins on a shared key),
expanded by `BasicSweeper.split_arguments`. Stock Hydra then composes every point twice (once to validate,
once to launch) and runs a job per point: seconds per dozen points. Here a point is composed the way Hydra
composes a config: the defaults list (which only the config-group overrides change) is composed once per
distinct group selection, then the point's value overrides are applied with Hydra's own override code.
`tests/test_launch.py` checks the result equals `hydra.compose` for every point.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from . import graph
from .schema import register_configs

FILE, PKG = "file://", "pkg://"
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
CONFIG_NAME = "config"
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
BASIC_LAUNCHER = f"{BasicLauncher.__module__}.{BasicLauncher.__name__}"
register_configs()
OmegaConf.register_new_resolver("cm_safe", graph.safe_name, replace=True)  # sweep names become safe paths


@dataclass
class ComposedPoint:
    overrides: List[str]  # the point's own overrides (graph.point_overrides): what names and identifies it
    config: Optional[dict]  # the resolved task config, None if it did not compose
    error: str = ""


@dataclass
class Sweep:
    sweep_dir: Path
    points: List[ComposedPoint]
    # the researcher's config folders (hydra.searchpath's file:// entries, absolute), where a resubmission looks
    # for a config-group option as well
    config_folders: List[str] = field(default_factory=list)


class _Composer:
    """Composes points of one sweep, caching the composition of each config-group selection."""

    def __init__(self):
        hydra = GlobalHydra.instance().hydra
        self.compose_config = hydra.compose_config
        self.loader = hydra.config_loader
        self.parser = OverridesParser.create(config_loader=self.loader)
        self.by_groups: Dict[Tuple[str, ...], Tuple[DictConfig, DictConfig]] = {}
        self.current: Optional[DictConfig] = None

    def sweep_config(self, overrides: List[str], multirun: bool) -> DictConfig:
        return self.compose_config(CONFIG_NAME, overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
                                   with_log_configuration=False)

    def _composes(self, override: Override) -> bool:
        """Hydra's rule (hydra._internal.defaults_list.Overrides): config-group overrides shape the defaults
        list; the others are applied to the composed config. Hydra's own overrides (hydra.searchpath, ...)
        go with the composition."""
        if override.is_hydra_override():
            return True
        return self.loader.repository.group_exists(override.key_or_group) and not isinstance(override.value(), dict)

    def compose(self, overrides: List[str]) -> DictConfig:
        """The point's task config (without the hydra node, which is current in HydraConfig)."""
        parsed = self.parser.parse_overrides(overrides)
        composing, applied = [], []
        for override in parsed:
            (composing if self._composes(override) else applied).append(override)
        key = tuple(o.input_line for o in composing)
        if key not in self.by_groups:
            full = self.compose_config(CONFIG_NAME, list(key), run_mode=RunMode.RUN, from_shell=False,
                                       with_log_configuration=False)
            task = copy.deepcopy(full)
            with open_dict(task):
                del task["hydra"]  # the biggest node, and the same for every point of this selection
            self.by_groups[key] = (full, task)
        full, cfg = self.by_groups[key]
        if self.current is not full:  # as Hydra does before a job: ${hydra:...} resolves
            HydraConfig.instance().set_config(full)
            self.current = full
        cfg = copy.deepcopy(cfg)
        ConfigLoaderImpl._apply_overrides_to_config(applied, cfg)
        return cfg

    def resolved_task_config(self, overrides: List[str]) -> dict:
        return resolved(self.compose(overrides))

    def expand(self, task_overrides: List[str], sweep_cfg: DictConfig) -> List[List[str]]:
        """BasicSweeper.sweep's expansion: sweeper params first, then the command line's task overrides."""
        sweeper = sweep_cfg.hydra.sweeper.get("_target_")
        if sweeper != BASIC_SWEEPER:
            raise HydraException(f"hydra.sweeper._target_={sweeper!r}: only Hydra's basic sweeper (a grid of "
                                 "points) is supported, as every point is submitted at once")
        params = [f"{k}={v}" for k, v in (sweep_cfg.hydra.sweeper.get("params") or {}).items()]
        overrides = [self.tidy_float_range(o) for o in self.parser.parse_overrides(params + task_overrides)]
        return BasicSweeper.split_arguments(overrides, None)[0]

    def tidy_float_range(self, override: Override) -> Override:
        """A float `range()` sweep with its values as their shortest decimals. Hydra adds the step up, so that
        `masking.ratio=range(0.1,0.6,0.1)` swept 0.30000000000000004: in the point's name, its run directory and
        MLflow params, and a report that merged it with another sweep's 0.3 made two rows of one ratio."""
        if override.value_type != ValueType.RANGE_SWEEP:
            return override
        values = list(override.sweep_string_iterator())
        tidy = [repr(float(f"{float(v):.12g}")) if any(c in v for c in ".e") else v for v in values]
        if tidy == values:
            return override
        return self.parser.parse_override(f"{override.get_key_element()}={','.join(tidy)}")


def resolved(cfg: DictConfig) -> dict:
    """The config as a plain dict. A `???` left unset raises ValueError naming its key (else the string '???'
    would reach the checks as a value)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ValueError(f"{exc.full_key}=??? must be given, e.g. on the command line") from exc


def compose_sweep(overrides: List[str], multirun: bool = True) -> Sweep:
    """Every point of the sweep these command-line overrides describe, composed and resolved.

    A point that does not compose carries its error (the caller names the point); an error common to the
    whole command line (a malformed override, an unknown experiment) raises HydraException."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="clustermask"):
        composer = _Composer()
        sweep_cfg = composer.sweep_config(overrides, multirun)
        if not multirun and sweep_cfg.hydra.mode == RunMode.MULTIRUN:  # as Hydra: a config's mode holds without -m
            multirun = True
            sweep_cfg = composer.sweep_config(overrides, multirun)
        check_hydra_launcher(sweep_cfg)
        check_hydra_job_environment(sweep_cfg)
        sweep_dir = Path(str(sweep_cfg.hydra.sweep.dir if multirun else sweep_cfg.hydra.run.dir)).resolve()
        parsed = composer.parser.parse_overrides(overrides)
        hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
        task_overrides = [o.input_line for o in parsed if not o.is_hydra_override()]
        points = []
        for point in composer.expand(task_overrides, sweep_cfg) if multirun else [task_overrides]:
            own = graph.point_overrides(point)
            try:  # as Hydra composes a job of a sweep: the hydra overrides, then the point's
                points.append(ComposedPoint(own, composer.resolved_task_config(hydra_overrides + point)))
            except (HydraException, OmegaConfBaseException, ValueError) as exc:
                points.append(ComposedPoint(own, None, " ".join(str(exc).split())))
    return Sweep(sweep_dir, points, config_folders(sweep_cfg.hydra.searchpath))


def check_hydra_launcher(sweep_cfg: DictConfig) -> None:
    """Hydra's launcher runs no point here: `hydra/launcher=submitit_slurm` (Hydra's submitit plugin, which a Hydra
    user reaches for) was ignored, and the sweep trained on the machine it was launched from."""
    launcher = sweep_cfg.hydra.launcher.get("_target_")
    if launcher != BASIC_LAUNCHER:
        raise HydraException(f"hydra/launcher ({launcher}): clustermask submits a sweep itself, as one graph (a "
                             "training array, an evaluation array that waits on it, a report job), and would not use "
                             "it; use launcher=slurm, whose launcher.train.*, launcher.eval.* and launcher.report.* "
                             "take the submitit settings (partition, gpus_per_node, timeout_min, ...), or "
                             "launcher=local")


def check_hydra_job_environment(sweep_cfg: DictConfig) -> None:
    """Hydra sets `hydra.job.env_set` in the job it runs, which is not how a point runs here: it was ignored, and the
    jobs ran without the variables (NCCL's, say)."""
    names = list(sweep_cfg.hydra.job.get("env_set") or {})
    if names:
        raise HydraException(f"hydra.job.env_set ({', '.join(names)}) would not reach the jobs, which clustermask runs "
                             "itself: set the variables in the shell you run clustermask-sweep from (the local tasks "
                             "and sbatch take its environment), or for one SLURM stage in its setup lines, e.g. "
                             f"'launcher.train.setup=[\"export {names[0]}=VALUE\"]'")


def config_folders(searchpath: List[str]) -> List[str]:
    """The folders of hydra.searchpath's entries: `file://` ones made absolute, `pkg://` ones found as packages."""
    folders = []
    for entry in searchpath:
        if entry.startswith(FILE):
            folders.append(str(Path(entry[len(FILE):]).resolve()))
        elif entry.startswith(PKG):
            spec = importlib.util.find_spec(entry[len(PKG):].replace("/", "."))
            if spec is not None and spec.submodule_search_locations:  # a package: its folder
                folders.append(next(iter(spec.submodule_search_locations)))
    return folders
