"""Configs compose, preflight names bad values, dry runs print the graph, hostile values stay inert."""
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException, HydraException

from clustermask.config import DataConfig, MaskingConfig, ModelConfig, TrainConfig, validate_model_for_masking
from launch import app, graph
from launch.expand import ComposedPoint, compose_sweep
from launch.executors import Plan, SlurmExecutor, executor_parameters, picks_its_gpu, visible_gpus
from launch.status import plan_resubmission

from conftest import REPO, free_port, interrupt_when, one_eval_task

CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
EXPECTED = Path(__file__).parent / "expected"


def compose_cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    assert OmegaConf.is_struct(cfg)
    typed = OmegaConf.to_object(cfg.masking)
    assert typed.strategy in ("none", "random", "cluster", "kmeans")


@pytest.mark.parametrize("group", ["model", "masking", "data", "train", "eval", "tracking", "launcher"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        cfg = compose_cfg(f"{group}={option}")
        assert cfg[group] is not None


def test_struct_mode_catches_typos_and_types():
    with pytest.raises(ConfigCompositionException, match="ratoi"):
        compose_cfg("masking.ratoi=0.3")
    with pytest.raises(ConfigCompositionException, match="steps"):
        compose_cfg("train.steps=many")


def _as_hydra_composes(points, common):
    """point.overrides holds the point's own overrides; the rest of the command line comes from `common`."""
    rest = [o for o in common if not graph.is_point_override(o)]
    for point in points:
        expected = OmegaConf.to_container(compose_cfg(*rest, *point.overrides), resolve=True)
        assert point.config == expected, point.overrides


def test_sweep_points_compose_exactly_as_hydra_composes_them(tmp_path):
    common = [f"paths.root={tmp_path}", "launcher=slurm", "+launcher.train.additional_parameters.note=extra"]
    deleted = "~eval.tasks.1.options.lr"  # the linear probe's learning rate: clustermask's default then
    sweep = compose_sweep([*common, "masking=random,cluster,kmeans", "masking.ratio=0.3,0.5", deleted,
                           "model=tiny,vit_b16", "train.seed=range(0,2)"])
    assert len(sweep.points) == 3 * 2 * 2 * 2 and not any(p.error for p in sweep.points)
    assert sweep.sweep_dir == tmp_path / "sweeps" / "default"
    assert len({tuple(p.overrides) for p in sweep.points}) == 24
    _as_hydra_composes(sweep.points, [*common, deleted])
    assert {p.config["masking"]["strategy"] for p in sweep.points} == {"random", "cluster", "kmeans"}
    assert all(p.config["launcher"]["train"]["additional_parameters"] == {"note": "extra"} for p in sweep.points)
    assert all(p.config["eval"]["tasks"][1]["options"] == {"epochs": 10} for p in sweep.points)


def test_points_that_differ_only_in_settings_their_strategy_does_not_use_are_one_run(tmp_path):
    """A grid of strategies x ratios x thresholds trains `none` once (it drops nothing: ratio 0) and `random`
    once per ratio (it has no threshold); each kept point is what Hydra composes for its remaining overrides."""
    from launch.helpers import Registries

    common = [f"paths.root={tmp_path}"]
    sweep = compose_sweep([*common, "masking=none,random,cluster", "masking.ratio=0.3,0.5",
                           "masking.threshold=0.3,0.7"])
    points, notes = app.merge_same_runs(sweep.points, Registries.here().strategies)
    runs = {(p.config["masking"]["strategy"], p.config["masking"]["ratio"], p.config["masking"]["threshold"]):
            p.overrides for p in points}
    assert len(points) == len(runs) == 1 + 2 + 4
    assert runs[("none", 0.0, 0.5)] == ["masking=none"]
    assert runs[("random", 0.3, 0.5)] == ["masking.ratio=0.3", "masking=random"]
    assert runs[("cluster", 0.5, 0.7)] == ["masking.ratio=0.5", "masking.threshold=0.7", "masking=cluster"]
    _as_hydra_composes(points, common)
    assert "masking.ratio=0.5 is not used by masking.strategy=none: recorded as 0.0" in notes
    assert "masking.threshold=0.7 is not used by masking.strategy=random: recorded as 0.5" in notes
    assert ("masking.ratio=0.5 masking.threshold=0.7 masking=random is the same run as masking.ratio=0.5 "
            "masking=random: submitted once") in notes
    assert sum("is the same run as" in note for note in notes) == 12 - 7
    calibrated = compose_sweep([*common, "masking=cluster", "masking.target_coverage=0.3", "masking.threshold=0.3,0.7"])
    points, notes = app.merge_same_runs(calibrated.points, Registries.here().strategies)
    assert [p.overrides for p in points] == [["masking.target_coverage=0.3", "masking=cluster"]]
    kmeans = compose_sweep([*common, "masking=kmeans", "masking.kmeans_k=4,8", "masking.attention=true"])
    assert len(app.merge_same_runs(kmeans.points, Registries.here().strategies)[0]) == 2


def test_sweeper_params_of_the_experiment_expand_and_the_command_line_wins(tmp_path):
    sweep = compose_sweep([f"paths.root={tmp_path}", "experiment=ratio_ablation"])
    assert len(sweep.points) == 4 * 3  # hydra.sweeper.params: 4 strategies x 3 ratios
    assert sweep.sweep_dir == tmp_path / "sweeps" / "ratio_ablation"
    _as_hydra_composes(sweep.points, [f"paths.root={tmp_path}", "experiment=ratio_ablation"])
    narrowed = compose_sweep([f"paths.root={tmp_path}", "experiment=ratio_ablation", "masking.ratio=0.1,0.2"])
    assert sorted({p.config["masking"]["ratio"] for p in narrowed.points}) == [0.1, 0.2]
    assert len(narrowed.points) == 4 * 2
    # the experiments say hydra.mode=MULTIRUN, which Hydra holds without -m: forgetting it submitted one point, of the
    # defaults (random, 0.5), named point-da39a3ee
    without_m = compose_sweep([f"paths.root={tmp_path}", "experiment=ratio_ablation"], multirun=False)
    assert [p.overrides for p in without_m.points] == [p.overrides for p in sweep.points]
    single = compose_sweep([f"paths.root={tmp_path}", "experiment=ratio_ablation", "hydra.mode=RUN"], multirun=False)
    assert len(single.points) == 1  # in run mode Hydra ignores the sweeper params


def test_a_float_range_sweeps_the_decimals_it_names(tmp_path):
    """Hydra adds a float range's step up: `range(0.1,0.6,0.1)` swept 0.30000000000000004, in the point's name, run
    directory and params; merged with another sweep's 0.3, the report made two rows of one ratio."""
    ranged = compose_sweep([f"paths.root={tmp_path}", "masking.ratio=range(0.1,0.6,0.1)", "train.seed=range(2)"])
    listed = compose_sweep([f"paths.root={tmp_path}", "masking.ratio=0.1,0.2,0.3,0.4,0.5", "train.seed=0,1"])
    assert [p.overrides for p in ranged.points] == [p.overrides for p in listed.points]
    assert [p.config["masking"]["ratio"] for p in ranged.points] == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5]
    assert [p.config["train"]["seed"] for p in ranged.points][:2] == [0, 1]


def test_a_researchers_own_experiment_folder_joins_through_hydra_searchpath(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nsweep_name: mine\nhydra:\n  sweeper:\n    params:\n      masking.ratio: 0.1,0.2\n")
    sweep = compose_sweep([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=mine",
                           f"paths.root={tmp_path}", "masking=cluster"])
    assert sweep.sweep_dir == tmp_path / "sweeps" / "mine"
    assert [p.config["masking"]["ratio"] for p in sweep.points] == [0.1, 0.2]
    assert all(p.config["masking"]["strategy"] == "cluster" for p in sweep.points)


def test_the_sweeps_config_folders_are_its_searchpath_folders_for_a_resubmission(tmp_path, monkeypatch):
    """`file://` (relative to where the command runs) and `pkg://` entries alike: a resubmission looks there for a
    config-group option (`--evaluate-again eval=mine`)."""
    from launch import status

    for folder in (tmp_path / "conf" / "eval", tmp_path / "lab_conf" / "eval"):
        folder.mkdir(parents=True)
        (folder / f"{folder.parent.name}.yaml").write_text("batch_size: 3\n")
    (tmp_path / "lab_conf" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sweep = compose_sweep(["hydra.searchpath=[file://conf,pkg://lab_conf]", f"paths.root={tmp_path}"])
    assert sweep.config_folders == [str(tmp_path / "conf"), str(tmp_path / "lab_conf")]
    for name in ("conf", "lab_conf"):
        assert status.group_option("eval", name, sweep.config_folders).batch_size == 3
    with pytest.raises(ValueError, match=r"eval='nope': no nope.yaml in .*; the options are .*benchmarks, conf, "):
        status.group_option("eval", "nope", sweep.config_folders)


def test_a_point_that_does_not_compose_carries_its_error(tmp_path):
    sweep = compose_sweep([f"paths.root={tmp_path}", "masking=random,blocks"])
    assert sweep.points[0].config is not None and not sweep.points[0].error
    assert sweep.points[1].config is None and "masking/blocks" in sweep.points[1].error
    with pytest.raises(HydraException, match="experiment/nope"):
        compose_sweep(["experiment=nope"])
    with pytest.raises(HydraException, match="only Hydra's basic sweeper"):
        compose_sweep(["hydra.sweeper._target_=my.OptunaSweeper", "masking.ratio=0.3,0.5"])
    with pytest.raises(HydraException, match="INTERVAL"):
        compose_sweep(["train.lr=interval(0.1,0.2)"])
    # Hydra sets hydra.job.env_set in the job it runs, not in ours: the jobs ran without the variables
    with pytest.raises(HydraException, match=r"hydra.job.env_set \(NCCL_DEBUG\) would not reach the jobs.*"
                                             r"'launcher.train.setup=\[\"export NCCL_DEBUG=VALUE\"\]'$"):
        compose_sweep(["+hydra.job.env_set.NCCL_DEBUG=INFO", "masking.ratio=0.3,0.5"])
    # Hydra's submitit plugin was ignored: the sweep trained where it was launched
    for launcher in ("submitit_slurm", "submitit_local"):
        for multirun in (True, False):
            with pytest.raises(HydraException, match=r"hydra/launcher \(hydra_plugins.hydra_submitit_launcher.*"
                                                     r"Launcher\): clustermask submits a sweep itself.*; use "
                                                     "launcher=slurm, whose launcher.train.*"):
                compose_sweep([f"hydra/launcher={launcher}", f"masking.ratio={'0.3,0.5' if multirun else 0.3}"],
                              multirun=multirun)


# eval/benchmarks.yaml's roots, played by the synthetic sets of the same kind
STAND_INS = {"wds_imagenet1k": "shapes", "wds_cifar10": "shapes", "wds_cifar100": "shapes",
             "wds_mscoco_captions": "scenes", "wds_flickr8k": "scenes", "wds_flickr30k": "scenes",
             "sugar_crepe": "sugar_crepe"}


def benchmark_stand_ins(folder: Path, synthetic_root: Path) -> Path:
    folder.mkdir()
    for name, synthetic in STAND_INS.items():
        (folder / name).symlink_to(synthetic_root / "eval" / synthetic)
    return folder


def test_the_paper_experiment_needs_real_data_and_checks_every_benchmark_root(tmp_path, synthetic_root):
    """experiment=paper_vit_b16 has no data of its own: the shards and the evaluation root must be given
    (data/shards.yaml's `???`, which merged onto a default would have silently kept the synthetic data), and
    every benchmark root of eval/benchmarks.yaml is checked, here against synthetic stand-ins."""
    from launch.helpers import Registries

    sweep = ["experiment=paper_vit_b16", f"paths.root={tmp_path}"]
    errors = [p.error for p in compose_sweep(sweep).points]
    assert errors == ["data.train_shards=??? must be given, e.g. on the command line"] * 4
    errors = [p.error for p in compose_sweep([*sweep, f"data.train_shards={synthetic_root / 'train'}"]).points]
    assert errors == ["data.eval_root=??? must be given, e.g. on the command line"] * 4
    benchmarks = benchmark_stand_ins(tmp_path / "clip_benchmark", synthetic_root)
    points = compose_sweep([*sweep, f"data.train_shards={synthetic_root / 'train'}",
                            f"data.eval_root={benchmarks}"]).points
    registries = Registries.here()
    assert len(points) == 4 and not app.check_points(points, registries)
    tasks = points[0].config["eval"]["tasks"]
    assert {t["root"] for t in tasks} == {str(benchmarks / name) for name in STAND_INS}
    assert len(tasks) == 3 + 2 + 3 + 7 and points[0].config["data"]["workers"] == 8
    (benchmarks / "wds_flickr30k").unlink()
    (benchmarks / "wds_flickr30k").symlink_to(synthetic_root / "eval" / "shapes")
    errors = app.check_points(points, registries)  # the same error at every point: named once
    assert len(errors) == 1 and errors[0].startswith("  every point (4): eval.tasks[7].root=")
    assert "needs a retrieval dataset" in errors[0]


def test_the_points_of_a_sweep_look_up_the_shards_they_share_once(synthetic_root, tmp_path, monkeypatch):
    """Shards found for one point are not looked up again for the next; shards not found are, so that every
    point using them is named."""
    from clustermask import data
    from launch.helpers import Registries

    looked_up = []
    real = data.shard_urls
    monkeypatch.setattr(data, "shard_urls", lambda spec: looked_up.append(spec) or real(spec))
    found, missing = str(synthetic_root / "train"), str(tmp_path / "nowhere")
    points = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking.ratio=0.3,0.5",
                            f"data.train_shards={found},{missing}"], multirun=True).points
    errors = app.check_points(points, Registries.here())
    assert sorted(looked_up) == sorted([found, missing, missing])
    assert errors == [f"  points 1, 3: data.train_shards={missing!r}: no such folder or shard"]


def test_missing_synthetic_data_says_how_to_make_it(synthetic_root, tmp_path):
    """Where `data=synthetic` reads its shards and finds none, the error gives the command that writes them;
    shards missing elsewhere get no such hint."""
    nowhere = tmp_path / "no_data"
    hint = f"make it with: clustermask-data --out {nowhere}"
    expected = f"{re.escape(str(nowhere))}/train': no such folder or shard .*{re.escape(hint)}"
    with pytest.raises(FileNotFoundError, match=expected):
        app.preflight(compose_cfg(f"paths.data={nowhere}"))
    with pytest.raises(FileNotFoundError, match="no such folder or shard$"):
        app.preflight(compose_cfg(f"paths.data={synthetic_root}", f"data.train_shards={nowhere}"))
    subprocess.run([sys.executable, "-m", "clustermask.synthetic", "--out", str(nowhere), "--train-samples", "64",
                    "--train-shards", "2"], check=True, capture_output=True, timeout=300)
    with pytest.raises(FileNotFoundError) as raised:
        app.preflight(compose_cfg(f"paths.data={nowhere}", f"eval.tasks.0.root={nowhere}/no_eval"))
    assert str(raised.value).startswith("eval.tasks[0]")  # the hint's command made the shards


def test_preflight_names_each_failing_point_and_an_error_they_share_once(synthetic_root, tmp_path):
    from launch.helpers import Registries

    shapes = synthetic_root / "eval" / "shapes"
    points = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking.ratio=0.3,1.5,2.0",
                            f"eval.tasks.0.root={tmp_path}/no_shapes", f"eval.tasks.1.root={tmp_path}/no_probe",
                            f"eval.tasks.2.root={shapes}"], multirun=True).points
    errors = app.check_points(points, Registries.here())
    named = [f"  point {i} ({' '.join(point.overrides)})" for i, point in enumerate(points)]
    assert errors[1:] == [f"{named[1]}: masking.ratio=1.5 must be in [0, 1)",
                          f"{named[2]}: masking.ratio=2.0 must be in [0, 1)"]
    first, *more = errors[0].split("\n")  # the three unready datasets of every point, each on a line of its own
    assert first == f"  every point (3): eval.tasks[0].root='{tmp_path}/no_shapes' (wds/shapes) does not exist"
    assert more[0] == f"    eval.tasks[1].root='{tmp_path}/no_probe' (wds/shapes) does not exist"
    assert more[1].startswith("    eval.tasks[2].root=") and "needs a retrieval dataset" in more[1] and len(more) == 2


def test_composing_and_checking_a_sweep_imports_no_model_code(synthetic_root, tmp_path):
    """The launcher composes and checks without torch: the registries' names come from a child process."""
    script = (f"import sys; from launch import app; "
              f"s = app.compose_sweep(['paths.root={tmp_path}', 'paths.data={synthetic_root}', "
              f"'masking=random,cluster', 'masking.ratio=0.3,0.5']); "
              f"registries = app.RegistriesInChild().result(); "
              f"assert 'cluster' in registries.strategies and 'linear_probe' in registries.evaluators; "
              f"assert not app.check_points(s.points, registries), app.check_points(s.points, registries); "
              f"print(sorted(m for m in ('torch', 'open_clip', 'webdataset', 'mlflow', 'clip_benchmark') "
              f"if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_model_names_read_from_files_match_open_clip_registry():
    from clustermask.config import model_names
    from clustermask.model import register_model_configs
    import open_clip

    register_model_configs()
    assert model_names() == sorted(open_clip.list_models())


def test_point_config_round_trips_through_its_yaml(tmp_path):
    cfg = compose_sweep([f"paths.root={tmp_path}", f"sweep_name={json.dumps(HOSTILE)}",
                         "masking.threshold=-0.25", "train.lr=1e-5"]).points[0].config
    graph.save_point_config(tmp_path / "run", cfg)
    loaded = graph.load_point_config(tmp_path / "run")
    assert OmegaConf.to_container(loaded, resolve=True) == cfg
    assert "$(touch PWNED2)" in loaded.sweep_name and '"quoted";' in loaded.sweep_name
    assert loaded.train.lr == 1e-5 and loaded.masking.threshold == -0.25


def test_preflight_names_the_bad_key(synthetic_root):
    good = [f"paths.data={synthetic_root}"]
    app.preflight(compose_cfg(*good))
    cases = {"masking.strategy=blocks": "masking.strategy='blocks'",
             "model.name=ViT-Nope": "model.name='ViT-Nope'",
             # a ViT image tower, but the training loop's ClipLoss is not its objective (the job failed at step 0)
             "model.name=coca_ViT-B-32": r"model.name='coca_ViT-B-32' is a CoCa model \(a captioning decoder",
             "model.name=ViT-B-16-SigLIP": r"model.name='ViT-B-16-SigLIP' is a SigLIP-style model \(a learnt logit",
             f"data.train_shards={synthetic_root}/missing": "data.train_shards",
             "eval.tasks.0.root=/nonexistent/shapes": r"eval.tasks\[0\].root='/nonexistent/shapes'",
             # the root exists, but the evaluation job would fail on it after the training
             f"eval.tasks.2.root={synthetic_root}/eval/shapes": r"eval.tasks\[2\].*needs a retrieval dataset",
             f"eval.tasks.3.root={synthetic_root}/eval/shapes": r"eval.tasks\[3\].*lacks val2017/, add_att.json",
             "launcher.train.gpus_per_node=4": "tasks_per_node=1 must equal gpus_per_node=4",
             # each of these would pass submission and fail the job (a division by zero at the first log or
             # checkpoint, a DataLoader refusing its batch size, torch refusing the device name)
             "train.log_every=0": "train.log_every=0 must be at least 1",
             "train.checkpoint_every=0": "train.checkpoint_every=0",
             "train.warmup_steps=-5": "train.warmup_steps=-5",
             "train.lr=nan": "train.lr=nan must be positive and finite",
             "train.weight_decay=nan": "train.weight_decay=nan must be at least 0",
             "train.device=gpu": "train.device='gpu'",
             "masking.calibration_batches=0": "masking.calibration_batches=0",
             # calibration would end at threshold 1 and the run cover 3% rather than 2%, silently
             "masking.target_coverage=0.02": "masking.target_coverage=0.02 must be above masking.anchor_fraction=0.03",
             "data.workers=-1": "data.workers=-1",
             "eval.batch_size=0": "eval.batch_size=0",
             "eval.device=cuda0": "eval.device='cuda0'",
             "launcher.max_parallel=0": "launcher.max_parallel=0",
             # `+` adds a key past struct mode (Hydra's own error suggests it): recorded, then ignored or a TypeError
             "+masking.k=4": r"masking.k is not a setting of MaskingConfig \(did you mean masking.kmeans_k\?\)",
             "+trian.steps=4": r"trian is not a setting of Config \(did you mean train\?\)",
             "+launcher.report.priority=9": r"launcher.report.priority is not a setting of StageResources \(another "
                                            r"sbatch option goes in \+launcher.report.additional_parameters.priority="
                                            r"...\)",
             "+report.note=x": r"^report.note is not a setting of ReportConfig$",
             # an option the evaluator does not read: the probe ran at its default rate, recorded as run at 0.01
             "+eval.tasks.1.options.lrr=0.01": r"^eval.tasks\[1\].options.lrr: linear_probe reads no such option "
                                              r"\(did you mean lr\?\); it reads lr, epochs$",
             "+eval.tasks.0.options.lr=0.01": r"options.lr: zeroshot_classification reads no such option; it reads "
                                             "none",
             # values the evaluation job would have failed on, after the training
             "eval.tasks.1.options.epochs=0": r"^eval.tasks\[1\].options.epochs=0 \(linear_probe\) must be a whole "
                                              "number of at least 1$",
             "eval.tasks.1.options.lr=-1": r"options.lr=-1 \(linear_probe\) must be a positive, finite number",
             "eval.tasks.2.options.recall_k=[1,0]": r"options.recall_k=\[1, 0\] \(zeroshot_retrieval\) must be a list"}
    for override, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            app.preflight(compose_cfg(*good, override))
    # the local executor's: SLURM would have run its array_parallelism (8) at once, whatever it said
    with pytest.raises(ValueError, match=r"^launcher.max_parallel=4 is the local executor's: on SLURM, launcher.<stage>"
                                         r".array_parallelism .* \(launcher.train.array_parallelism=4\)$"):
        app.preflight(compose_cfg(*good, "launcher=slurm", "launcher.dry_run=true", "launcher.max_parallel=4"))
    app.preflight(compose_cfg(*good, "launcher=slurm", "launcher.dry_run=true", "launcher.train.array_parallelism=4"))
    # a time limit at or under the requeue signal's delay (+ SLURM's minute of slack): the job was signalled as it
    # started and requeued 3 times without a step, then failed (timeout_min=1 under the default 120 s, on real SLURM)
    slurm = [*good, "launcher=slurm", "launcher.dry_run=true"]
    for override, message in {"launcher.train.timeout_min=3": r"^launcher.train.timeout_min=3 leaves the job no time "
                                                              r"before its requeue signal: .* give timeout_min=4 or "
                                                              r"more, or a smaller signal_delay_s$",
                              "launcher.eval.signal_delay_s=300": r"^launcher.eval.timeout_min=6 .* timeout_min=7 or",
                              "launcher.report.timeout_min=-1": r"^launcher.report.timeout_min=-1 must be at least 0",
                              "launcher.train.signal_delay_s=-5": r"^launcher.train.signal_delay_s=-5 must be at least"
                              }.items():
        extra = ["launcher.eval.timeout_min=6"] if "eval" in override else []
        with pytest.raises(ValueError, match=message):
            app.preflight(compose_cfg(*slurm, override, *extra))
    for fine in (["launcher.train.timeout_min=4"], ["launcher.train.timeout_min=2", "launcher.train.signal_delay_s=30"],
                 ["launcher.train.timeout_min=0"]):  # 0: no time limit (the partition's own)
        app.preflight(compose_cfg(*slurm, *fine))
    app.preflight(compose_cfg(*good, "launcher.train.timeout_min=1"))  # the local executor has no time limit
    # CLIP's loss of a batch of one is 0 whatever the weights: the run learnt nothing, without a word
    with pytest.raises(ValueError, match=r"^train.batch_size=1 on 1 rank\(s\) is a contrastive batch of one"):
        app.preflight(compose_cfg(*good, "train.batch_size=1"))
    app.preflight(compose_cfg(*good, "train.batch_size=1", "launcher=slurm", "launcher.dry_run=true",
                              "launcher.train.tasks_per_node=2"))  # two ranks: each image has the other's caption


def test_two_tasks_that_would_log_the_same_metrics_are_refused(synthetic_root):
    """A second linear probe on the shapes at another learning rate: its metrics and result JSON would have
    replaced the first's, with nothing to say so."""
    cfg = compose_cfg(f"paths.data={synthetic_root}")
    assert cfg.eval.tasks[1].name == "linear_probe"
    cfg.eval.tasks.append(cfg.eval.tasks[1])  # a copy
    cfg.eval.tasks[10].options.lr = 1.0
    assert cfg.eval.tasks[1].options.lr == 0.1
    with pytest.raises(ValueError, match=r"^eval.tasks\[1\] and eval.tasks\[10\] are both linear_probe on wds/shapes: "
                                         r"their metrics \(linear_probe/wds/shapes/\.\.\.\) and result file would be "
                                         r"one"):
        app.preflight(cfg)
    cfg.eval.tasks[10].dataset = "wds/scenes"  # another dataset: its own metrics
    cfg.eval.tasks[10].root = cfg.eval.tasks[2].root
    with pytest.raises(FileNotFoundError, match=r"needs a classification dataset"):  # and checked as usual
        app.preflight(cfg)


def test_preflight_refuses_an_image_tower_that_cannot_take_the_masking(synthetic_root):
    """Read off open_clip's config files before submission; the job would fail (a ResNet or timm tower) or hidden
    tokens would reach the output (attention mode on a tower that pools more than CLS)."""
    good = [f"paths.data={synthetic_root}"]
    attention = ["masking=cluster", "masking.attention=true"]
    cases = {("model.name=RN50",): r"model.name='RN50': its image tower is a ModifiedResNet, not an open_clip "
                                   "VisionTransformer",
             ("model.name=ViT-B-16-SigLIP",): "model.name='ViT-B-16-SigLIP': its image tower is timm's "
                                              "'vit_base_patch16_siglip_224'",
             (*attention, "model.name=coca_ViT-B-32"): r"masking.attention=true with model.name='coca_ViT-B-32'.*"
                                                       "attentional pooler",
             (*attention, "model.name=ViT-L-14-CLIPA"): r"masking.attention=true .*pool_type='avg'",
             ("masking=kmeans", "masking.ratio=0.995"): r"masking.ratio=0.995 drops all 64 patch tokens of "
                                                       r"model.name='ViT-Tiny-8-64' .* at most 0.9921 keeps one",
             ("masking=random", "masking.ratio=0.9975", "model.name=ViT-B-16"): r"all 196 patch tokens of "
                                                                               r"model.name='ViT-B-16'.*0.9974",
             ("masking=kmeans", "masking.kmeans_k=65"): r"^masking.kmeans_k=65 asks for more clusters than the 64 "
                                                        r"patch tokens of model.name='ViT-Tiny-8-64': give at most 64$"}
    for overrides, message in cases.items():
        with pytest.raises(ValueError, match=message):
            app.preflight(compose_cfg(*good, *overrides))
    app.preflight(compose_cfg(*good, *attention, "model.name=ViT-B-16"))
    app.preflight(compose_cfg(*good, "masking=random", "masking.ratio=0.9974", "model.name=ViT-B-16"))
    app.preflight(compose_cfg(*good, "masking=none", "masking.ratio=0.995"))  # none reads no ratio
    app.preflight(compose_cfg(*good, "masking=kmeans", "masking.kmeans_k=64"))  # one patch a cluster: allowed
    app.preflight(compose_cfg(*good, "masking=kmeans", "masking.kmeans_k=196", "model.name=ViT-B-16"))
    app.preflight(compose_cfg(*good, "masking=random", "masking.kmeans_k=65"))  # random reads no k
    # dropping tokens works on a tower that pools every token (CLIPA's preflight also wants its tokenizer cached)
    validate_model_for_masking(ModelConfig("ViT-L-14-CLIPA"), MaskingConfig("cluster"), ["attention"])
    # a strategy that hides nothing (random does not read `attention`)
    validate_model_for_masking(ModelConfig("coca_ViT-B-32"), MaskingConfig("random", attention=True), ["ratio"])


def cache_on_the_hub(cache: Path, repo: str, *files: str) -> None:
    """Files of `repo` in a Hugging Face cache, laid out as huggingface_hub lays them out."""
    snapshot = cache / f"models--{repo}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snapshot / name).write_text("{}")
    (cache / f"models--{repo}" / "refs").mkdir(exist_ok=True)
    (cache / f"models--{repo}" / "refs" / "main").write_text("0123abc")


def test_preflight_refuses_a_model_whose_hugging_face_parts_are_not_in_the_cache(synthetic_root, tmp_path,
                                                                                 monkeypatch):
    """open_clip would fetch them in the job (a tokenizer; a text tower and its weights): the jobs download
    nothing, so they must be in the local cache before anything is submitted."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    good = [f"paths.data={synthetic_root}"]
    for name, message in {"ViT-L-14-CLIPA": "its tokenizer 'bert-base-uncased'",
                          "xlm-roberta-base-ViT-B-32": "its tokenizer 'xlm-roberta-base', its text tower "
                                                      "'xlm-roberta-base'"}.items():
        with pytest.raises(ValueError, match=re.escape(f"model.name={name!r} needs {message} from the Hugging Face "
                                                       f"Hub, not found in the Hugging Face cache {cache}")):
            app.preflight(compose_cfg(*good, f"model.name={name}"))
    cache_on_the_hub(cache, "bert-base-uncased", "config.json")  # the tokenizer's vocabulary is still missing
    with pytest.raises(ValueError, match="needs its tokenizer 'bert-base-uncased' from"):
        app.preflight(compose_cfg(*good, "model.name=ViT-L-14-CLIPA"))
    cache_on_the_hub(cache, "bert-base-uncased", "vocab.txt")
    app.preflight(compose_cfg(*good, "model.name=ViT-L-14-CLIPA"))
    cache_on_the_hub(cache, "xlm-roberta-base", "config.json")
    cache_on_the_hub(cache, "xlm-roberta-base", "sentencepiece.bpe.model")  # the text tower's weights still missing
    with pytest.raises(ValueError, match="needs its text tower 'xlm-roberta-base' from"):
        app.preflight(compose_cfg(*good, "model.name=xlm-roberta-base-ViT-B-32"))
    cache_on_the_hub(cache, "xlm-roberta-base", "model.safetensors")
    app.preflight(compose_cfg(*good, "model.name=xlm-roberta-base-ViT-B-32"))
    app.preflight(compose_cfg(*good, "model.name=ViT-B-16"))  # open_clip's own tokenizer: nothing to fetch


@pytest.mark.parametrize("setting, offline", [(None, True), ("0", False)])
def test_jobs_run_offline_unless_told_otherwise(setting, offline):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if setting is not None:
        env["HF_HUB_OFFLINE"] = setting
    out = subprocess.run([sys.executable, "-c", "import launch.jobs, huggingface_hub.constants as c; "
                          "print(c.HF_HUB_OFFLINE)"], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert out.stdout.strip() == str(offline)


def test_preflight_names_every_section_that_fails_at_once(synthetic_root, tmp_path):
    with pytest.raises(ValueError) as raised:
        app.preflight(compose_cfg(f"paths.data={synthetic_root}", "train.lr=-1", f"data.train_shards={tmp_path}/none",
                                  "launcher.max_parallel=0"))
    lines = str(raised.value).splitlines()
    assert lines[:2] == ["train.lr=-1.0 must be positive and finite",
                         f"data.train_shards='{tmp_path}/none': no such folder or shard"]
    assert lines[2].startswith("launcher.max_parallel=0") and len(lines) == 3


def sweep_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "launch.app", "-m", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_hydra_flags_print_and_submit_nothing(tmp_path, synthetic_root):
    """`--help` says what the command does, lists the groups and gives examples; `--cfg job` prints the point's
    config. Neither writes a sweep."""
    shown = sweep_cli(f"paths.root={tmp_path}", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("clustermask-sweep: train CLIP models whose image tower drops patches")
    assert re.search(r"^masking: cluster, cluster_embedding, cluster_mixed, kmeans, none, random$",
                     shown.stdout, re.M)
    assert "clustermask-sweep -m experiment=demo" in shown.stdout
    config = subprocess.run([sys.executable, "-m", "launch.app", "--cfg", "job", f"paths.root={tmp_path}",
                             f"paths.data={synthetic_root}", "masking=kmeans", "masking.kmeans_k=5"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert config.returncode == 0, config.stderr
    printed = yaml.safe_load(config.stdout)
    assert printed["masking"]["strategy"] == "kmeans" and printed["masking"]["kmeans_k"] == 5
    for flag in (["--cfg", "job"], ["--info"]):  # with -m, Hydra answered with a traceback
        refused = sweep_cli(f"paths.root={tmp_path}", "masking=random,cluster", *flag)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr == f"error: {flag[0]} shows one point, without -m (launcher.dry_run=true lists a " \
            "sweep's points, and the sweep writes each one's config to <run_dir>/config.yaml)\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, error", [
    ("masking.ratio=abc", "Error merging override masking.ratio=abc: Value 'abc' of type 'str' could not be "
                          "converted to Float"),
    ("train.steps=1.5", "Error merging override train.steps=1.5: Value '1.5' of type 'float' could not be converted "
                        "to Integer"),
    # Hydra's advice to add the key with `+` is left out where a typed node would refuse it all the same
    ("masking.ratoi=0.3", "Could not override 'masking.ratoi': Key 'ratoi' not in 'MaskingConfig' (did you mean "
                          "masking.ratio?)"),
    ("masking.k=3", "Could not override 'masking.k': Key 'k' not in 'MaskingConfig' (did you mean masking.kmeans_k?)"),
    ("launcher.train.parition=gpu", "Could not override 'launcher.train.parition': Key 'parition' not in "
                                    "'StageResources' (did you mean launcher.train.partition?)"),
    ("report.plot_metrc=x", "Could not override 'report.plot_metrc': Key 'plot_metrc' not in 'ReportConfig' (did you "
                            "mean report.plot_metric?)"),
    ("trian.steps=3", "Could not override 'trian.steps': Key 'trian' not in 'Config' (did you mean train?)"),
    # a key of that name elsewhere
    ("masking.lr=0.1", "Could not override 'masking.lr': Key 'lr' not in 'MaskingConfig' (did you mean train.lr?)"),
    ("launcher.train.max_parallel=2", "Could not override 'launcher.train.max_parallel': Key 'max_parallel' not in "
                                      "'StageResources' (did you mean launcher.max_parallel?)"),
    ("launcher.eval.reservation=r1", "Could not override 'launcher.eval.reservation': Key 'reservation' not in "
                                     "'StageResources' (another sbatch option goes in "
                                     "+launcher.eval.additional_parameters.reservation=...)"),
    # an open mapping takes the key with `+`
    ("masking.options.width=3", "Could not override 'masking.options.width'. To append to your config use "
                                "+masking.options.width=3: Key 'width' is not in struct")])
def test_a_bad_override_is_one_line_that_says_which_and_why(override, error):
    """Hydra's own message names the override; its OmegaConf cause says what is wrong with it; a key that is not
    there comes with the keys like it."""
    with pytest.raises(HydraException) as caught:
        compose_sweep([override], multirun=False)
    assert app.hydra_error(caught.value) == error


def test_a_key_a_config_groups_yaml_sets_and_the_schema_lacks_comes_with_the_keys_like_it(tmp_path):
    """A researcher's own YAML (hydra.searchpath) with a typo: the key, the file and what it may have meant, on one
    line, as for an override; Hydra's own message was five lines of OmegaConf's internals without a suggestion."""
    (tmp_path / "masking").mkdir()
    (tmp_path / "experiment").mkdir()
    (tmp_path / "masking" / "mine.yaml").write_text("defaults: [random]\nratoi: 0.3\n")
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nlauncher:\n  train:\n    parition: gpu\n")
    for choice, error in (("masking=mine", "In 'masking/mine': Key 'ratoi' not in 'MaskingConfig' (did you mean "
                                           "masking.ratio?)"),
                          ("experiment=mine", "In 'experiment/mine': Key 'parition' not in 'StageResources' (did you "
                                              "mean launcher.train.partition?)")):
        with pytest.raises(HydraException) as caught:
            compose_sweep([f"hydra.searchpath=[file://{tmp_path}]", choice], multirun=False)
        assert app.hydra_error(caught.value) == error


def test_preflight_failure_submits_nothing_and_names_the_point(tmp_path, synthetic_root):
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking=random,cluster",
                       "masking.ratio=0.3,1.5")
    assert result.returncode != 0
    assert "nothing was submitted" in result.stderr
    assert "  points 1, 3: masking.ratio=1.5 must be in [0, 1)" in result.stderr  # the same error, named once
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("mlflow.db"))


@contextlib.contextmanager
def tracking_server(handler):
    """An HTTP server with `handler` on a free local port, in threads of its own; its URI."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a handler still waiting at the end does not hold the test up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class LoginWallThenErrors(http.server.BaseHTTPRequestHandler):
    """A tracking URI with a server that asks for a login at /health and fails every MLflow call."""

    def do_GET(self):
        self.send_response(401 if self.path.startswith("/health") else 500)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_is_not_there_or_fails_stops_the_sweep_with_a_line(tmp_path, synthetic_root,
                                                                                   monkeypatch):
    """Nothing at tracking.uri: preflight names it, nothing is written. A server that answers (even asking for a
    login) passes preflight; one that then refuses the sweep's runs stops it with MLflow's error in one line."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client would retry a failing server for minutes
    port = free_port()
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", f"tracking.uri=http://127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: preflight failed, nothing was submitted:\n  tracking.uri='http://127.0.0.1:{port}': no MLflow "
            "server answers there (") in result.stderr
    assert not list(tmp_path.iterdir())
    with tracking_server(LoginWallThenErrors) as uri:
        result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", f"tracking.uri={uri}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().startswith(f"error: MLflow at {uri} did not record the sweep's runs, nothing was "
                                            "submitted: MlflowException: "), result.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # not even the empty sweep folder, where a rerun would find its leftovers


def test_mlflows_tracking_uri_variable_names_the_store_where_tracking_uri_is_not_given(tmp_path, synthetic_root):
    """MLflow's convention, which a lab sets once in a shell profile: MLFLOW_TRACKING_URI names the store when no URI
    is given. The sweep went to its own sqlite file instead, and its runs were not where the researcher looked."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                              f"paths.data={synthetic_root}"], capture_output=True, text=True, cwd=REPO, timeout=300,
                             env={**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "note: tracking.uri is not given, so MLflow's MLFLOW_TRACKING_URI names the store: " in refused.stdout
    assert f"tracking.uri='http://127.0.0.1:{port}': no MLflow server answers there (" in refused.stderr
    assert "start it, or unset MLFLOW_TRACKING_URI for the sweep's own sqlite store" in refused.stderr
    assert not list(tmp_path.iterdir())
    lab = f"sqlite:///{tmp_path / 'lab' / 'mlflow.db'}"
    (tmp_path / "lab").mkdir()
    made = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                           f"paths.data={synthetic_root}", "sweep_name=lab", "train.steps=2", "train.batch_size=8",
                           one_eval_task(synthetic_root)], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**env, "MLFLOW_TRACKING_URI": lab})
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = graph.Manifest.load(tmp_path / "sweeps" / "lab")
    assert manifest.tracking_uri == lab and not (tmp_path / "sweeps" / "lab" / "mlflow.db").exists()
    run = MlflowClient(lab).get_run(manifest.points[0].mlflow_run_id)
    assert run.data.params["tracking.uri"] == lab and run.info.status == "FINISHED"
    assert "zeroshot_classification/wds/shapes/acc1" in run.data.metrics


def test_the_demo_names_the_tracking_server_its_sweep_went_to(tmp_path, capsys):
    """`clustermask-demo tracking.uri=http://...` (or MLFLOW_TRACKING_URI): its summary gave an `mlflow ui` command
    for a sqlite file that was never written."""
    from launch import demo

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.md").write_text("| label |\n")
    manifest = {"tracking_uri": "http://mlflow.lab:5000", "experiment": "demo"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    demo.print_summary(tmp_path, 1.0)
    out = capsys.readouterr().out
    assert "  MLflow          : http://mlflow.lab:5000, experiment demo\n" in out and "mlflow.db" not in out


class HealthyThenSlow(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers at /health and then takes its time over the sweep's runs (`asked` is set)."""
    asked = threading.Event()

    def do_GET(self):
        if not self.path.startswith("/health"):
            self.asked.set()
            time.sleep(30)  # the sweep is interrupted meanwhile
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_ctrl_c_while_the_sweep_is_created_leaves_nothing_behind(tmp_path, synthetic_root):
    with tracking_server(HealthyThenSlow) as uri:
        code, stderr = interrupt_when([sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}",
                                       f"paths.data={synthetic_root}", f"tracking.uri={uri}"],
                                      HealthyThenSlow.asked.is_set, "the sweep's creation")
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: nothing was submitted"
    assert not list(tmp_path.iterdir())


def test_a_sweep_whose_points_differ_in_the_sweeps_own_settings_is_refused_naming_them(tmp_path, synthetic_root):
    """One launcher, MLflow store and experiment, report and evaluation per sweep: `launcher.train.mem_gb=4,8`
    submitted every point with 4 GB (point 0's), though point 1's saved config said 8; `tracking.experiment=a,b`
    logged both points in `a`."""
    plots = "linear_probe/wds/shapes/lp_acc1,linear_probe/wds/shapes/lp_acc5"  # the report job plotted point 0's
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking=random,cluster",
                       "launcher.train.mem_gb=4,8", "tracking.experiment=a,b", f"report.plot_metric={plots}")
    assert result.returncode == 2, result.stderr
    assert "these differ between its points (make a sweep for each value), nothing was submitted" in result.stderr
    assert ("  launcher.train.mem_gb: 4, 8\n  report.plot_metric: linear_probe/wds/shapes/lp_acc1, "
            "linear_probe/wds/shapes/lp_acc5\n  tracking.experiment: a, b") in result.stderr
    assert "evaluate-again" not in result.stderr
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("mlflow.db"))
    # points that differ only in how they are evaluated trained the same model once per value
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "eval.batch_size=64,128")
    assert result.returncode == 2, result.stderr
    assert ("would train the same model once each: to evaluate a sweep's models on more benchmarks, "
            "clustermask-resubmit SWEEP_DIR --evaluate-again eval=...), nothing was submitted:\n"
            "  eval.batch_size: 64, 128\n") in result.stderr
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("mlflow.db"))
    points = [ComposedPoint(overrides, {}) for overrides in (["a=1"], ["a=2"], ["a=1"])]
    assert app.same_overrides(points) == (0, 2) and app.same_overrides(points[:2]) is None


def test_a_plot_metric_of_no_task_the_sweep_evaluates_is_refused_with_the_keys_like_it(synthetic_root):
    """A misspelt `report.plot_metric` was found out by the report job, after every point had trained."""
    from launch.helpers import Registries

    def problems(plot_metric):
        sweep = compose_sweep([f"paths.data={synthetic_root}", f"report.plot_metric={plot_metric}"])
        return app.check_points(sweep.points, Registries.here())

    assert problems("linear_probe/wds/shapes/lp_acc5") == []
    assert problems("zeroshot_retrieval/wds/scenes/image_retrieval_recall_at_5") == []
    misspelt = problems("linear_probe/wds/shape/lp_acc1")
    assert len(misspelt) == 1
    assert misspelt[0].startswith("  point 0 (report.plot_metric=linear_probe/wds/shape/lp_acc1): "
                                  "report.plot_metric='linear_probe/wds/shape/lp_acc1' is not "
                                  "<task>/<dataset>/<metric> of a task of eval.tasks (did you mean "
                                  "linear_probe/wds/shapes/lp_acc1? the sweep's metrics start with zeroshot_classification/wds/shapes/, linear_probe/wds/shapes/, "
                                  "zeroshot_retrieval/wds/scenes/, image_caption_selection/sugar_crepe/add_att/, ")
    for bare in ("lp_acc1", "linear_probe/wds/shapes/"):  # no task, or no metric
        (problem,) = problems(bare)
        assert f"report.plot_metric={bare!r} is not <task>/<dataset>/<metric> of a task of eval.tasks (the " \
               "sweep's metrics start with zeroshot_classification/wds/shapes/, " in problem


@pytest.mark.parametrize("plugin, problem", [
    (None, "plugins[0]='{dir}/missing.py': no such file"),
    ("raise RuntimeError('no GPU here')\n", "plugins[0]='{dir}/mine.py' failed to import: RuntimeError: no GPU here"),
    ("from clustermask.masking import register_strategy, score_random\nregister_strategy('random')(score_random)\n",
     "plugins[0]='{dir}/mine.py' failed to import: ValueError: masking strategy 'random' is already registered "
     "(clustermask.masking.score_random)"),
])
def test_a_plugin_that_cannot_be_imported_is_named_before_anything_is_written(tmp_path, synthetic_root, plugin,
                                                                              problem):
    if plugin is not None:
        (tmp_path / "mine.py").write_text(plugin)
    result = sweep_cli(f"plugins=[{'missing' if plugin is None else 'mine'}.py]", "paths.root=out",
                       f"paths.data={synthetic_root}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"nothing was submitted:\n  {problem.format(dir=tmp_path)}" in result.stderr  # pinned where it runs
    assert not (tmp_path / "out").exists()


def test_a_plugin_modules_strategy_is_checked_as_the_built_in_ones(tmp_path, synthetic_root, monkeypatch, request,
                                                                   restore_strategies):
    """A module on PYTHONPATH registers them; the sweep's points are checked against its names and settings (a
    setting its strategy does not declare is recorded at a fixed value), and a resubmission's checks import it."""
    from launch import status
    from launch.helpers import Registries

    (tmp_path / "lab_masks.py").write_text(
        "import torch\n"
        "from clustermask.masking import register_strategy, score_random\n"
        "register_strategy('lab_random')(score_random)\n"
        "@register_strategy('lab_unsaid')  # reads the threshold, declares only the ratio\n"
        "def lab_unsaid(inputs, cfg):\n"
        "    scores = score_random(inputs, cfg)\n"
        "    return scores._replace(score=scores.score * cfg.threshold)\n"
        "@register_strategy('lab_stripes', settings=('ratio', 'options'))  # its own setting: options.width\n"
        "def lab_stripes(inputs, cfg):\n"
        "    scores = score_random(inputs, cfg)\n"
        "    stripe = torch.arange(scores.score.shape[1]) // cfg.options.get('width', 1) % 2\n"
        "    return scores._replace(score=scores.score + stripe)\n"
        "@register_strategy('lab_gpu_only')\n"
        "def lab_gpu_only(inputs, cfg):\n"
        "    if not inputs.tokens.is_cuda:\n"
        "        raise RuntimeError('needs CUDA')\n"
        "@register_strategy('lab_named', settings=('ratio', 'options'), options=('width',))  # names its options\n"
        "def lab_named(inputs, cfg):\n"
        "    return lab_stripes(inputs, cfg)\n"
        "@register_strategy('lab_misnamed', settings=('ratio', 'options'), options=('width',))\n"
        "def lab_misnamed(inputs, cfg):\n"
        "    scores = score_random(inputs, cfg)\n"
        "    return scores._replace(score=scores.score * cfg.options.get('height', 1))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["plugins=[lab_masks]", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
              "masking.strategy=lab_random", "launcher.dry_run=true"]
    shown = subprocess.run([sys.executable, "-m", "launch.app", "-m", *common, "masking.threshold=0.3,0.7"],
                           capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "masking.threshold=0.3 is not used by masking.strategy=lab_random" in shown.stdout
    assert "dry run: 1 point(s)" in shown.stdout
    assert "note: masking.strategy='lab_gpu_only' failed on a small CPU batch (RuntimeError: needs CUDA)" in \
        shown.stdout
    unsaid = subprocess.run([sys.executable, "-m", "launch.app", *common, "masking.strategy=lab_unsaid"],
                            capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert unsaid.returncode == 2
    assert "masking.strategy='lab_unsaid' reads masking.threshold, which it does not declare" in unsaid.stderr
    # options a strategy names: another is refused (a typo the strategy would never read), as its own reads are
    for strategy, option, problem in (
            ("lab_named", "+masking.options.widht=2", "masking.options.widht: lab_named reads no such option (did you "
                                                      "mean width?); it reads width"),
            ("lab_misnamed", "+masking.options.width=2", "masking.strategy='lab_misnamed' reads "
                                                         "masking.options.height, which its options ('width',) do "
                                                         "not name")):
        refused = subprocess.run([sys.executable, "-m", "launch.app", *common, f"masking.strategy={strategy}", option],
                                 capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr
    unknown = sweep_cli(*common, cwd=REPO)  # without the module on PYTHONPATH
    assert unknown.returncode == 2
    assert "plugins[0]='lab_masks': no module named 'lab_masks'" in unknown.stderr
    with pytest.raises(ValueError, match="masking.strategy='lab_random' is not one of"):
        app.preflight(compose_sweep(common[1:], multirun=False).points[0].config)

    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("lab_masks", None))  # imported here below: forgotten afterwards
    sweep = compose_sweep(common[:-1], multirun=False)
    registries = Registries.here(["lab_masks"])
    assert registries.strategies["lab_random"] == ["ratio"]
    assert registries.strategy_options["lab_named"] == ["width"] and registries.strategy_options["lab_stripes"] is None
    # a strategy's own settings: swept where it declares them, one run where it does not
    widths = ["+masking.options.width=1,2", "masking.ratio=0.5"]
    stripes = compose_sweep([*common[:-1], "masking.strategy=lab_stripes", *widths])
    runs = app.merge_same_runs(stripes.points, registries.strategies)[0]
    assert [p.config["masking"]["options"] for p in runs] == [{"width": 1}, {"width": 2}]
    assert [p.overrides[0] for p in runs] == ["+masking.options.width=1", "+masking.options.width=2"]
    runs, notes = app.merge_same_runs(compose_sweep([*common[:-1], *widths]).points, registries.strategies)
    assert [p.config["masking"]["options"] for p in runs] == [{}]
    assert "masking.options={'width': 1} is not used by masking.strategy=lab_random" in notes[0]
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    status.apply_overrides(manifest, [0], ["masking.ratio=0.3"])
    assert graph.load_point_config(Path(manifest.points[0].run_dir)).masking.ratio == 0.3
    # a fix adds a strategy's own setting as the sweep command does, with `+`
    status.apply_overrides(manifest, [0], ["masking.strategy=lab_stripes", "+masking.options.width=3"])
    assert graph.load_point_config(Path(manifest.points[0].run_dir)).masking.options == {"width": 3}


def test_dry_run_prints_scripts_and_graph(tmp_path, synthetic_root):
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm",
                       "launcher.dry_run=true", "masking=random,cluster", "masking.ratio=0.3,0.5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("#SBATCH --array=0-3%4") == 2  # train and eval arrays (parallelism capped at the size)
    assert "#SBATCH --dependency=aftercorr:DRYRUN-train" in out and "#SBATCH --kill-on-invalid-dep=yes" in out
    assert "#SBATCH --dependency=afterany:DRYRUN-train:DRYRUN-eval" in out
    assert out.count("-> eval[") == 4 and "report (afterany" in out
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("mlflow.db"))


def test_without_slurm_a_slurm_sweep_is_refused_before_anything_is_written_and_a_dry_run_still_prints(
        tmp_path, synthetic_root):
    """Where SLURM's commands are missing (a laptop), `launcher=slurm` stops in preflight, naming them, rather
    than in submitit's executor after the sweep is written; a dry run prints the scripts all the same."""
    bare = tmp_path / "bin"  # a PATH with python on it and nothing of SLURM's
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    assert not shutil.which("sbatch", path=str(bare)) and not shutil.which("srun", path=str(bare))
    command = [sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}/out", f"paths.data={synthetic_root}",
               "launcher=slurm", "masking=random,cluster"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                             env={**os.environ, "PATH": str(bare)})
    assert refused.returncode == 2, refused.stderr
    assert "every point (2): launcher=slurm: sbatch and srun not found on PATH" in refused.stderr
    assert not (tmp_path / "out").exists()
    printed = subprocess.run(command + ["launcher.dry_run=true"], capture_output=True, text=True, cwd=REPO,
                             timeout=300, env={**os.environ, "PATH": str(bare)})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count("#SBATCH --array=0-1%2") == 2 and not (tmp_path / "out").exists()


def test_a_warmup_longer_than_the_training_is_noted_with_the_rate_it_reaches(tmp_path, synthetic_root):
    """A quick `train.steps=4` under a warmup of 8: the rate rises the whole run and reaches half of train.lr, which
    the note says (the figure is the one open_clip's scheduler gives the training, logged as train/lr)."""
    from clustermask import train

    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher.dry_run=true",
                       "train.steps=4,8,16", "train.warmup_steps=8", "train.lr=1e-3")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: train.warmup")]
    assert notes == ["note: train.warmup_steps=8 is more than train.steps=4: the learning rate rises for the whole "
                     "run and reaches 0.0005 at most, not train.lr=0.001"]
    logged = []
    train.Trainer(ModelConfig(), MaskingConfig(strategy="random", ratio=0.5),
                  DataConfig(train_shards=str(synthetic_root / "train"), workers=0),
                  TrainConfig(steps=4, batch_size=8, log_every=1, warmup_steps=8, lr=1e-3, device="cpu"),
                  tmp_path / "run", log=lambda metrics, step: logged.append(metrics["train/lr"])).run()
    assert max(logged) == pytest.approx(0.0005)


GPU_RECORDING = """
import os
from pathlib import Path

from clustermask.masking import register_strategy, score_random


@register_strategy("gpu_random")  # random masking that says which GPUs its task was given
def gpu_random(inputs, cfg):
    Path(__file__).with_name(f"ratio_{cfg.ratio}_gpu_{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}").touch()
    return score_random(inputs, cfg)
"""


def test_local_tasks_that_run_at_once_take_a_gpu_each(tmp_path, synthetic_root):
    """`launcher.max_parallel=2` on a machine with two GPUs: each task ran on GPU 0, the other GPU idle. Each now
    takes the GPU running the fewest tasks (CUDA_VISIBLE_DEVICES). Here the GPUs are named, not there: the tasks
    train on the CPU, and the strategy records what its process was given."""
    (tmp_path / "gpu_random.py").write_text(GPU_RECORDING)
    task = f"{{name: zeroshot_classification, dataset: wds/shapes, root: {synthetic_root}/eval/shapes}}"
    result = subprocess.run(
        [sys.executable, "-m", "launch.app", "-m", f"paths.root={tmp_path}", f"paths.data={synthetic_root}",
         f"plugins=[{tmp_path / 'gpu_random.py'}]", "masking.strategy=gpu_random", "masking.ratio=0.3,0.5",
         "launcher.max_parallel=2", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1",
         f"eval.tasks=[{task}]"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"})
    assert result.returncode == 0, result.stdout + result.stderr
    # the two trainings ran at once, so on both GPUs, each on one; their evaluations took a GPU too, the report none
    trained = re.findall(r"^\[local\] train (\S+) \(GPU (\d)\): done$", result.stdout, re.M)
    assert len(trained) == 2 and {gpu for _, gpu in trained} == {"3", "5"}, result.stdout
    assert len(re.findall(r"^\[local\] eval \S+ \(GPU [35]\): done$", result.stdout, re.M)) == 2
    assert re.search(r"^\[local\] report \S+: done$", result.stdout, re.M)
    manifest = graph.Manifest.load(tmp_path / "sweeps" / "default")
    seen = {p.name for p in (Path(manifest.submissions[0]["code"]) / "plugin_files").glob("ratio_*")}
    gpus = {name: gpu for name, gpu in trained}
    assert seen == {f"ratio_{graph.load_point_config(Path(p.run_dir)).masking.ratio}_gpu_{gpus[p.name]}"
                    for p in manifest.points}, seen
    # what counts as a GPU here, and which tasks take the one they are given
    for visible, expected in (("3,5", ["3", "5"]), ("", []), ("2,-1,3", ["2"]), ("GPU-ab12, GPU-cd34", ["GPU-ab12",
                                                                                                   "GPU-cd34"])):
        with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": visible}):
            assert visible_gpus() == expected, visible
    if not shutil.which("nvidia-smi") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert visible_gpus() == []
    # without CUDA_VISIBLE_DEVICES, nvidia-smi's GPUs (here one on PATH that says what a driver would), unless one is
    # split into MIG instances, which their UUIDs name
    fake = tmp_path / "bin"
    fake.mkdir()
    for listing, expected in (("0, Disabled\n1, Disabled\n", ["0", "1"]), ("0, [N/A]\n1, [N/A]\n", ["0", "1"]),
                              ("0, Enabled\n1, Disabled\n", [])):
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{listing}'\n")
        (fake / "nvidia-smi").chmod(0o755)
        with mock.patch.dict(os.environ, {"PATH": f"{fake}:{os.environ['PATH']}"}):
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            assert visible_gpus() == expected, listing
    run_dir = Path(manifest.points[0].run_dir)
    assert picks_its_gpu("train", run_dir) and picks_its_gpu("eval", run_dir)
    for override in ("train.device=cuda:1", "eval.device=cpu"):
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.merge(
            OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist([override]))))
        assert not picks_its_gpu(override.split(".")[0], run_dir)


def test_a_dry_run_names_the_points_submitted_once(tmp_path, synthetic_root):
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm",
                       "launcher.dry_run=true", "masking=none,random", "masking.ratio=0.3,0.5", "train.steps=5")
    assert result.returncode == 0, result.stderr
    assert "dry run: 3 point(s)" in result.stdout and "#SBATCH --array=0-2%3" in result.stdout
    assert "masking.ratio=0.5 masking=none is the same run as masking=none: submitted once" in result.stdout
    # the job scripts `cd` into the code copy, which the dry run names but does not write
    code = re.search(r"^dry run: .* copies the code its jobs run to (\S+)\)$", result.stdout, re.MULTILINE).group(1)
    assert f"cd {code} || exit 1" in result.stdout and not Path(code).parent.exists()


def normalise(script: str, folder: str) -> str:
    script = script.replace(folder, "<FOLDER>").replace(sys.executable, "<PYTHON>")
    script = re.sub(r"/code/[0-9a-f]{12}\b", "/code/<DIGEST>", script)  # the digest of the code the jobs run
    return re.sub(r"--job-name=\S+", "--job-name=<NAME>", script)


def test_train_array_sbatch_script_matches_the_stored_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)  # a relative one adds a line (test_a_job_finds_a_plugin_...)
    cfg = compose_cfg("launcher=slurm", "launcher.train.partition=gpu", "launcher.train.gpus_per_node=8",
                      "launcher.train.tasks_per_node=8", "launcher.train.account=vlp", "launcher.train.qos=high")
    executor = SlurmExecutor(cfg.launcher, tmp_path, "sweep-x")
    inner = executor._executor("train")._executor
    inner.parameters["map_count"] = 64
    script = normalise(inner._make_submission_file_text(inner._submitit_command_str, "x"), str(tmp_path))
    assert script == (EXPECTED / "train_array.sbatch").read_text()


def test_each_submission_copies_the_code_its_jobs_run_once_per_version(tmp_path):
    """Named after a digest of the files: the same code shares a copy, which is never written again (a job may be
    reading it); an edit gets a copy of its own; a dry run writes none."""
    from launch import snapshot

    package = tmp_path / "checkout" / "clustermask"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (package / "model_configs").mkdir()
    (package / "model_configs" / "tiny.json").write_text("{}")
    folders = {"clustermask": package}
    sweep = tmp_path / "sweep"
    assert not snapshot.code_folder(sweep, folders, write=False).exists() and not sweep.exists()
    first = snapshot.code_folder(sweep, folders)
    assert first.parent == sweep / "code"
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # readable as the sweep's other folders (not mkdtemp's)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()) == [
        "clustermask/__init__.py", "clustermask/model_configs/tiny.json"]
    written = (first / "clustermask" / "__init__.py").stat().st_mtime_ns
    assert snapshot.code_folder(sweep, folders) == first
    assert (first / "clustermask" / "__init__.py").stat().st_mtime_ns == written
    (package / "__init__.py").write_text("VERSION = 2\n")
    second = snapshot.code_folder(sweep, folders)
    assert second != first and (second / "clustermask" / "__init__.py").read_text() == "VERSION = 2\n"
    assert (first / "clustermask" / "__init__.py").read_text() == "VERSION = 1\n"
    assert sorted(p.name for p in (sweep / "code").iterdir()) == sorted([first.name, second.name])  # no staging
    assert snapshot.code_folder(tmp_path / "other", None, write=False).name != first.name  # this process's code
    # a sweep's plugin file is copied with the packages, and is part of the digest
    plugin = tmp_path / "lab" / "mine.py"
    plugin.parent.mkdir()
    plugin.write_text("WIDTH = 1\n")
    with_plugin = snapshot.code_folder(sweep, folders, plugin_files=[plugin])
    assert with_plugin not in (first, second)
    assert snapshot.plugin_copy(with_plugin, plugin).read_text() == "WIDTH = 1\n"
    assert snapshot.plugin_copy(with_plugin, plugin).parent == with_plugin / "plugin_files"
    plugin.write_text("WIDTH = 2\n")
    assert snapshot.code_folder(sweep, folders, write=False, plugin_files=[plugin]) != with_plugin
    assert snapshot.plugin_copy(with_plugin, plugin).read_text() == "WIDTH = 1\n"


def test_a_job_script_runs_in_its_code_copy_and_fails_without_it(tmp_path):
    """The job script's command runs in the submission's copy of the code; if the copy is gone, the job fails
    rather than import whatever the folder it was submitted from holds."""
    from launch import snapshot

    executor = SlurmExecutor(compose_cfg("launcher=slurm").launcher, tmp_path / "sweep", "s")
    script = executor._script(executor._executor("train"), 1)
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    script = script.replace(command, 'echo "ran in $PWD"')  # the script as bash runs it, less srun and python
    ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 1 and "ran in" not in ran.stdout  # the copy was never written
    code = snapshot.code_folder(tmp_path / "sweep")
    ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0 and ran.stdout == f"ran in {code}\n"
    # the user's setup lines run where the job was submitted, as sbatch starts it: a relative path there holds
    (tmp_path / "env.sh").write_text("export LAB_SETUP=sourced\n")
    executor = SlurmExecutor(compose_cfg("launcher=slurm", "launcher.train.setup=[source env.sh]").launcher,
                             tmp_path / "sweep", "s")
    script = executor._script(executor._executor("train"), 1)
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    script = script.replace(command, 'echo "$LAB_SETUP in $PWD"')
    ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0 and ran.stdout == f"sourced in {code}\n", ran.stderr


def test_a_job_finds_a_plugin_module_on_a_relative_pythonpath_of_its_submission(tmp_path, monkeypatch):
    """`PYTHONPATH=lab clustermask-sweep plugins=[labmasks]`: sbatch hands the job the submission's environment,
    but the job runs in its code copy, where `lab` is another folder; the job script gives it the absolute path."""
    from launch import snapshot

    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "labmasks.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"lab{os.pathsep}")  # the empty entry: the working folder
    executor = SlurmExecutor(compose_cfg("launcher=slurm").launcher, tmp_path / "sweep", "s")
    executor.code = snapshot.code_folder(tmp_path / "sweep")
    script = executor._script(executor._executor("train"), 1)
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    shows_where = "import labmasks, sys; print(labmasks.__file__, sys.path[1:3])"
    script = script.replace(command, f"{sys.executable} -c '{shows_where}'")  # the job, less srun and submitit
    ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == f"{tmp_path / 'lab' / 'labmasks.py'} {[str(tmp_path / 'lab'), str(tmp_path)]}\n"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "lab"))  # absolute already: the script leaves it as it is
    assert "PYTHONPATH" not in executor._script(executor._executor("train"), 1)


def test_a_job_is_given_the_folders_of_its_submissions_environment_absolute(tmp_path, monkeypatch):
    """`HF_HOME=hf clustermask-sweep ...`: preflight found the model's tokenizer in ./hf, and the job, which runs in
    its code copy, would have looked for it there. Each relative folder variable the jobs read is made absolute."""
    from launch import snapshot

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("HF_HOME", "hf")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "caches/inductor")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # absolute already: left as it is
    monkeypatch.setenv("TORCH_HOME", "~/torch")  # the home folder: torch expands it
    executor = SlurmExecutor(compose_cfg("launcher=slurm").launcher, tmp_path / "sweep", "s")
    executor.code = snapshot.code_folder(tmp_path / "sweep")
    script = executor._script(executor._executor("train"), 1)
    assert "XDG_CACHE_HOME" not in script and "TORCH_HOME" not in script
    command = next(line for line in script.splitlines() if line.startswith("srun "))
    shows = "import os; print(os.getcwd(), os.environ['HF_HOME'], os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    ran = subprocess.run(["bash", "-c", script.replace(command, f"{sys.executable} -c \"{shows}\"")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [str(executor.code), str(tmp_path / "hf"), str(tmp_path / "caches" / "inductor")]
    # a local task, and the sweep command's helper, get the same
    elsewhere = snapshot.environment_elsewhere()
    assert elsewhere["HF_HOME"] == str(tmp_path / "hf") and elsewhere["XDG_CACHE_HOME"] == str(tmp_path / "xdg")


def test_executor_parameters_follow_hydra_submitit_launcher():
    cfg = compose_cfg("launcher=slurm", "launcher.train.partition=gpu")
    params = executor_parameters(cfg.launcher.train, "cm; rm -rf / `x` $(y)")
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 240 and params["mem_gb"] == 8
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", params["name"])


HOSTILE = "it's \"quoted\"; touch PWNED $(touch PWNED2) `touch PWNED3` a  b\nnewline"


def test_hostile_override_values_stay_inert_and_unchanged(tmp_path, synthetic_root):
    result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm",
                       "launcher.dry_run=true", "masking.ratio=0.3,0.5", f"sweep_name={json.dumps(HOSTILE)}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("PWNED*"))
    names = re.findall(r"--job-name=(\S+)", result.stdout)
    assert names and all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)
    scripts = result.stdout[result.stdout.index("# ---- train"):result.stdout.index("dependency graph")]
    assert "touch" not in scripts.replace("touch_PWNED", "")  # the value never reaches a job script


def test_point_names_are_pure_and_safe(tmp_path):
    overrides = ["masking=cluster", "masking.ratio=0.5", f"tracking.experiment={HOSTILE}"]
    assert graph.run_dir_for(tmp_path, overrides) == graph.run_dir_for(tmp_path, list(overrides))
    assert graph.run_dir_for(tmp_path, overrides) != graph.run_dir_for(tmp_path, overrides[:2])
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", graph.point_name(overrides))
    shown = graph.varying_keys([overrides, ["masking=cluster", "masking.ratio=0.3", overrides[2]]])
    assert shown == ["masking.ratio"]
    assert graph.point_name(overrides, shown).startswith("ratio-0.5-")
    assert graph.point_overrides(["launcher=slurm", "masking.ratio=0.5", "experiment=demo", "sweep_name=x"]) == \
        ["masking.ratio=0.5"]


def test_resubmission_plan_skips_finished_and_queued_work():
    rows = [{"index": 0, "train": "done", "eval": "done"},
            {"index": 1, "train": "failed", "eval": "cancelled"},
            {"index": 2, "train": "done", "eval": "failed"},
            {"index": 3, "train": "running", "eval": "pending"},
            {"index": 4, "train": "done", "eval": "pending"},
            {"index": 5, "train": "cancelled", "eval": "cancelled"}]
    plan = plan_resubmission(rows)
    assert plan == Plan(train=[1, 5], eval_only=[2])


def test_a_stage_done_before_and_queued_again_is_the_queued_jobs():
    """Evaluated again, or a report rebuilt: while the new job waits or runs, the stage is that job's state, not
    the earlier `done`; a job that wrote `done` and is still completing in the queue is done."""
    from launch.status import _state

    done_by_7 = {"state": "done", "job_id": "7_0"}
    assert _state(done_by_7, "9_0", {"9_0": "pending"}, False) == "pending"
    assert _state(done_by_7, "9_0", {"9_0": "running"}, False) == "running"
    assert _state(done_by_7, "9_0", {}, False) == "done"  # left the queue: until its own marker, the earlier one
    assert _state(done_by_7, "7_0", {"7_0": "running"}, False) == "done"
    assert _state({"state": "failed", "job_id": "7_0"}, "9_0", {"9_0": "pending"}, False) == "pending"


def test_a_moved_sweeps_manifest_reads_where_the_sweep_is_now(tmp_path):
    """Where it was made is gone (moved): its run directories and sqlite store move with it; a tracking server's URI
    stays; where it still is, nothing changes."""
    from clustermask.files import where_the_sweep_is

    made = {"sweep_dir": "/cluster/outputs/sweeps/s", "tracking_uri": "sqlite:////cluster/outputs/sweeps/s/mlflow.db",
            "points": [{"index": 0, "run_dir": "/cluster/outputs/sweeps/s/runs/a"},
                       {"index": 1, "run_dir": "/elsewhere/runs/b"}]}
    here = where_the_sweep_is(made, tmp_path / "s")
    assert here["sweep_dir"] == str(tmp_path / "s")
    assert here["tracking_uri"] == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
    assert [p["run_dir"] for p in here["points"]] == [str(tmp_path / "s" / "runs" / "a"), "/elsewhere/runs/b"]
    served = where_the_sweep_is({**made, "tracking_uri": "http://mlflow:5000"}, tmp_path / "s")
    assert served["tracking_uri"] == "http://mlflow:5000"
    (tmp_path / "s").mkdir()
    in_place = {**made, "sweep_dir": str(tmp_path / "s")}
    assert where_the_sweep_is(in_place, tmp_path / "s") is in_place


def test_a_stage_never_submitted_is_told_from_one_cancelled():
    """No SLURM job at all (sbatch refused the sweep): `not submitted`; a job that left the queue without starting
    (its training failed), or a local sweep's stage that never ran (the sweep was stopped: its manifest records the
    jobs once they have all run): `cancelled`; a local sweep still running will get to it: `pending`."""
    from launch.status import _state

    assert _state({}, None, {}, False) == "not submitted"
    assert _state({}, "9_0", {}, False) == "cancelled"
    assert _state({}, None, {}, False, local=True) == "cancelled"
    assert _state({}, "local", {}, False, local=True) == "cancelled"
    assert _state({}, None, {}, True, local=True) == "pending" and _state({}, "local", {}, True, local=True) == "pending"


def test_the_report_task_marks_its_state_and_status_shows_a_failed_report_with_its_log(tmp_path, monkeypatch):
    from launch import jobs
    from launch.status import format_status, report_status

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    submission = {"time": "2026-11-28T12:00:00", "executor": "local", "train": [], "eval": [],
                  "report": {"job_id": "local"}}
    graph.Manifest("s", str(sweep_dir), "", "local", "", "", "", [], [submission]).save()
    monkeypatch.setenv("CLUSTERMASK_LOG", str(sweep_dir / "logs" / "report.log"))

    def fails(*args, **kwargs):
        raise RuntimeError("no table today")

    monkeypatch.setattr("analysis.report.build_report", fails)
    with pytest.raises(RuntimeError, match="no table today"):
        jobs.report(str(sweep_dir))
    manifest = graph.Manifest.load(sweep_dir)
    report = report_status(manifest)
    assert (report["report"], report["report_job"]) == ("failed", "local")
    assert format_status(manifest, [], report).splitlines()[-3:] == [
        f"0/0 point(s) evaluated; report failed (job local): {sweep_dir / 'report'}",
        f"       report failed, log: {sweep_dir / 'logs' / 'report.log'}",
        "         RuntimeError('no table today')"]  # what its task recorded; the log has the traceback


# slurmstepd's lines as this machine's SLURM (23.11) wrote them into a training's stderr
REQUEUED = """slurmstepd-vm: error: *** STEP 1972.0 ON vm CANCELLED AT 2026-12-05T11:38:25 DUE TO JOB REQUEUE ***
slurmstepd-vm: error: *** JOB 1972 ON vm CANCELLED AT 2026-12-05T11:38:25 DUE TO JOB REQUEUE ***
"""
SCANCELLED = """RuntimeError: DataLoader worker (pid 15615) is killed by signal: Terminated.
slurmstepd-vm: error: *** STEP 1973.0 ON vm CANCELLED AT 2026-12-05T11:37:26 ***
slurmstepd-vm: error: *** JOB 1973 ON vm CANCELLED AT 2026-12-05T11:37:26 ***
srun: error: vm: task 0: Exited with exit code 1
"""
TIMED_OUT = "slurmstepd-vm: error: *** JOB 1972 ON vm CANCELLED AT 2026-12-05T11:52:27 DUE TO TIME LIMIT ***\n"
OOM_KILLED = ("slurmstepd: error: Detected 1 oom_kill event in StepId=2001.0. Some of the step tasks have been OOM "
              "Killed.\n")


@pytest.mark.parametrize("err, ending", [
    (SCANCELLED, ("cancelled", "scancel at 2026-12-05T11:37:26")),
    (REQUEUED + SCANCELLED, ("cancelled", "scancel at 2026-12-05T11:37:26")),
    (REQUEUED + TIMED_OUT, ("failed", "time limit at 2026-12-05T11:52:27")),
    (OOM_KILLED, ("failed", "out of memory")),
    (REQUEUED, None),  # requeued, then the attempt after it failed or was killed by itself
    (OOM_KILLED + REQUEUED, None),  # an earlier attempt's
    (SCANCELLED.splitlines()[0] + "\n", None),
])
def test_status_tells_a_scancel_a_time_limit_and_an_oom_kill_apart_from_a_failure(tmp_path, err, ending):
    """A task that left the queue mid-run showed as failed, whether it failed or was cancelled with scancel (its
    data workers die first, and it records their error as its own); slurmstepd's last word in the job's stderr
    since its last requeue says which."""
    from types import SimpleNamespace
    from launch.status import format_status, sweep_status

    log = tmp_path / "slurm" / "train" / "7_0" / "7_0_0_log.out"
    log.parent.mkdir(parents=True)
    log.with_name("7_0_0_log.err").write_text("Traceback (most recent call last):\n" + err)
    run_dir = tmp_path / "points" / "a"
    graph.mark(run_dir, "train", "failed", job_id="7_0", log=str(log),
               error="RuntimeError('DataLoader worker (pid 15615) is killed by signal: Terminated. ')")
    graph.mark(run_dir, "eval", "running", job_id="8_0", log=str(log).replace("7_0", "8_0"))  # no stderr beside it
    point = SimpleNamespace(index=0, name="a", run_dir=str(run_dir))
    manifest = SimpleNamespace(sweep_id="s", executor="slurm", sweep_dir=str(tmp_path), points=[point],
                               latest_jobs=lambda index: {"train": "7_0", "eval": "8_0"}, where_now=lambda path: path)
    row, = sweep_status(manifest, listing={})
    state, reason = ending or ("failed", "")
    assert (row["train"], row["train_reason"], row["eval"], row["eval_reason"]) == (state, reason, "failed", "")
    text = format_status(manifest, [row])
    assert ("DataLoader worker" in text) == (state == "failed")  # a cancelled task's error is the cancel's doing
    cell = f"{state} ({reason})" if reason else state
    assert re.search(rf"^ +0  a +{re.escape(cell)} +failed ", text, re.MULTILINE), text
    assert ("resubmit with a larger launcher.train.mem_gb" in text) == (reason == "out of memory")


def test_a_training_whose_requeues_ran_out_says_what_to_change():
    """submitit's error when a task times out once more than `max_num_timeout` allows, as a real one recorded it."""
    from launch.status import failure_lines

    row = {"train_log": "/s/7_0_0_log.out", "train_reason": "",
           "train_error": "UncompletedJobError('Job not requeued because: timed-out too many times.')"}
    assert failure_lines("train", row) == [
        "       train failed, log: /s/7_0_0_log.out",
        "         UncompletedJobError('Job not requeued because: timed-out too many times.')",
        "         its requeues after a time limit ran out: resubmit with a larger launcher.train.timeout_min or "
        "launcher.train.max_num_timeout"]
    row["train_error"] = "RuntimeError('" + "x" * 400 + "')"
    assert failure_lines("train", row)[1] == "         RuntimeError('" + "x" * 286 + "..."  # the log has the rest


def test_status_columns_line_up_whatever_the_point_names_and_reasons():
    """Long point names and SLURM's reasons for a waiting task widen their columns; a reason is shown only for a
    pending task, a progress only for a running one."""
    from types import SimpleNamespace
    from launch.status import format_status

    manifest = SimpleNamespace(sweep_id="s", executor="slurm", sweep_dir="/sweeps/s")
    names = ["ratio-0.3-1a2b3c4d", "attention-True_target_coverage-0.3_masking-cluster_mixed-7a655c82"]
    rows = [{"index": 0, "point": names[0], "train": "running", "train_progress": "120/400", "eval": "pending",
             "eval_reason": "Dependency", "train_job": "7_0", "eval_job": "8_0"},
            {"index": 1, "point": names[1], "train": "pending", "train_reason": "PartitionTimeLimit",
             "eval": "pending", "eval_reason": "Dependency", "train_job": "7_1", "eval_job": "8_1"}]
    header, *lines = format_status(manifest, rows).splitlines()[1:4]
    assert len(lines) == 2
    assert "running 120/400 " in lines[0] and "pending (PartitionTimeLimit) " in lines[1]
    for line in lines:
        assert line.index(" running" if "running" in line else " pending (Part") + 1 == header.index("train")
        assert line.index("pending (Dependency)") == header.index("eval")
        assert line.index(" 7_") + 1 == header.index("jobs")


def test_a_training_that_waits_for_its_loader_says_so_beside_its_progress(tmp_path):
    """`clustermask-status` shows a running training's steps, and the share of its time since its last log spent
    waiting for its loader when that is over LOADER_BOUND: a run to stop and give more workers and cores."""
    from launch import jobs

    shown = []
    for waited in (0.35, 0.05, None):
        jobs._progress(tmp_path, "train", 120, 400, waited)
        shown.append(graph.read_state(tmp_path, "train")["progress"])
    assert shown == ["120/400, 35% waiting for data", "120/400", "120/400"]


def test_a_running_training_says_about_how_long_it_has_left(tmp_path, monkeypatch):
    """At the pace of its steps since its first log in this process (a resumed run's earlier steps, its start and
    its compilation are not its pace); an evaluation's tasks are too unlike one another to say."""
    from launch import jobs

    clock = iter([100.0, 110.0, 150.0, 7000.0])
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    shown = []
    for step, waited in ((20, None), (40, None), (100, 0.35), (120, None)):  # resumed at 0: 20 steps in 10 s
        jobs._progress(tmp_path, "train", step, 400, waited)
        shown.append(graph.read_state(tmp_path, "train")["progress"])
    assert shown == ["20/400", "40/400, about 3 min left", "100/400, about 3 min left, 35% waiting for data",
                     "120/400, about 5.4 h left"]  # 100 steps in 6900 s: 280 more in 19320 s
    jobs._progress(tmp_path, "eval", 2, 10)
    assert graph.read_state(tmp_path, "eval")["progress"] == "2/10"
    assert jobs.duration(89) == "89 s" and jobs.duration(5399) == "90 min" and jobs.duration(5400) == "1.5 h"


def test_a_requeued_attempt_that_saved_nothing_to_resume_from_says_so_in_its_log(tmp_path, capsys):
    """A time limit shorter than a checkpoint interval: each attempt was signalled before its first checkpoint, the
    next started where it had, and after max_num_timeout requeues the training failed, with nothing in its log to say
    why. The requeue now says so where the attempt saved nothing; a training's checkpoint or an evaluation's result
    written in the attempt is progress."""
    from launch import jobs

    for stage, folder, name, advice in (("train", "checkpoints", "latest.pt", "train.checkpoint_every"),
                                        ("eval", "results", "shapes_final.pt_ViT_en_zeroshot_classification.json",
                                         "each evaluation task is saved when it ends")):
        task = jobs.StageTask(stage)
        task.started = time.time()
        earlier = tmp_path / folder / name
        earlier.parent.mkdir()
        earlier.write_text("an earlier attempt's")
        os.utime(earlier, (task.started - 600, task.started - 600))
        delayed = task.checkpoint(str(tmp_path))
        assert delayed.function is task and delayed.args == (str(tmp_path),)  # requeued all the same
        warning = capsys.readouterr().err
        assert warning.startswith(f"warning: this attempt of the {stage} (0 min) saved nothing to resume from in "
                                  f"{tmp_path}") and f"launcher.{stage}.timeout_min" in warning and advice in warning
        earlier.touch()  # written by this attempt
        task.checkpoint(str(tmp_path))
        assert capsys.readouterr().err == ""


class SignalsItself:
    """A dataset whose loader worker signals itself, as SLURM signals every process of a step."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGUSR2)
        return os.getpid()


def test_a_jobs_signal_handlers_run_in_its_own_process_and_not_in_its_loader_workers(tmp_path):
    """Ahead of a time limit SLURM sends SIGUSR2 to every process of the step; submitit's handler, inherited by a
    forked DataLoader worker, must run in the job's process only (a worker's would pickle the job and requeue it
    a second time)."""
    import torch.utils.data
    from launch import jobs

    record = tmp_path / "handled_in"

    def handler(signum, frame):
        with open(record, "a") as out:
            out.write(f"{os.getpid()}\n")

    saved = {signum: signal.getsignal(signum) for signum in jobs.SUBMITIT_SIGNALS}
    try:
        signal.signal(signal.SIGUSR2, handler)
        jobs.handle_signals_in_this_process_only()
        loader = torch.utils.data.DataLoader(SignalsItself(), num_workers=1, multiprocessing_context="fork")
        workers = {int(pid) for pid in loader}
        assert workers and os.getpid() not in workers
        assert not record.exists(), f"handled in the worker: {record.read_text()}"
        os.kill(os.getpid(), signal.SIGUSR2)
        assert record.read_text() == f"{os.getpid()}\n"
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def mark_trained(run_dir: Path, **info) -> None:
    """A point's training marked done (`info`: the marker's other fields), with a (blank) trained checkpoint where an
    evaluation would read it."""
    graph.mark(run_dir, "train", "done", **info)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "final.pt").touch()


class TrackingHere:
    """`create_sweep`'s tracker, in this process rather than the helper child."""

    def create_sweep_runs(self, tracking, uri, sweep_id, params, points, artifacts):
        from clustermask import tracking as tracking_lib

        return tracking_lib.create_sweep_runs(tracking_lib.TrackingConfig(**tracking), uri, sweep_id, params, points,
                                              artifacts)


def test_resubmit_fixes_all_points_or_none_and_tags_them_in_mlflow(tmp_path, synthetic_root):
    from launch.status import apply_overrides
    from mlflow.tracking import MlflowClient

    # point 1's data has gone since submission: a fix for both points must not change point 0 alone
    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking.ratio=0.3,0.5"],
                          multirun=True)
    for point, data in zip(sweep.points, (synthetic_root, tmp_path / "moved")):
        point.config["data"] = dict(point.config["data"], train_shards=f"{data}/train")
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())

    def lrs():
        return [graph.load_point_config(Path(p.run_dir)).train.lr for p in manifest.points]

    before = lrs()
    with pytest.raises(FileNotFoundError, match=r"point 1 .*nothing changed.*data.train_shards"):
        apply_overrides(manifest, [0, 1], ["train.lr=0.01"])
    assert lrs() == before
    apply_overrides(manifest, [0], ["train.lr=0.01"])
    apply_overrides(manifest, [0], ["train.steps=7"])
    assert lrs() == [0.01, before[1]]
    tags = MlflowClient(manifest.tracking_uri).get_run(manifest.points[0].mlflow_run_id).data.tags
    assert tags["resubmit_overrides"] == "train.lr=0.01 train.steps=7"

    def masking_of_point_0():
        return graph.load_point_config(Path(manifest.points[0].run_dir)).masking

    apply_overrides(manifest, [0], ["masking.threshold=0.3", "masking.kmeans_k=4"])  # random uses neither
    assert (masking_of_point_0().threshold, masking_of_point_0().kmeans_k) == (0.5, 8)
    apply_overrides(manifest, [0], ["masking=cluster", "masking.threshold=0.3"])
    assert (masking_of_point_0().strategy, masking_of_point_0().threshold) == ("cluster", 0.3)
    # a key fixed again is on record once, with its latest value
    (tmp_path / "my shards").symlink_to(synthetic_root / "train")
    shards = f"data.train_shards={tmp_path}/my shards"
    apply_overrides(manifest, [0], ["train.lr=0.02", shards])
    apply_overrides(manifest, [0], [shards])
    tags = MlflowClient(manifest.tracking_uri).get_run(manifest.points[0].mlflow_run_id).data.tags
    assert shlex.split(tags["resubmit_overrides"]) == ["train.steps=7", "masking.kmeans_k=4", "masking=cluster",
                                                       "masking.threshold=0.3", "train.lr=0.02", shards]


def test_a_fix_of_how_points_train_leaves_the_points_already_trained_as_they_were_trained(tmp_path, synthetic_root,
                                                                                          capsys):
    """Point 0 trained and its evaluation failed; point 1's training failed. `train.lr=0.01` resubmitted for both
    reaches point 1 only: point 0 is evaluated only, and its config and MLflow tag must still say how its
    checkpoint was trained. The evaluation's fixes reach both. A fix that would reach no point is refused, with
    nothing changed, rather than seem to have been taken (training a finished point longer is a new sweep)."""
    from mlflow.tracking import MlflowClient

    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking.ratio=0.3,0.5"],
                          multirun=True)
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    run_dirs = [Path(p.run_dir) for p in manifest.points]
    graph.mark(run_dirs[0], "train", "done")
    graph.mark(run_dirs[0], "eval", "failed")
    graph.mark(run_dirs[1], "train", "failed")

    def configs():
        return [graph.load_point_config(run_dir) for run_dir in run_dirs]

    # a trained point whose checkpoint was deleted (disk space) cannot be evaluated: said before its job would fail
    with pytest.raises(FileNotFoundError, match=rf"^1 trained point\(s\) to be evaluated no longer have their "
                                                rf"checkpoint .*: point 0 \({manifest.points[0].name}\): "
                                                rf"{re.escape(str(run_dirs[0] / 'checkpoints' / 'final.pt'))}; "):
        status.resubmit(sweep.sweep_dir, [], dry_run=True)
    assert "done (no final.pt here)" in status.format_status(manifest, status.sweep_status(manifest))  # status says
    mark_trained(run_dirs[0])
    assert "no final.pt" not in status.format_status(manifest, status.sweep_status(manifest))
    assert status.resubmit(sweep.sweep_dir, ["train.lr=0.01", "eval.batch_size=8"], dry_run=True) is None
    out = capsys.readouterr().out
    assert (f"note: train.lr=0.01 not applied to the point(s) whose training is done, which are evaluated only: "
            f"0 ({manifest.points[0].name}) (their configs say how their checkpoints were trained)") in out
    assert "resume(s) from a checkpoint" not in out
    latest = run_dirs[1] / "checkpoints" / "latest.pt"  # point 1 failed after a checkpoint: the fix applies from it
    latest.parent.mkdir()
    latest.touch()
    status.resubmit(sweep.sweep_dir, ["train.lr=0.01", "eval.batch_size=8"], dry_run=True)
    out = capsys.readouterr().out
    assert (f"note: point 1 ({manifest.points[1].name}) resume(s) from a checkpoint, so train.lr=0.01 take(s) effect "
            f"from there on; to train afresh with them, cancel, remove {latest} and resubmit") in out
    assert [c.train.lr for c in configs()] == [0.001, 0.001]  # a dry run changes nothing

    status.apply_overrides(manifest, [0, 1], ["train.lr=0.01", "masking=cluster", "eval.batch_size=8"], trained={0})
    assert [(c.train.lr, c.masking.strategy, c.eval.batch_size) for c in configs()] == \
        [(0.001, "random", 8), (0.01, "cluster", 8)]
    client = MlflowClient(manifest.tracking_uri)
    assert [client.get_run(p.mlflow_run_id).data.tags["resubmit_overrides"] for p in manifest.points] == \
        ["eval.batch_size=8", "train.lr=0.01 masking=cluster eval.batch_size=8"]

    before = [(run_dir / "config.yaml").read_text() for run_dir in run_dirs]
    mark_trained(run_dirs[1])  # now both are only evaluated again
    with pytest.raises(ValueError, match=r"^train.steps=400 would change no point: the 2 point\(s\) resubmitted are "
                                         r"evaluated only, as their training is done.*; nothing changed$"):
        status.resubmit(sweep.sweep_dir, ["eval.batch_size=4", "train.steps=400"])
    graph.mark(run_dirs[0], "eval", "done")
    graph.mark(run_dirs[1], "eval", "done")
    with pytest.raises(ValueError, match=r"^nothing to resubmit: every point is done or still queued, so train.steps="
                                         r"400 would change no point .*make a new sweep\); nothing changed$"):
        status.resubmit(sweep.sweep_dir, ["train.steps=400"])
    assert [(run_dir / "config.yaml").read_text() for run_dir in run_dirs] == before
    assert status.resubmit(sweep.sweep_dir, []) is None  # without fixes, nothing to do is no error
    assert "nothing to resubmit: every point is done or still queued" in capsys.readouterr().out
    # moved evaluation data is an evaluation's fix: an evaluation again takes it
    status.check_eval_overrides(["data.eval_root=/elsewhere"])
    with pytest.raises(ValueError, match="--evaluate-again takes eval=NAME, eval.*, data.eval_root"):
        status.check_eval_overrides(["data.train_shards=/elsewhere"])


def test_runs_deleted_in_mlflow_stop_a_resubmission_and_a_job_that_meets_one_records_why(tmp_path, synthetic_root):
    """A run deleted in the MLflow UI refuses every log: a resubmission whose jobs would log to one stops before
    anything runs, naming it and how to restore it; a job that meets one anyway records the error in its marker
    (it stayed `running`, with no error shown: its first tag was sent before it could record a failure)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from launch import jobs, status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "masking.ratio=0.3,0.5"],
                          multirun=True)
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    run_dirs = [Path(p.run_dir) for p in manifest.points]
    for run_dir in run_dirs:
        mark_trained(run_dir)
        graph.mark(run_dir, "eval", "failed")
    client = MlflowClient(manifest.tracking_uri)
    client.delete_run(manifest.points[1].mlflow_run_id)
    client.delete_run(manifest.parent_run_id)
    with pytest.raises(ValueError, match=rf"^2 MLflow run\(s\) that the jobs would log to were deleted: point 1 "
                                         rf"\({manifest.points[1].name}\): run {manifest.points[1].mlflow_run_id}, "
                                         rf"the sweep's own run \({manifest.sweep_id}\): run {manifest.parent_run_id}; "
                                         rf"restore them first .*restore_run\(RUN_ID\).*nothing changed or submitted$"):
        status.resubmit(sweep.sweep_dir, [], evaluate_again=True)
    assert [graph.read_state(run_dir, "eval")["state"] for run_dir in run_dirs] == ["failed", "failed"]

    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        jobs.eval_point(str(run_dirs[1]))
    marker = graph.read_state(run_dirs[1], "eval")
    assert marker["state"] == "failed" and "must be in the 'active' state" in marker["error"]


def test_resubmit_fixes_on_record_give_the_config_the_fixes_gave_in_turn():
    from launch.status import merged_fixes

    assert merged_fixes(None, ["a=1"]) == "a=1"
    assert merged_fixes("a=1 b=2", ["a=1"]) == "b=2 a=1"
    # the group option replaced the threshold fixed before it: it stays after it
    assert merged_fixes("masking.threshold=0.3 masking=cluster", ["masking=random"]) == \
        "masking.threshold=0.3 masking=random"
    assert merged_fixes("masking=cluster masking.threshold=0.3", ["+x.y=1", "x.y=2"]) == \
        "masking=cluster masking.threshold=0.3 x.y=2"
    assert merged_fixes("k=[1,5]", ["a=b c", "q='x'"]) == """k=[1,5] 'a=b c' 'q='"'"'x'"'"''"""
    assert shlex.split(merged_fixes("k=[1,5]", ["a=b c", "q='x'"])) == ["k=[1,5]", "a=b c", "q='x'"]


def test_evaluating_again_takes_an_eval_option_and_eval_keys_only(tmp_path, synthetic_root):
    """`clustermask-resubmit SWEEP --evaluate-again eval=benchmarks`: a config-group option replaces the
    point's whole eval group as Hydra composes it (interpolations against the point's own config); anything
    but the evaluation is refused, as the saved config must still say how the checkpoint was trained."""
    from launch import status

    benchmarks = benchmark_stand_ins(tmp_path / "clip_benchmark", synthetic_root)
    for synthetic in ("shapes", "scenes"):
        (benchmarks / synthetic).symlink_to(synthetic_root / "eval" / synthetic)
    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", f"data.eval_root={benchmarks}"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    run_dir = Path(manifest.points[0].run_dir)
    before = (run_dir / "config.yaml").read_text()
    for overrides, message in ((["eval.batch_size=8", "train.lr=0.1"], "'train.lr=0.1': --evaluate-again takes eval"),
                               (["masking=cluster"], "'masking=cluster': --evaluate-again takes eval"),
                               (["launcher.train.mem_gb=8"], "'launcher.train.mem_gb=8': --evaluate-again takes")):
        with pytest.raises(ValueError, match=message):
            status.resubmit(sweep.sweep_dir, overrides, evaluate_again=True)
    with pytest.raises(ValueError, match=r"eval='nope': no nope.yaml in .*configs/eval; the options are benchmarks, "):
        status.apply_overrides(manifest, [0], ["eval=nope"])
    with pytest.raises(ValueError, match=r"point 0 .*nothing changed: data.train_shards=\?\?\? must be given"):
        status.apply_overrides(manifest, [0], ["data=shards"])  # a resubmission fix, not an evaluation again
    assert (run_dir / "config.yaml").read_text() == before
    status.check_eval_overrides(["eval=benchmarks", "eval.batch_size=8", "launcher.eval.mem_gb=8",
                                 "launcher.report.timeout_min=5"])  # the evaluation's resources, not the training's
    status.apply_overrides(manifest, [0], ["eval=benchmarks", "eval.batch_size=8"])
    evaluation = graph.load_point_config(run_dir).eval
    assert len(evaluation.tasks) == 15 and evaluation.batch_size == 8 and evaluation.amp
    assert evaluation.tasks[0].root == str(benchmarks / "wds_imagenet1k")
    saved, earlier = (yaml.safe_load(text) for text in ((run_dir / "config.yaml").read_text(), before))
    assert {k: v for k, v in saved.items() if k != "eval"} == {k: v for k, v in earlier.items() if k != "eval"}
    assert status.plan_reevaluation([{"index": 0, "train": "done", "eval": "done"},
                                     {"index": 1, "train": "done", "eval": "failed"},
                                     {"index": 2, "train": "done", "eval": "pending"},
                                     {"index": 3, "train": "failed", "eval": "cancelled"}]).eval_only == [0, 1]


def test_evaluating_again_with_an_evaluator_of_ones_own_adds_its_plugin_and_keeps_the_sweeps(
        tmp_path, synthetic_root, monkeypatch, restore_strategies, capsys):
    """A researcher's new evaluator, for models trained before it was written: `--evaluate-again eval=mine
    plugins=[masks.py,scale.py] hydra.searchpath=[file://conf]`. Plugins were refused there, and a config folder the
    sweep was not made with could not be named; a plugin that the points were trained with must stay."""
    from clustermask import evaluate
    from launch import status

    monkeypatch.setattr(evaluate, "EVALUATORS", dict(evaluate.EVALUATORS))  # the test's evaluator goes with it
    monkeypatch.setattr(evaluate, "EVALUATOR_OPTIONS", dict(evaluate.EVALUATOR_OPTIONS))
    monkeypatch.chdir(tmp_path)
    Path("masks.py").write_text("from clustermask.masking import register_strategy, score_random\n"
                                "register_strategy('kept_random')(score_random)\n")
    Path("scale.py").write_text("from clustermask.evaluate import register_evaluator\n"
                                "@register_evaluator('scale_value', options=())\n"
                                "def scale_value(model, transform, tokenizer, task, ctx):\n"
                                "    yield 'value', float(model.logit_scale.exp())\n")
    (tmp_path / "conf" / "eval").mkdir(parents=True)
    Path("conf/eval/mine.yaml").write_text(f"tasks:\n  - {{name: scale_value, dataset: own/scale, root: {tmp_path}}}\n")
    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "plugins=[masks.py]",
                           "masking.strategy=kept_random"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    run_dir = Path(manifest.points[0].run_dir)
    mark_trained(run_dir)
    before = (run_dir / "config.yaml").read_text()
    masks, scale = str(tmp_path / "masks.py"), str(tmp_path / "scale.py")

    assert status.split_searchpath(["eval=mine", "hydra.searchpath=[file://conf]"]) == (["eval=mine"],
                                                                                        [str(tmp_path / "conf")])
    with pytest.raises(ValueError, match=r"'hydra.searchpath=file://conf': hydra.searchpath is a list"):
        status.split_searchpath(["hydra.searchpath=file://conf"])
    with pytest.raises(ValueError, match=r"eval='mine': no mine.yaml in "):  # not a folder of the sweep's
        status.resubmit(sweep.sweep_dir, ["eval=mine", "plugins=[masks.py,scale.py]"], dry_run=True,
                        evaluate_again=True)
    with pytest.raises(ValueError, match=r"eval.tasks\[0\].name='scale_value' is not one of .*\(one of your own\? "
                                         r"name the file that registers it in plugins=\[\.\.\.\]\)"):
        status.resubmit(sweep.sweep_dir, ["eval=mine", "hydra.searchpath=[file://conf]"], dry_run=True,
                        evaluate_again=True)
    with pytest.raises(ValueError, match=rf"^plugins=\['{re.escape(scale)}'\] leaves out {re.escape(masks)}, which "
                                         rf"point 0 was trained with: its evaluation keeps the plugins it was trained "
                                         rf"with and adds to them, plugins=\[{re.escape(masks)}, \.\.\.\]; nothing changed$"):
        status.resubmit(sweep.sweep_dir, ["eval=mine", "plugins=[scale.py]", "hydra.searchpath=[file://conf]"],
                        dry_run=True, evaluate_again=True)
    assert (run_dir / "config.yaml").read_text() == before
    assert status.resubmit(sweep.sweep_dir, ["eval=mine", "plugins=[masks.py,scale.py]",
                                             "hydra.searchpath=[file://conf]"], dry_run=True, evaluate_again=True) is None
    assert "would resubmit:\n  eval[0]" in capsys.readouterr().out and (run_dir / "config.yaml").read_text() == before
    fixed = status.apply_overrides(manifest, [0], ["eval=mine", "plugins=[masks.py,scale.py]"],
                                   more_folders=[str(tmp_path / "conf")], trained={0})[0]
    saved = graph.load_point_config(run_dir)
    assert list(saved.plugins) == list(fixed.plugins) == [masks, scale]
    assert [task.name for task in saved.eval.tasks] == ["scale_value"] and saved.masking.strategy == "kept_random"


def test_a_fix_of_the_evaluation_data_root_moves_the_tasks_roots_with_it(tmp_path, synthetic_root):
    """The tasks' roots were resolved from data.eval_root when the sweep was made: a fix `data.eval_root=NEW`
    (the benchmarks moved) changed data.eval_root alone, and the evaluation read the old place. Now the roots under
    it follow, whether the eval group is replaced too or not; a root elsewhere stays."""
    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_root / "eval", moved)
    for fixes in ([f"data.eval_root={moved}"], ["eval=synthetic", f"data.eval_root={moved}/"]):
        evaluation = status.apply_overrides(manifest, [0], fixes, save=False)[0].eval
        assert [Path(task.root).parent for task in evaluation.tasks] == [moved] * len(evaluation.tasks)
    cfg = graph.load_point_config(Path(manifest.points[0].run_dir))
    cfg.eval.tasks[0].root = str(tmp_path / "elsewhere" / "shapes")
    status.follow_eval_root(cfg, str(synthetic_root / "nowhere"))
    assert cfg.eval.tasks[0].root == str(tmp_path / "elsewhere" / "shapes")
    cfg.data.eval_root = str(moved)
    status.follow_eval_root(cfg, str(synthetic_root / "eval"))
    assert cfg.eval.tasks[0].root == str(tmp_path / "elsewhere" / "shapes")
    assert cfg.eval.tasks[1].root == str(moved / "shapes")


def test_a_dry_run_resubmission_checks_the_fix_and_changes_or_runs_nothing(tmp_path, synthetic_root, capsys):
    """`clustermask-resubmit --dry-run` saved its fixes into the points' configs and, on a local sweep, ran the
    jobs (the local executor has no dry run)."""
    from mlflow.tracking import MlflowClient

    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    run_dir = Path(manifest.points[0].run_dir)
    mark_trained(run_dir)  # as if trained, and its evaluation failed: what would run again
    graph.mark(run_dir, "eval", "failed")
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match="eval.batch_size=0"):
        status.resubmit(sweep.sweep_dir, ["eval.batch_size=0"], dry_run=True, evaluate_again=True)
    # what the sweep fixed when it was made: a fix would be saved and do nothing (paths were resolved into the
    # configs, the runs are in the sweep's MLflow store and experiment)
    for fix, setting in (("paths.data=/elsewhere", "paths"), ("tracking.experiment=other", "tracking"),
                         ("sweep_name=other", "sweep_name")):
        with pytest.raises(ValueError, match=f"'{re.escape(fix)}': a resubmission cannot change {setting}: "):
            status.resubmit(sweep.sweep_dir, [fix], dry_run=True)
    # a bad fix is one line that names it and says why, with the keys like one that is not there
    for fix, error in (("eval.batchsize=8", "'eval.batchsize=8': Key 'batchsize' not in 'EvalConfig' (did you mean "
                                            "eval.batch_size?); nothing changed"),
                       ("+eval.batchsize=8", f"point 0 ({run_dir.name}), nothing changed: eval.batchsize is not a "
                                             "setting of EvalConfig (did you mean eval.batch_size?)"),
                       ("eval.batch_size=abc", "'eval.batch_size=abc': Value 'abc' of type 'str' could not be "
                                               "converted to Integer; nothing changed"),
                       ("~eval.amp", "override '~eval.amp' is not key=value or +key=value (a fix cannot delete a "
                                     "key)")):
        assert status.resubmit_main([str(sweep.sweep_dir), fix, "--dry-run", "--evaluate-again"]) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    assert status.resubmit(sweep.sweep_dir, ["eval.batch_size=8"], dry_run=True, evaluate_again=True) is None
    assert "dry run, nothing is changed or submitted; would resubmit:\n  eval[0]" in capsys.readouterr().out
    assert (run_dir / "config.yaml").read_text() == before
    assert graph.read_state(run_dir, "eval")["state"] == "failed" and not (run_dir / "results").exists()
    assert "resubmit_overrides" not in MlflowClient(manifest.tracking_uri).get_run(
        manifest.points[0].mlflow_run_id).data.tags
    assert graph.Manifest.load(sweep.sweep_dir).submissions == manifest.submissions


def test_relative_paths_stay_where_the_sweep_was_made_for_jobs_and_commands_run_elsewhere(tmp_path, synthetic_root,
                                                                                        monkeypatch, capsys):
    """A job reads its config's paths from its own working folder, the one its submission ran in: a sweep made
    with `paths.root=outputs paths.data=data` and resubmitted from another folder read other data or none, and a
    relative sqlite store (`tracking.uri=sqlite:///runs.db`) would have been started afresh there."""
    from mlflow.tracking import MlflowClient

    from launch import status

    made_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    made_in.mkdir()
    elsewhere.mkdir()
    (made_in / "data").symlink_to(synthetic_root)
    made = sweep_cli("paths.root=outputs", "paths.data=data", "tracking.uri=sqlite:///runs.db", "train.fail_at_step=0",
                     "sweep_name=pinned", cwd=made_in)
    sweep_dir = made_in / "outputs" / "sweeps" / "pinned"
    manifest = graph.Manifest.load(sweep_dir)
    log = Path(manifest.points[0].run_dir) / "logs" / "train.log"
    assert made.returncode == 1 and "injected failure" in log.read_text(), made.stderr
    cfg = graph.load_point_config(Path(manifest.points[0].run_dir))
    assert cfg.data.train_shards == str(made_in / "data" / "train")
    assert cfg.paths.root == str(made_in / "outputs") and cfg.data.eval_root == str(made_in / "data" / "eval")
    assert [Path(task.root).parent for task in cfg.eval.tasks] == [made_in / "data" / "eval"] * len(cfg.eval.tasks)
    assert manifest.tracking_uri == f"sqlite:///{made_in / 'runs.db'}"
    tags = MlflowClient(manifest.tracking_uri).get_run(manifest.points[0].mlflow_run_id).data.tags
    assert tags["train_state"] == "failed"  # the job wrote where the sweep's runs are
    assert list((made_in / "mlartifacts").rglob("report/results.md"))  # beside the store
    assert not (REPO / "mlruns").exists()  # MLflow's default: the tracking helper's working folder, the repository

    monkeypatch.chdir(elsewhere)
    assert status.resubmit(sweep_dir, ["train.fail_at_step=-1"], dry_run=True) is None  # preflight found the data
    assert "would resubmit" in capsys.readouterr().out
    status.apply_overrides(manifest, [0], ["data.train_shards=../project/data/train"])  # a fix's relative path
    assert graph.load_point_config(Path(manifest.points[0].run_dir)).data.train_shards == str(
        made_in / "data" / "train")
    assert not list(elsewhere.iterdir())


def test_resubmit_with_the_tracking_server_down_changes_and_submits_nothing(tmp_path, synthetic_root, monkeypatch,
                                                                             capsys):
    """Resubmitted regardless, the jobs failed at their first MLflow call; with fixes, the command waited out the
    MLflow client's retries first. Both now stop at once, naming the server."""
    from analysis.report import main as report_main
    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = Path(manifest.points[0].run_dir)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        manifest.tracking_uri = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        manifest.save()
        assert status.resubmit_main([manifest.sweep_dir]) == 2
        assert status.resubmit_main([manifest.sweep_dir, "train.lr=0.01"]) == 2
        with pytest.raises(SystemExit) as exit_info:  # the report command too, at once and in a line
            report_main([manifest.sweep_dir])
        assert exit_info.value.code == 2
        errors = capsys.readouterr().err.splitlines()
        refused = f"error: no MLflow server answers at the sweep's tracking URI {manifest.tracking_uri} ([Errno 111] " \
                  "Connection refused): start it"
        assert errors == [f"{refused}, nothing changed or submitted"] * 2 + [refused], errors
        with pytest.raises(RuntimeError, match=r"MLflow runs at http://127.0.0.1:\d+ cannot be read, nothing changed"):
            status.apply_overrides(manifest, [0], ["train.lr=0.01"])  # the server gone between the check and now
    assert graph.load_point_config(run_dir).train.lr != 0.01
    assert graph.Manifest.load(manifest.sweep_dir).submissions == [] and graph.read_state(run_dir, "train") is None


def test_one_submission_at_a_time_to_a_sweep(tmp_path, synthetic_root, capsys):
    """Two resubmissions at once found the same points unfinished and submitted each twice (two jobs training into
    one folder); a second sweep command with the same sweep_name could write its sweep over the first's."""
    from launch import status

    sweep_dir = tmp_path / "sweeps" / "default"
    with graph.submitting(sweep_dir):  # a sweep command still creating this sweep (no manifest yet)
        held = json.loads((sweep_dir / "status" / "submitting.json").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        result = sweep_cli(f"paths.root={tmp_path}", f"paths.data={synthetic_root}")
        assert result.returncode == 1, result.stderr[-3000:]
        assert result.stderr.strip() == (
            f"error: another submission to {sweep_dir} is in progress (pid {os.getpid()} on {socket.gethostname()}, "
            f"since {held['time']}); wait for it (if that process is gone, remove {sweep_dir}/status/submitting.json), "
            "nothing changed or submitted")
        assert not (sweep_dir / "manifest.json").exists()
    assert not (sweep_dir / "status" / "submitting.json").exists()
    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    graph.mark(Path(manifest.points[0].run_dir), "train", "failed")
    with graph.submitting(sweep_dir):  # a resubmission of it, in progress
        assert status.resubmit_main([str(sweep_dir)]) == 2
        assert "error: another submission to" in capsys.readouterr().err
        assert status.resubmit_main([str(sweep_dir), "--dry-run"]) == 0  # changes nothing: no need to wait
    assert graph.Manifest.load(sweep_dir).submissions == []
    assert graph.read_state(Path(manifest.points[0].run_dir), "train")["state"] == "failed"
    # a lock left by a process that is gone (killed) is taken over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (sweep_dir / "status" / "submitting.json").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with graph.submitting(sweep_dir):
        assert json.loads((sweep_dir / "status" / "submitting.json").read_text())["pid"] == os.getpid()


def test_the_sweep_commands_name_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    from analysis.report import main as report_main
    from launch import status

    assert status.main([str(tmp_path)]) == 2 and status.resubmit_main([str(tmp_path)]) == 2
    assert status.cancel_main([str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"error: {tmp_path} is not a sweep directory: it has no manifest.json"] * 4  # one message
    # `outputs/` or `outputs/sweeps/` given for one of the sweeps under it: they are named
    for name in ("b", "a"):
        (tmp_path / "sweeps" / name).mkdir(parents=True)
        (tmp_path / "sweeps" / name / "manifest.json").write_text("{}")
    for given in (tmp_path, tmp_path / "sweeps"):
        assert status.main([str(given)]) == 2
        assert capsys.readouterr().err.rstrip().endswith(
            f"(the sweeps under it: {tmp_path / 'sweeps' / 'a'}, {tmp_path / 'sweeps' / 'b'})")


def test_status_and_resubmit_refuse_when_squeue_fails(tmp_path, synthetic_root, monkeypatch, capsys):
    """slurmctld unreachable, squeue exits 1. Read as an empty queue (as before), the running training task
    looked killed, and a resubmission started it a second time, into its own run directory."""
    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    manifest.submissions.append({"train": [{"job_id": "41", "points": [0], "task_ids": ["41_0"]}],
                                 "eval": [{"job_id": "42", "points": [0], "task_ids": ["42_0"]}],
                                 "report": {"job_id": "43"}})
    manifest.save()
    graph.mark(Path(manifest.points[0].run_dir), "train", "running", job_id="41_0")
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{squeue.parent}{os.pathsep}{os.environ['PATH']}")
    assert status.main([manifest.sweep_dir]) == 2
    assert status.resubmit_main([manifest.sweep_dir]) == 2
    refusal = "squeue failed (exit 1: slurm_load_jobs error: Unable to contact slurm controller)"
    assert capsys.readouterr().err.count(refusal) == 2
    assert len(graph.Manifest.load(manifest.sweep_dir).submissions) == 1


def test_status_shows_several_sweeps_and_still_shows_the_others_when_one_is_not_a_sweep(tmp_path, synthetic_root,
                                                                                         capsys):
    """`clustermask-status A B` as `clustermask-report A B`: seeds added later as a sweep of their own are
    followed in one call. A folder that is not a sweep is named, and the others are shown all the same."""
    from launch import status

    sweeps = []
    for name in ("first", "more_seeds"):
        sweep = compose_sweep([f"paths.root={tmp_path / name}", f"paths.data={synthetic_root}",
                               f"sweep_name={name}"])
        sweeps.append(app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere()))
    graph.mark(Path(sweeps[0].points[0].run_dir), "train", "done", job_id="local")
    graph.mark(Path(sweeps[0].points[0].run_dir), "eval", "done", job_id="local")
    assert status.main([sweeps[0].sweep_dir, sweeps[1].sweep_dir, sweeps[0].sweep_dir]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("sweep ")]
    assert headers == [f"sweep {m.sweep_id} (local) in {m.sweep_dir}" for m in sweeps]  # the repeated one once
    assert "1/1 point(s) evaluated" in out.split(headers[1])[0] and "0/1 point(s) evaluated" in out.split(headers[1])[1]
    graph.mark(Path(sweeps[1].points[0].run_dir), "train", "failed", job_id="local", log="train.log")
    assert status.main([sweeps[0].sweep_dir, sweeps[1].sweep_dir]) == 1
    assert "train failed, log: train.log" in capsys.readouterr().out
    assert status.main([sweeps[0].sweep_dir, str(tmp_path), sweeps[1].sweep_dir]) == 2
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("sweep ")] == headers
    assert captured.err.startswith("error: ") and str(tmp_path) in captured.err
    graph.mark(Path(sweeps[1].points[0].run_dir), "train", "cancelled", job_id="local")
    assert status.main([sweeps[1].sweep_dir]) == 0  # cancelled is not failed
    with pytest.raises(SystemExit):
        status.main(["--help"])
    assert "Exit status: 0 when no stage failed, 1 when one did, 2 when a sweep could not be read." in \
        " ".join(capsys.readouterr().out.split())


def test_status_without_squeue_shows_what_the_tasks_wrote_and_resubmit_refuses(tmp_path, synthetic_root,
                                                                                monkeypatch, capsys):
    """A SLURM sweep copied to a laptop: status shows the stages whose tasks wrote their last state, the others
    unknown (neither pending nor killed); resubmission still needs squeue."""
    from launch import status

    sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm",
                           "masking.ratio=0.3,0.5"])
    manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
    manifest.submissions.append({"train": [{"job_id": "41", "points": [0, 1], "task_ids": ["41_0", "41_1"]}],
                                 "eval": [{"job_id": "42", "points": [0, 1], "task_ids": ["42_0", "42_1"]}],
                                 "report": {"job_id": "43"}})
    manifest.save()
    first, second = (Path(point.run_dir) for point in manifest.points)
    mark_trained(first, job_id="41_0")  # its checkpoint copied with the sweep
    graph.mark(first, "eval", "failed", job_id="42_0", log="eval.log")
    graph.mark(second, "train", "running", job_id="41_1")
    python_only = tmp_path / "python_only"
    python_only.mkdir()
    (python_only / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(python_only))
    assert status.main([manifest.sweep_dir]) == 1  # the failed evaluation
    out = capsys.readouterr().out
    assert out.startswith("squeue not found here")
    rows = {line.split()[0]: line.split()[2:4] for line in out.splitlines() if line.split()[0] in ("0", "1")}
    assert rows == {"0": ["done", "failed"], "1": ["unknown", "unknown"]}
    assert "report unknown (job 43)" in out
    assert status.resubmit_main([manifest.sweep_dir]) == 2
    assert "squeue not found" in capsys.readouterr().err


def test_status_of_several_slurm_sweeps_asks_squeue_once(tmp_path, synthetic_root, monkeypatch, capsys):
    """squeue lists every user's jobs (seconds of a busy controller's time): `clustermask-status A B C` asked it once
    per sweep. Here an squeue on PATH that counts its calls and lists the sweeps' training tasks as pending."""
    from launch import status

    sweep_dirs = []
    for number, name in enumerate(("first", "second")):
        sweep = compose_sweep([f"paths.root={tmp_path}", f"paths.data={synthetic_root}", "launcher=slurm",
                               f"sweep_name={name}"])
        manifest = app.create_sweep(sweep.sweep_dir, sweep.points, TrackingHere())
        train, evaluate, report = (str(10 * number + job) for job in (1, 2, 3))
        manifest.submissions.append({"train": [{"job_id": train, "points": [0], "task_ids": [f"{train}_0"]}],
                                     "eval": [{"job_id": evaluate, "points": [0], "task_ids": [f"{evaluate}_0"]}],
                                     "report": {"job_id": report}})
        manifest.save()
        sweep_dirs.append(manifest.sweep_dir)
    calls = tmp_path / "squeue_calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text(f"#!/bin/sh\necho called >> {calls}\n"
                                 "printf '1_0 PENDING Resources\\n2_0 PENDING Dependency\\n3 PENDING Dependency\\n"
                                 "11_0 PENDING Resources\\n12_0 PENDING Dependency\\n13 PENDING Dependency\\n'\n")
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    assert status.main(sweep_dirs) == 0
    out = capsys.readouterr().out
    assert out.count("pending (Resources)") == 2 and out.count("report pending (Dependency)") == 2, out
    assert calls.read_text().count("called") == 1


def test_a_failed_write_keeps_the_previous_marker_and_config(tmp_path, monkeypatch):
    """A disk that fills up mid-write must not leave a half-written status marker (clustermask-status would
    crash on it) or point config (the task could not start again)."""
    graph.mark(tmp_path, "train", "running", job_id="12_0")
    graph.save_point_config(tmp_path, {"train": {"lr": 0.001}})
    write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    for write in (lambda: graph.mark(tmp_path, "train", "done"),
                  lambda: graph.save_point_config(tmp_path, {"train": {"lr": 0.01}})):
        with pytest.raises(OSError, match="No space"):
            write()
    monkeypatch.undo()
    assert graph.read_state(tmp_path, "train")["state"] == "running"
    assert OmegaConf.load(tmp_path / "config.yaml").train.lr == 0.001
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
