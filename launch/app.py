"""`clustermask-sweep`: expand the sweep the Hydra way, check every point, then submit the whole graph.

    clustermask-sweep -m experiment=demo                       # runs here (launcher=local, the default)
    clustermask-sweep -m experiment=ratio_ablation launcher=slurm
    clustermask-sweep -m masking=random,cluster masking.ratio=0.3,0.5 launcher=slurm launcher.dry_run=true
    clustermask-sweep --cfg job experiment=demo                # Hydra's own flags: print, submit nothing

The points are Hydra's multirun points (command-line sweeps and the experiment's `hydra.sweeper.params`),
composed by `launch.expand` and checked here, in this process, before anything is written. Then the run
directories, MLflow runs and manifest.json are written and the graph goes to the executor: SLURM arrays
(returns at once) or the local executor (runs it here).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import hydra
from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from clustermask.plugins import PluginError, is_file

from . import graph, snapshot
from .executors import Plan, SlurmExecutor, SubmissionError, check_launcher, describe, make_executor
from .expand import CONFIG_DIR, CONFIG_NAME, ComposedPoint, compose_sweep, resolved
from .helpers import Registries, RegistriesInChild, TrackingInChild
from .schema import config_error, did_you_mean, unknown_settings, without_append_advice

HYDRA_ONLY_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


def _typed_stage_configs(cfg: Mapping) -> Dict:
    from clustermask.config import DataConfig, EvalConfig, EvalTask, MaskingConfig, ModelConfig, TrainConfig

    evaluation = dict(cfg["eval"])
    evaluation["tasks"] = [EvalTask(**task) for task in evaluation["tasks"]]
    return {"model": ModelConfig(**cfg["model"]), "masking": MaskingConfig(**cfg["masking"]),
            "data": DataConfig(**cfg["data"]), "train": TrainConfig(**cfg["train"]), "eval": EvalConfig(**evaluation)}


def training_ranks(launcher: Mapping) -> int:
    """The processes a point trains in: SLURM's nodes x tasks per node; the local executor's one."""
    if launcher["executor"] != "slurm":
        return 1
    return max(1, launcher["train"]["nodes"]) * max(1, launcher["train"]["tasks_per_node"])


def preflight(cfg: Mapping, registries: Optional[Registries] = None, shards_found: Optional[set] = None) -> None:
    """Everything that can be checked before submission; raises ValueError/FileNotFoundError naming the key,
    a line for each section that fails (the model, the masking, ..., the training data, the evaluation data).

    cfg: a point's resolved config (a dict, or a DictConfig). shards_found: the `data.train_shards` already
    found by this command, not looked up again (the points of a sweep share them: 64 points of a brace
    pattern over CC12M's 1,243 shards would be 80,000 file lookups, on a shared file system a minute or more)."""
    from clustermask import config

    registries = registries or Registries.here()
    if isinstance(cfg, DictConfig):
        cfg = resolved(cfg)
    unknown = unknown_settings(cfg)
    if unknown:  # added with `+key=value`, which struct mode lets through
        raise ValueError("\n".join(unknown))
    typed = _typed_stage_configs(cfg)
    checks = [lambda: config.validate_model(typed["model"]),
              lambda: config.validate_model_offline(typed["model"]),
              lambda: config.validate_model_for_masking(typed["model"], typed["masking"],
                                                        registries.strategies.get(typed["masking"].strategy, ())),
              lambda: config.validate_masking(typed["masking"], registries.strategies,
                                              registries.strategy_options.get(typed["masking"].strategy)),
              lambda: check_declaration(typed["masking"].strategy, registries),
              lambda: config.validate_train(typed["train"]),
              lambda: config.validate_contrastive_batch(typed["train"], training_ranks(cfg["launcher"])),
              lambda: config.validate_data(typed["data"]),
              lambda: check_training_shards(cfg, set() if shards_found is None else shards_found),
              lambda: config.validate_eval(typed["eval"], registries.evaluators),
              lambda: check_launcher(cfg["launcher"])]
    problems = []
    for check in checks:
        try:
            check()
        except (ValueError, FileNotFoundError, TypeError) as exc:
            problems.append(exc)
    if problems:
        raise type(problems[0])("\n".join(map(str, problems)))


def check_declaration(strategy: str, registries: Registries) -> None:
    problems = registries.declaration_problems.get(strategy)
    if problems:
        raise ValueError("\n".join(problems))


def check_training_shards(cfg: Mapping, shards_found: set) -> None:
    from clustermask import data

    shards = cfg["data"]["train_shards"]
    if shards not in shards_found:
        try:
            data.shard_urls(shards)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}{synthetic_data_hint(cfg)}") from None
        shards_found.add(shards)


def synthetic_data_hint(cfg: Mapping) -> str:
    """How to make the data `data=synthetic` expects, when the missing shards are where it reads them."""
    data_root = cfg.get("paths", {}).get("data")
    if not data_root or Path(cfg["data"]["train_shards"]) != Path(data_root) / "train":
        return ""
    return f" (the synthetic demo data? make it with: clustermask-data --out {data_root})"


def check_plot_metric(cfg: Mapping) -> None:
    """`report.plot_metric` names a task and dataset that the sweep evaluates: misspelt, only the report job would
    have found out, after the whole sweep. (Checked when a sweep is made, not for a resubmission: evaluated
    again on other benchmarks, a sweep keeps the metrics it had.)"""
    from clustermask.config import EvalTask, metric_key

    metric = cfg["report"]["plot_metric"]
    prefixes = list(dict.fromkeys(metric_key(EvalTask(**task), "") for task in cfg["eval"]["tasks"]))
    if not metric or any(metric.startswith(prefix) and len(metric) > len(prefix) for prefix in prefixes):
        return
    name = metric.rpartition("/")[2]
    close = difflib.get_close_matches(metric, [prefix + name for prefix in prefixes], n=3, cutoff=0.75) if name else []
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"report.plot_metric={metric!r} is not <task>/<dataset>/<metric> of a task of eval.tasks "
                     f"({hint}the sweep's metrics start with {', '.join(prefixes) or 'nothing: no eval.tasks'})")


def point_error(point: ComposedPoint, registries: Registries, shards_found: set) -> str:
    if point.error:
        return point.error
    try:
        preflight(point.config, registries, shards_found)
        check_plot_metric(point.config)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        return str(exc)
    return ""


def check_points(points: List[ComposedPoint], registries: Registries) -> List[str]:
    """Compose and preflight errors, naming the failing points: a problem of one point with its overrides, the
    problems that several points share (a missing dataset, a bad shared setting) once, with their numbers."""
    shards_found: set = set()
    sharing: Dict[str, List[int]] = {}  # each problem (a line of an error) -> the points that have it
    for index, point in enumerate(points):
        for problem in point_error(point, registries, shards_found).splitlines():
            sharing.setdefault(problem, []).append(index)
    grouped: Dict[Tuple[int, ...], List[str]] = {}
    for problem, indices in sharing.items():
        grouped.setdefault(tuple(indices), []).append(problem)
    lines = []
    for indices, problems in grouped.items():
        if len(indices) == 1:
            who = f"point {indices[0]} ({' '.join(points[indices[0]].overrides) or 'defaults'})"
        else:
            who = f"every point ({len(points)})" if len(indices) == len(points) else \
                f"points {', '.join(map(str, indices))}"
        lines.append(f"  {who}: " + "\n    ".join(problems))
    return lines


def sets_an_unused_setting(override: str, in_effect) -> bool:
    """`masking.<key>=...` (or `masking.<key>.<entry>=...`, in `masking.options`) for a key not in `in_effect` (a
    config-group override `masking=...` is not)."""
    section, _, key = graph.override_key(override).partition(".")
    return section == "masking" and bool(key) and key.split(".")[0] not in in_effect


def canonical_point_masking(masking: Mapping, strategies: Mapping[str, List[str]]):
    """config.canonical_masking of a point's resolved `masking` section."""
    from clustermask.config import MaskingConfig, canonical_masking

    return canonical_masking(MaskingConfig(**masking), strategies[masking["strategy"]])


def unused_setting_note(masking, key: str, value) -> str:
    return (f"masking.{key}={value!r} is not used by masking.strategy={masking.strategy}: recorded as "
            f"{getattr(masking, key)!r}")


# the sweep's: one value for all its points
SWEEP_SETTINGS = ("launcher", "tracking", "sweep_name", "paths", "plugins", "report", "eval")


def sweep_settings_that_differ(points: List[ComposedPoint]) -> List[str]:
    """`key: value, value` for each of the sweep's own settings whose value differs between its points (a sweep
    over `launcher.train.mem_gb=16,64` would have submitted every point with point 0's)."""
    from clustermask.tracking import flatten

    flat = [flatten({k: p.config[k] for k in SWEEP_SETTINGS if k in p.config}) for p in points if p.config]
    keys = sorted(set().union(*flat)) if flat else []
    lines = []
    for key in keys:
        values = list(dict.fromkeys(f.get(key, "(not set)") for f in flat))
        if len(values) > 1:
            lines.append(f"{key}: {', '.join(v if len(v) <= 60 else v[:57] + '...' for v in values)}")
    return lines


def check_sweep_settings(points: List[ComposedPoint]) -> None:
    differing = sweep_settings_that_differ(points)
    if differing:
        evaluation = any(line.startswith("eval.") for line in differing)
        print("error: a sweep has one launcher, MLflow tracking, name, paths, plugins, report and evaluation for all "
              "of its points; these differ between its points (make a sweep for each value"
              + ("; points that differ only in eval.* would train the same model once each: to evaluate a sweep's "
                 "models on more benchmarks, clustermask-resubmit SWEEP_DIR --evaluate-again eval=..."
                 if evaluation else "")
              + "), nothing was submitted:\n" + "\n".join(f"  {line}" for line in differing), file=sys.stderr)
        raise SystemExit(2)


def sweep_plugins(points: List[ComposedPoint]) -> List[str]:
    """The sweep's plugins: every point's, once `check_sweep_settings` passed."""
    composed = [p.config for p in points if p.config]
    return list(composed[0].get("plugins", [])) if composed else []


def same_overrides(points: List[ComposedPoint]) -> Optional[Tuple[int, int]]:
    """The first two points with the same overrides, if any."""
    seen: Dict[Tuple[str, ...], int] = {}
    for index, point in enumerate(points):
        key = tuple(point.overrides)
        if key in seen:
            return seen[key], index
        seen[key] = index
    return None


def warmup_notes(points: List[ComposedPoint]) -> List[str]:
    """A line for each (steps, warmup, lr) of the points whose warmup is longer than the training: the learning rate
    then rises for the whole run and never reaches train.lr (a quick `train.steps=10` under the default warmup of 20
    trains at half the rate at most: open_clip's warmup is lr x (step + 1) / warmup). Not refused: it may be meant."""
    settings = dict.fromkeys((p.config["train"]["steps"], p.config["train"]["warmup_steps"], p.config["train"]["lr"])
                             for p in points)
    return [f"train.warmup_steps={warmup} is more than train.steps={steps}: the learning rate rises for the whole "
            f"run and reaches {lr * steps / warmup:.3g} at most, not train.lr={lr:g}"
            for steps, warmup, lr in settings if warmup > steps]


def merge_same_runs(points: List[ComposedPoint], strategies: Mapping[str, List[str]]
                    ) -> Tuple[List[ComposedPoint], List[str]]:
    """Each distinct run once, and a line for each thing changed.

    A point's masking settings that its strategy does not use are set to a fixed value
    (`config.canonical_masking`: `masking=none masking.ratio=0.3` drops nothing and is recorded at ratio 0) and
    their overrides leave its name; points that are then the same config are one run, under the first one's name.
    A grid of strategies x thresholds or ratios would otherwise train the same random or `none` model again for
    each value, and plot the copies as different settings."""
    from clustermask.config import settings_in_effect

    varying = graph.varying_keys([p.overrides for p in points])

    def named(overrides: List[str]) -> str:  # by what varies between the points, as run directories are
        return " ".join(o for o in overrides if graph.override_key(o) in varying) or "defaults"

    unused_notes, merge_notes, runs = {}, [], {}
    for point in points:
        masking, unused = canonical_point_masking(point.config["masking"], strategies)
        for key, value in unused.items():
            unused_notes[unused_setting_note(masking, key, value)] = None
        config = {**point.config, "masking": dataclasses.asdict(masking)}
        in_effect = settings_in_effect(masking, strategies[masking.strategy])
        overrides = [o for o in point.overrides if not sets_an_unused_setting(o, in_effect)]
        identity = json.dumps(config, sort_keys=True)
        if identity in runs:
            merge_notes.append(f"{named(point.overrides)} is the same run as {named(runs[identity].overrides)}: "
                               "submitted once")
        else:
            runs[identity] = ComposedPoint(overrides, config)
    return list(runs.values()), list(unused_notes) + merge_notes


def _check_writable(sweep_dir: Path) -> None:
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe = sweep_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"error: output directory {sweep_dir} is not writable: {exc}") from exc


def first_missing(folder: Path) -> Optional[Path]:
    """The first of `folder` and its parents, from the root down, that does not exist yet."""
    try:
        return next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    except OSError:  # a parent we may not look into: _check_writable names it
        return None


def create_sweep(sweep_dir: Path, points: List[ComposedPoint], tracker: TrackingInChild,
                 config_folders: Sequence[str] = ()) -> graph.Manifest:
    from clustermask.config import TrackingConfig
    from clustermask.tracking import PointRun, artifact_location, flatten, resolve_uri

    first = points[0].config
    sweep_id = graph.new_sweep_id(first["sweep_name"])
    tracking = TrackingConfig(**first["tracking"])
    uri = resolve_uri(tracking, sweep_dir)
    run_dirs = graph.run_dirs(sweep_dir, [p.overrides for p in points])
    runs = [PointRun(run_dir.name, " ".join(p.overrides),
                     flatten({k: v for k, v in p.config.items() if k not in ("launcher", "paths")}))
            for p, run_dir in zip(points, run_dirs)]
    parent, run_ids = tracker.create_sweep_runs(first["tracking"], uri, sweep_id, {
        "points": str(len(points)), "sweep_dir": str(sweep_dir)}, runs, artifact_location(tracking, sweep_dir))
    manifest_points = []
    for index, (point, run_dir, run_id) in enumerate(zip(points, run_dirs, run_ids)):
        graph.save_point_config(run_dir, point.config)
        manifest_points.append(graph.Point(index, run_dir.name, point.overrides, str(run_dir), run_id))
    manifest = graph.Manifest(sweep_id=sweep_id, sweep_dir=str(sweep_dir), created=graph.dt.datetime.now().isoformat(
        timespec="seconds"), executor=first["launcher"]["executor"], tracking_uri=uri,
        experiment=tracking.experiment, parent_run_id=parent, points=manifest_points,
        config_folders=list(config_folders))
    manifest.save()
    return manifest


def take_tracking_uri_from_environment(points: List[ComposedPoint]) -> str:
    """MLflow's own convention, which a lab with a tracking server sets once in a shell profile: where no tracking
    URI is given, MLFLOW_TRACKING_URI names the store. Written into the points' `tracking.uri`, so that the jobs and
    a resubmission use it as if given. '' where tracking.uri is given or the variable is not set."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    composed = [point.config for point in points if point.config is not None]
    if not uri or not composed or composed[0]["tracking"]["uri"]:  # tracking.* is one per sweep
        return ""
    for config in composed:
        config["tracking"]["uri"] = uri
    return uri


def submit_sweep(sweep_dir: Path, points: List[ComposedPoint], registries: Registries,
                 tracker: TrackingInChild, config_folders: Sequence[str] = ()) -> None:
    """Preflight every point, then write the sweep and hand its graph to the executor."""
    from_environment = take_tracking_uri_from_environment(points)
    if from_environment:
        print(f"note: tracking.uri is not given, so MLflow's MLFLOW_TRACKING_URI names the store: {from_environment} "
              "(unset it for the sweep's own sqlite store, or give tracking.uri)", flush=True)
    errors = check_points(points, registries)
    if errors:
        print("error: preflight failed, nothing was submitted:\n" + "\n".join(errors), file=sys.stderr)
        raise SystemExit(2)
    points, notes = merge_same_runs(points, registries.strategies)
    if notes:
        print("note: settings a point's strategy does not use are recorded at a fixed value, and points that "
              "differ only in them are one run:\n" + "\n".join(f"  {note}" for note in notes), flush=True)
    for note in warmup_notes(points):
        print(f"note: {note}", flush=True)
    same = same_overrides(points)
    if same:
        raise SystemExit(f"error: points {same[0]} and {same[1]} have the same overrides "
                         f"({' '.join(points[same[0]].overrides) or 'none'}) but other configs: they differ in a "
                         f"setting that does not name a point ({', '.join(graph.NOT_POINT_KEYS)}); nothing was "
                         "submitted")
    launcher = OmegaConf.create(points[0].config["launcher"])
    if launcher.dry_run:
        return dry_run(sweep_dir, points, launcher)
    if (sweep_dir / "manifest.json").exists():
        raise SystemExit(f"error: {sweep_dir} already holds a sweep (manifest.json); use `clustermask-resubmit "
                         f"{sweep_dir}` to finish it, or choose another sweep_name=")
    from clustermask.tracking import server_missing

    uri = points[0].config["tracking"]["uri"] or ""
    missing = server_missing(uri)
    instead = "unset MLFLOW_TRACKING_URI" if from_environment else "leave tracking.uri empty"
    refused = [f"tracking.uri={uri!r}: no MLflow server answers there ({missing}); start it, or {instead} for the "
               "sweep's own sqlite store"] if missing else []
    if launcher.executor == "slurm":
        refused += SlurmExecutor(launcher, sweep_dir, "preflight").refusals(Plan(train=list(range(len(points)))))
    if refused:
        print("error: preflight failed, nothing was submitted:\n" + "\n".join(f"  {r}" for r in refused),
              file=sys.stderr)
        raise SystemExit(2)
    made = first_missing(sweep_dir)
    _check_writable(sweep_dir)
    try:
        # held before the manifest is written: a resubmission must not find the points unsubmitted meanwhile, nor a
        # second sweep command with the same sweep_name write its own sweep over this one
        with graph.submitting(sweep_dir):
            manifest = create_sweep_once(sweep_dir, points, tracker, config_folders, made)
            record = submit_new_sweep(manifest, launcher)
    except graph.SweepBusy as exc:
        raise SystemExit(f"error: {exc}") from None
    print_submission(manifest, record)
    if launcher.executor == "local":
        exit_on_failure(manifest)


def create_sweep_once(sweep_dir: Path, points: List[ComposedPoint], tracker: TrackingInChild,
                      config_folders: Sequence[str], made: Optional[Path]) -> graph.Manifest:
    """`create_sweep`, unless another sweep command got there first; if it fails (MLflow refused the runs, a
    Ctrl-C), `made` (the folders made for it) is removed: nothing is left that looks like a sweep."""
    if (sweep_dir / "manifest.json").exists():
        raise SystemExit(f"error: {sweep_dir} already holds a sweep (manifest.json); choose another sweep_name=")
    try:
        return create_sweep(sweep_dir, points, tracker, config_folders)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def submit_new_sweep(manifest: graph.Manifest, launcher: DictConfig) -> dict:
    sweep_dir = Path(manifest.sweep_dir)
    executor = make_executor(launcher, sweep_dir, manifest.sweep_id)
    print(f"sweep {manifest.sweep_id}: {len(manifest.points)} point(s) in {sweep_dir}", flush=True)
    try:
        return executor.submit(manifest, Plan(train=list(range(len(manifest.points)))))
    except SubmissionError as exc:
        if exc.interrupted:
            hint = f"submit it with `clustermask-resubmit {sweep_dir}`"
        else:
            hint = (f"fix the cause and submit it with `clustermask-resubmit {sweep_dir} [key=value fixes, e.g. "
                    "launcher.train.partition=NAME]`")
        print(f"error: {exc}\nThe sweep is written in {sweep_dir} and none of it runs: {hint}", file=sys.stderr)
        raise SystemExit(130 if exc.interrupted else 1) from None


def exit_on_failure(manifest: graph.Manifest) -> None:
    from .status import format_status, report_status, sweep_status

    rows, report = sweep_status(manifest), report_status(manifest)
    if any(row[stage] != "done" for row in rows for stage in graph.STAGES) or report["report"] != "done":
        print(format_status(manifest, rows, report), file=sys.stderr)
        raise SystemExit(1)


def dry_run(sweep_dir: Path, points: List[ComposedPoint], launcher: DictConfig) -> None:
    overrides = [p.overrides for p in points]
    manifest_points = [graph.Point(i, run_dir.name, o, str(run_dir))
                       for i, (o, run_dir) in enumerate(zip(overrides, graph.run_dirs(sweep_dir, overrides)))]
    manifest = graph.Manifest("DRY-RUN", str(sweep_dir), "", launcher.executor, "", "", "", manifest_points)
    plan = Plan(train=list(range(len(manifest_points))))
    plugin_files = [Path(entry) for entry in sweep_plugins(points) if is_file(entry)]
    code = snapshot.code_folder(sweep_dir, write=False, plugin_files=plugin_files)
    print(f"dry run: {len(manifest_points)} point(s), nothing submitted or written (a submission copies the code its "
          f"jobs run to {code})\n")
    if launcher.executor == "slurm":
        executor = make_executor(launcher, sweep_dir, "DRY-RUN")
        executor.plugin_files = plugin_files
        executor.submit(manifest, plan)
    print("dependency graph:\n" + describe(plan, manifest))


def print_submission(manifest: "graph.Manifest", record: dict) -> None:
    ids = {stage: [g["job_id"] for g in record.get(stage, [])] for stage in ("train", "eval")}
    print(f"train job(s): {' '.join(ids['train']) or '-'}   eval job(s): {' '.join(ids['eval']) or '-'}   "
          f"report job: {record.get('report', {}).get('job_id', '-')}")
    print(f"manifest: {manifest.path}")
    print(f"status:   clustermask-status {manifest.sweep_dir}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=CONFIG_NAME)
def _hydra_cli(cfg: DictConfig) -> None:
    """Only reached for Hydra's own flags (--cfg, --help, --info, ...), which print and never run the task."""


# a key that a config group's YAML sets and its typed node lacks: Hydra's message, with OmegaConf's in its text
YAML_KEY_ERROR = re.compile(r"^(In '[^']+': )\w+ raised while composing config:\n(Key '\S+' not in '\S+')\n"
                            r"\s*full_key: (\S+)")


def hydra_error(exc: HydraException) -> str:
    """Hydra's error on one line, with the first line of its cause: `Error merging override masking.ratio=abc` says
    which override, its OmegaConf cause why (`Value 'abc' of type 'str' could not be converted to Float`). A key
    that a group's YAML sets and the schema lacks comes with the keys like it, as an override's does."""
    in_yaml = YAML_KEY_ERROR.match(str(exc))
    if in_yaml:
        return in_yaml.group(1) + in_yaml.group(2) + did_you_mean(in_yaml.group(3))
    message = " ".join(str(exc).split())
    cause = config_error(exc.__cause__, say_plus=False) if exc.__cause__ else ""
    return without_append_advice(f"{message}: {cause}" if cause and cause not in message else message)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag) for flag in HYDRA_ONLY_FLAGS):
        shown = [f"--{flag}" for flag in ("cfg", "info", "shell_completion") if getattr(args, flag)]
        if args.multirun and shown:  # Hydra's own answer is a traceback
            raise SystemExit(f"error: {shown[0]} shows one point, without -m (launcher.dry_run=true lists a sweep's "
                             "points, and the sweep writes each one's config to <run_dir>/config.yaml)")
        sys.argv = [sys.argv[0], *argv]
        return _hydra_cli()
    for flag in ("config_path", "config_name", "config_dir"):
        if getattr(args, flag):
            raise SystemExit(f"error: --{flag.replace('_', '-')} is not supported here: add your config folder "
                             "with hydra.searchpath=[file:///path/to/configs] and pick experiment=NAME")
    try:
        compose_check_and_submit(args)
    except KeyboardInterrupt:  # the executors handle their own: this is one before the sweep was submitted
        print("interrupted: nothing was submitted", file=sys.stderr)
        raise SystemExit(130) from None


def compose_check_and_submit(args) -> None:
    with RegistriesInChild() as registries, TrackingInChild() as tracker:
        try:
            sweep = compose_sweep(args.overrides, multirun=args.multirun)
        except HydraException as exc:
            raise SystemExit(f"error: {hydra_error(exc)}") from None
        check_sweep_settings(sweep.points)
        for point in sweep.points:
            if point.config is not None:
                graph.pin_relative_paths(point.config, Path.cwd())
        try:
            found = registries.result(sweep_plugins(sweep.points))
        except PluginError as exc:
            print(f"error: preflight failed, nothing was submitted:\n  {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        for strategy, error in found.unchecked.items():
            print(f"note: masking.strategy={strategy!r} failed on a small CPU batch ({error[:300]}), so whether its "
                  "masks depend only on the settings it declares was not checked", flush=True)
        submit_sweep(sweep.sweep_dir, sweep.points, found, tracker, sweep.config_folders)


if __name__ == "__main__":
    main()
