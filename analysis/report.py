"""MLflow -> tidy DataFrame -> the paper's tables (Markdown, LaTeX, CSV) and plots (PNG).

    clustermask-report SWEEP_DIR                              # what the report job of a sweep runs
    clustermask-report SWEEP_DIR SWEEP_DIR ... --out DIR      # one table over several sweeps (seeds added later)
"""
from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from clustermask.config import LOADER_BOUND  # noqa: E402
from clustermask.files import read_manifest_file, sqlite_path, where_the_sweep_is  # noqa: E402
from clustermask.tracking import FIXED_SETTINGS_TAG, require_server  # noqa: E402

# code: which code each point trained with (`code_version`)
# hardware: what each point trained on (`hardware_note`)
POINT_COLUMNS = ["sweep", "point", "strategy", "features", "ratio", "attention", "seed", "status", "code", "hardware"]
DESCRIBED = POINT_COLUMNS + ["run_id", "label"]  # a point frame's columns before its metrics
HEADLINE = [  # (task, metric, column) in table order: a column per evaluated dataset, named after it if several
    ("zeroshot_classification", "acc1", "zs_acc1"),
    ("linear_probe", "lp_acc1", "lp_acc1"),
    # clip_benchmark's "text retrieval" finds an image's captions (image -> text), its "image retrieval" a
    # caption's image (text -> image)
    ("zeroshot_retrieval", "text_retrieval_recall_at_1", "i2t_r1"),
    ("zeroshot_retrieval", "image_retrieval_recall_at_1", "t2i_r1"),
]
SUGARCREPE = "image_caption_selection/sugar_crepe/"
TRAIN_MINUTES = "train/minutes"  # what a point cost: masking is there to make training cheaper
DATA_WAIT = "train/data_wait_share"  # at the last log: the share of the loop's time spent waiting for the loader


# the params a point's label shows by their own (strategy_label) or that are the table's own columns
IN_LABEL = ("masking.strategy", "masking.features", "masking.attention", "masking.ratio", "train.seed")
# params that say where a point was recorded, how it was evaluated or how its training was logged and run, not how
# its model was trained: sweeps reported together differ in them (sweep_name, tracking.experiment) and their points
# are still comparable
NOT_SETTINGS = ("sweep_name", "tracking.", "eval.", "report.", "data.eval_root", "train.log_every", "train.threads",
                "train.fail_at_step")


def strategy_label(row) -> str:
    if row["strategy"] == "cluster":
        return f"cluster-{row['features']}" + ("-attn" if str(row.get("attention")) == "True" else "")
    return str(row["strategy"])


def swept_settings(runs: pd.DataFrame, strategies: pd.Series) -> pd.Series:
    """Per run, `name=value` for every param that differs between the runs, besides ratio and seed (a sweep of
    masking.threshold, masking.kmeans_k or train.lr): a label without them would merge different settings into
    one line of a plot and one group of the mean over seeds, or compare strategies trained otherwise (sweeps of
    different `train.steps` reported together) as if alike. A masking setting counts where it differs between the
    runs of one strategy: the others record it at a fixed value that they do not use."""
    params = sorted(c for c in runs.columns if c.startswith("params.") and c[len("params."):] not in IN_LABEL
                    and not c[len("params."):].startswith(NOT_SETTINGS))  # MLflow gives them in no set order
    everywhere = {c for c in params if not c.startswith("params.masking.") and runs[c].nunique(dropna=False) > 1}
    settings = pd.Series("", index=runs.index)
    for _, group in runs.groupby(strategies):
        varying = [c for c in params if c in everywhere or group[c].nunique(dropna=False) > 1]
        for index, row in group[varying].iterrows():
            settings[index] = " ".join(f"{c.split('.')[-1]}={row[c]}" for c in varying)
    return settings


def point_runs(tracking_uri: str, experiment: str, sweep_id: str) -> pd.DataFrame:
    """The sweep's point runs as MLflow's search_runs gives them (params.*, metrics.*, tags.* columns)."""
    import mlflow

    store = sqlite_path(tracking_uri)
    if store is not None and not store.is_file():  # MLflow would create an empty store there, and find no run
        raise FileNotFoundError(f"no MLflow store at {store} (a sweep copied without its mlflow.db?)")
    require_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_names=[experiment],
                              filter_string=f"tags.sweep_id = '{sweep_id}' and tags.kind = 'point'",
                              output_format="pandas")


def sweep_frame(tracking_uri: str, experiment: str, sweep_id: str) -> pd.DataFrame:
    """One row per point: what it was (strategy, ratio, ...) and every metric's last value."""
    return points_frame(point_runs(tracking_uri, experiment, sweep_id))


def code_version(code_folder: Optional[str], plugins: Optional[str]) -> str:
    """What a point trained with, from its run's tags: the digest of its submission's copy of the code
    (`train_code`, launch/snapshot.py), then `+<file>@<digest>` for each plugin (`train_plugins`, read when the job
    started); "" where a run has neither tag (made before they were)."""
    parts = [Path(code_folder).name] if isinstance(code_folder, str) and code_folder else []
    # `entry@digest entry@digest`, an entry's path possibly with spaces (clustermask.plugins.fingerprint)
    fingerprint = plugins if isinstance(plugins, str) else ""
    for entry, digest in re.findall(r"(.+?)@([0-9a-f]{12}|unknown)(?: |$)", fingerprint):
        parts.append(f"{Path(entry).name}@{digest}")
    return "+".join(parts)


def with_fixed_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with each run's params as its training ran with them: a resubmission's fixes (a failed point
    trained again at another learning rate, say), which its training job tagged (FIXED_SETTINGS_TAG), in place of
    the values the run was created with."""
    column = f"tags.{FIXED_SETTINGS_TAG}"
    runs = runs.copy()
    for index, fixed in runs.get(column, pd.Series(dtype=object)).dropna().items():
        for key, value in json.loads(fixed).items():
            if f"params.{key}" not in runs.columns:
                runs[f"params.{key}"] = None
            runs.at[index, f"params.{key}"] = value
    return runs


def points_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of `runs` (one sweep's, or several sweeps' together, so that labels tell apart the
    settings that differ between them), each with the settings it trained with."""
    if runs.empty:
        return pd.DataFrame(columns=DESCRIBED)
    runs = with_fixed_settings(runs.reset_index(drop=True))
    frame = pd.DataFrame({
        "sweep": runs["tags.sweep_id"],
        "point": runs["tags.mlflow.runName"],
        "strategy": runs["params.masking.strategy"],
        "features": runs["params.masking.features"],
        "ratio": runs["params.masking.ratio"].astype(float),
        "attention": runs["params.masking.attention"],
        "seed": runs["params.train.seed"].astype(int),
        "status": runs["status"],
        "code": [code_version(*tags) for tags in  # NaN where a run lacks a tag
                 runs.reindex(columns=["tags.train_code", "tags.train_plugins"]).itertuples(index=False)],
        "hardware": runs.reindex(columns=["tags.train_hardware"]).iloc[:, 0].fillna(""),
        "run_id": runs["run_id"],
    })
    # a metric that no run has a value of: an evaluation's that was superseded (logged NaN when evaluated again)
    metrics = runs[[c for c in runs.columns if c.startswith("metrics.")]].dropna(axis=1, how="all")
    metrics.columns = [c[len("metrics."):] for c in metrics.columns]
    frame = pd.concat([frame, metrics], axis=1)
    strategies = frame.apply(strategy_label, axis=1)
    frame["label"] = (strategies + " " + swept_settings(runs, strategies)).str.strip()
    # then the metrics, in name order (MLflow gives them unordered)
    frame = frame[DESCRIBED + sorted(c for c in frame.columns if c not in DESCRIBED)]
    return frame.sort_values(["label", "ratio", "seed"]).reset_index(drop=True)


def short_names(datasets) -> Dict[str, str]:
    """Dataset -> its name in a column: the last part (`wds/cifar10`: `cifar10`) where no other of `datasets` ends
    the same (`wds/cifar10` beside `cifar10`, clip_benchmark's two layouts of it: `wds_cifar10`, `cifar10`), so
    that no column takes the place of another."""
    last = {dataset: dataset.split("/")[-1] for dataset in datasets}
    taken = collections.Counter(last.values())
    return {dataset: name if taken[name] == 1 else dataset.replace("/", "_") for dataset, name in last.items()}


def headline_columns(frame: pd.DataFrame) -> Dict[str, str]:
    """Metric key (`<task>/<dataset>/<metric>`) -> column name, for the headline metrics the sweep has."""
    columns = {}
    for task, metric, name in HEADLINE:
        keys = sorted(c for c in frame.columns if c.startswith(f"{task}/") and c.endswith(f"/{metric}"))
        datasets = {key: key[len(task) + 1:-len(metric) - 1] for key in keys}
        names = short_names(datasets.values())
        for key in keys:
            columns[key] = name if len(keys) == 1 else f"{name}_{names[datasets[key]]}"
    return columns


def headline_table(frame: pd.DataFrame, asked: Sequence[str] = ()) -> pd.DataFrame:
    """A row per point, a column per headline metric and dataset, SugarCrepe per edit and its mean, the metrics
    `asked` for (`--metric`, `report.plot_metric`: an evaluator of one's own) that are none of those, under their
    key, then the training loop's wall-clock minutes."""
    columns = headline_columns(frame)
    sugar = sorted(c for c in frame.columns if c.startswith(SUGARCREPE) and c.endswith("/acc"))
    table = frame[["label", "ratio", "seed"]].copy()
    for key, name in columns.items():
        table[name] = frame[key]
    for key in sugar:
        table["sc_" + key.split("/")[-2]] = frame[key]
    if sugar:  # over every edit, or none: a mean over the edits one point happens to have compares with nothing
        table["sc_mean"] = frame[sugar].mean(axis=1, skipna=False)
    for key in asked:
        if key in frame and key not in columns and key not in sugar and key != TRAIN_MINUTES:
            table[key] = frame[key]
    if TRAIN_MINUTES in frame:
        table["train_min"] = frame[TRAIN_MINUTES]
    return table


RECALL = re.compile(r"zeroshot_retrieval/(.+)/(text|image)_retrieval_recall_at_(\d+)$")


def retrieval_table(frame: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The paper's retrieval table: per dataset, image -> text then text -> image recall at every k evaluated
    (`mscoco_captions_i2t_r5`); None when the sweep evaluated no retrieval."""
    found = sorted({(m[1], m[2] == "image", int(m[3])) for m in map(RECALL.match, frame.columns) if m})
    if not found:
        return None
    table = frame[["label", "ratio", "seed"]].copy()
    names = short_names({dataset for dataset, _, _ in found})
    for dataset, text_to_image, k in found:
        kind = "image" if text_to_image else "text"
        column = f"{names[dataset]}_{'t2i' if text_to_image else 'i2t'}_r{k}"
        table[column] = frame[f"zeroshot_retrieval/{dataset}/{kind}_retrieval_recall_at_{k}"]
    return table


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """A row per (label, ratio): how many seeds, and every metric column of `table` as `mean ± std` over
    them (the mean alone for one seed; empty where no seed has the metric)."""
    metrics = [c for c in table.columns if c not in ("label", "ratio", "seed")]
    grouped = table.groupby(["label", "ratio"], sort=True)
    summary = grouped.size().rename("seeds").reset_index()
    for column in metrics:
        means, stds, counts = grouped[column].mean(), grouped[column].std(), grouped[column].count()
        summary[column] = [mean_cell(m, sd, n, seeds)
                           for m, sd, n, seeds in zip(means.values, stds.values, counts.values, summary["seeds"])]
    return summary


def mean_cell(mean: float, std: float, count: int, seeds: int) -> str:
    """`mean ± std`, the mean alone for one value, "" for none; ` (n=2)` where fewer of the row's seeds have the
    metric (an evaluation not finished or failed): the row's `seeds` would otherwise claim them all."""
    if pd.isna(mean):
        return ""
    cell = f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"
    note = fewer_of(count, seeds)
    return cell + (f" ({note})" if note else "")


def fewer_of(count: int, seeds: int) -> str:
    """`n=k` where a mean is over `count` values, fewer than the row's `seeds`; '' where it is over them all."""
    return f"n={count}" if count < seeds else ""


def save_plot(fig, ax, xlabel: str, metric: str, path: Path, title: Optional[str] = None) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.split("/")[-1])
    ax.set_title(title or metric, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_metric(frame: pd.DataFrame, metric: str, path: Path, title: Optional[str] = None) -> Path:
    """`metric` against mask ratio, a line per strategy (mean over seeds), with bars of ± one std where a ratio
    has several seeds."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xlabel = "mask ratio"
    measured = frame.dropna(subset=[metric]) if metric in frame else frame.iloc[:0]
    counts = seed_counts(frame, metric)
    if not measured.empty and measured.groupby("label")["ratio"].nunique().max() == 1:
        xlabel = plot_per_label(ax, measured, metric, counts)
    else:
        for label, group in measured.groupby("label"):
            by_ratio = group.groupby("ratio")[metric]
            means, stds = by_ratio.mean().sort_index(), by_ratio.std().sort_index()
            line, = ax.plot(means.index, means.values, marker="o", label=label)
            if stds.notna().any():
                ax.errorbar(means.index, means.values, yerr=stds.values, fmt="none", ecolor=line.get_color(),
                            capsize=3, alpha=0.7)
            mark_fewer_seeds(ax, counts, [((label, ratio), ratio, mean) for ratio, mean in means.items()],
                             line.get_color())
    _, *dataset, name = metric.split("/")
    chance = f"zeroshot_classification/{'/'.join(dataset)}/chance"
    if chance in frame and name.endswith("acc1"):
        ax.axhline(frame[chance].mean(), ls="--", c="grey", label="chance")
    return save_plot(fig, ax, xlabel, metric, path, title)


def plot_per_label(ax, frame: pd.DataFrame, metric: str, counts: pd.DataFrame) -> str:
    """`metric` per label side by side (mean over seeds, ± one std), where each label was trained at one ratio (an
    ablation of cluster features at 0.5): against the ratio, every label would be one point, on top of the others.
    Returns the x axis' name."""
    stats = frame.groupby("label").agg(ratio=("ratio", "first"), mean=(metric, "mean"), std=(metric, "std"))
    one_ratio = stats["ratio"].nunique() == 1
    for x, (label, row) in enumerate(stats.iterrows()):
        ax.errorbar([x], [row["mean"]], yerr=[row["std"]], fmt="o", capsize=4, color=f"C{x}", label=label)
        mark_fewer_seeds(ax, counts, [((label, row["ratio"]), x, row["mean"])], f"C{x}")
    ax.set_xticks(range(len(stats)), [label if one_ratio else f"{label}\n{ratio:g}"
                                      for label, ratio in stats["ratio"].items()], fontsize=7)
    ax.set_xlim(-0.6, len(stats) - 0.4)
    return f"mask ratio {stats['ratio'].iloc[0]:g}" if one_ratio else "strategy, mask ratio"


def seed_counts(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (label, ratio): its points (`seeds`) and how many of them have `metric` (`count`)."""
    grouped = frame.groupby(["label", "ratio"])
    measured = grouped[metric].count() if metric in frame else grouped.size() * 0
    return pd.DataFrame({"seeds": grouped.size(), "count": measured})


def fewer_seeds(counts: pd.DataFrame, key) -> str:
    """`n=k` where a mean is over fewer of (label, ratio) `key`'s seeds than it has, as the tables mark it."""
    return fewer_of(*counts.loc[key, ["count", "seeds"]])


def mark_fewer_seeds(ax, counts: pd.DataFrame, points, color: str) -> None:
    """Writes `n=k`, in its line's colour, beside each plotted mean ((label, ratio), x, y) that is over fewer seeds
    than its row has."""
    for key, x, y in points:
        note = fewer_seeds(counts, key)
        if note:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)


def plot_against_training_time(frame: pd.DataFrame, metric: str, path: Path) -> Path:
    """What masking trades: `metric` against the training loop's minutes, a line per strategy through its
    ratios (means over seeds, each point marked with its ratio)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    counts = seed_counts(frame, metric)
    for label, group in frame.groupby("label"):
        means = group.groupby("ratio")[[TRAIN_MINUTES, metric]].mean().dropna().sort_values(TRAIN_MINUTES)
        ax.plot(means[TRAIN_MINUTES].values, means[metric].values, marker="o", label=label)
        for ratio, row in means.iterrows():
            note = " ".join(filter(None, [f"{ratio:g}", fewer_seeds(counts, (label, ratio))]))
            ax.annotate(note, (row[TRAIN_MINUTES], row[metric]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    return save_plot(fig, ax, "training minutes (mean over seeds; points: mask ratio)", metric, path)


def loader_bound_note(frame: pd.DataFrame) -> Optional[str]:
    """A line naming the points whose training waited for its loader for more than LOADER_BOUND of its last log
    interval: their `train_min` says how fast the loader was as much as how cheap the masking made the step."""
    if DATA_WAIT not in frame:
        return None
    bound = frame[frame[DATA_WAIT] > LOADER_BOUND]
    if bound.empty:
        return None
    points = ", ".join(f"{r.label} {r.ratio:g} seed {r.seed} ({wait:.0%})"
                       for r, wait in zip(bound.itertuples(), bound[DATA_WAIT]))
    return (f"report: {len(bound)} point(s) waited for their loader more than {LOADER_BOUND:.0%} of the time at their "
            f"last log, so their train_min is the loader's as much as the masking's: {points} (more data.workers and "
            "cores per task would train them faster)")


def named_points(rows: pd.DataFrame, most: int = 6) -> str:
    """`random 0.5 seed 0, ...`: a few of the points (a sweep may have 64), and how many more."""
    points = [f"{r.label} {r.ratio:g} seed {r.seed}" for r in rows.itertuples()]
    return ", ".join(points[:most]) + (f" and {len(points) - most} more" if len(points) > most else "")


def missing_metrics_note(table: pd.DataFrame) -> Optional[str]:
    """A line naming the points that lack a headline metric other points have: their evaluation has not finished
    or failed (a report built while a sweep runs, or the report job's after a failed evaluation); the means over
    seeds leave them out (cells marked `(n=k)`)."""
    metrics = [c for c in table.columns if c not in ("label", "ratio", "seed", "train_min")]
    if not metrics and not table.empty:
        return f"report: none of the {len(table)} point(s) has evaluation metrics yet (clustermask-status says why)"
    lacking = table[table[metrics].isna().any(axis=1)]
    if lacking.empty:
        return None
    return (f"report: {len(lacking)} of {len(table)} point(s) lack metrics that others have (an evaluation not "
            f"finished or failed, which clustermask-status shows, or sweeps evaluated on other tasks), and the means "
            f"over seeds leave them out, marked (n=k): {named_points(lacking)}")


def points_by(frame: pd.DataFrame, column: str) -> Optional[Tuple[int, str]]:
    """Where the points tagged in `column` (a run without the tag has '') do not all share one value: how many
    values, and `value: points; ...` naming the points of each; None where they share one."""
    tagged = frame[frame[column].astype(bool)] if column in frame else None
    if tagged is None or tagged[column].nunique() < 2:
        return None
    return tagged[column].nunique(), "; ".join(f"{value}: {named_points(rows)}"
                                              for value, rows in tagged.groupby(column, sort=False))


def code_versions_note(frame: pd.DataFrame) -> Optional[str]:
    """A line naming which points trained with which version of the code, when they did not all train with one
    (points resubmitted after an edit, or sweeps reported together): their metrics may differ by the edit."""
    versions = points_by(frame, "code")
    if versions is None:
        return None
    return (f"report: the points trained with {versions[0]} versions of the code (the digest of "
            "<sweep_dir>/code/<digest>, one per submission of edited code, and of each plugin file as the job read "
            f"it), so their metrics may differ by the edits: {versions[1]}")


def hardware_note(frame: pd.DataFrame) -> Optional[str]:
    """A line naming which points trained on which hardware, when not all on one (a partition of mixed GPUs, a
    point requeued onto other nodes, sweeps run on two clusters reported together): their train_min compares the
    hardware as much as the masking."""
    kinds = points_by(frame, "hardware")
    if kinds is None:
        return None
    return (f"report: the points trained on {kinds[0]} kinds of hardware, so their train_min compares the hardware "
            f"as much as the masking: {kinds[1]}")


def latex_table(rows: pd.DataFrame) -> str:
    """`rows` as a LaTeX tabular (booktabs) that compiles: column names and labels escaped (`zs\\_acc1`; pandas
    escapes nothing unless asked), `±` as `$\\pm$`."""
    return rows.to_latex(index=False, float_format="%.3f", escape=True).replace("±", r"$\pm$")


def write_table_and_mean(rows: pd.DataFrame, out_dir: Path, name: str) -> List[Path]:
    """`name`.md/.tex, a row per point, and `name`_mean.md/.tex, `mean ± std` over seeds."""
    written = []
    for stem, table in ((name, rows), (f"{name}_mean", seed_summary(rows))):
        (out_dir / f"{stem}.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
        (out_dir / f"{stem}.tex").write_text(latex_table(table))
        written += [out_dir / f"{stem}.md", out_dir / f"{stem}.tex"]
    return written


def write_tables(table: pd.DataFrame, frame: pd.DataFrame, out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "results_all_metrics.csv"
    frame.to_csv(csv, index=False)
    written = [csv] + write_table_and_mean(table, out_dir, "results")
    retrieval = retrieval_table(frame)
    if retrieval is not None:
        written += write_table_and_mean(retrieval, out_dir, "results_retrieval")
    return written


def default_plot_metrics(frame: pd.DataFrame) -> List[str]:
    """Zero-shot and linear-probe accuracy on every dataset, and SugarCrepe's swap-attribute accuracy."""
    keys = [k for k in headline_columns(frame) if k.startswith(("zeroshot_classification/", "linear_probe/"))]
    swap_att = SUGARCREPE + "swap_att/acc"
    return keys + ([swap_att] if swap_att in frame else [])


def missing_metric(frame: pd.DataFrame, metric: str) -> str:
    """`no metric 'X' in this sweep`, with the sweep's metrics closest to the name asked for."""
    import difflib

    recorded = [c for c in frame.columns if "/" in c]
    close = difflib.get_close_matches(metric, recorded, n=3, cutoff=0.6)
    return f"no metric {metric!r} in this sweep" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")


def build_report(sweep_dirs, plot_metrics: Optional[List[str]] = None, out_dir: Optional[Path] = None) -> Path:
    """The report of one sweep directory, or of several together (a list; `out_dir` then required). Reads each
    manifest.json for its MLflow location; writes `out_dir` (default <sweep_dir>/report/) and returns it.
    Plots the default metrics and `plot_metrics` against the mask ratio, and gives the latter a column in the tables."""
    sweep_dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]
    sweep_dirs = list(dict.fromkeys(d.resolve() for d in sweep_dirs))  # a sweep named twice counts once
    if out_dir is None and len(sweep_dirs) > 1:
        raise ValueError(f"a report of {len(sweep_dirs)} sweeps needs an output directory (--out)")
    manifests = [read_manifest(d) for d in sweep_dirs]
    out_dir = report_folder(Path(out_dir) if out_dir is not None else sweep_dirs[0] / "report")
    runs = [point_runs(m["tracking_uri"], m["experiment"], m["sweep_id"]) for m in manifests]
    recorded = [r for r in runs if not r.empty]
    frame = points_frame(pd.concat(recorded, ignore_index=True) if recorded else runs[0])
    table = headline_table(frame, plot_metrics or [])
    written = write_tables(table, frame, out_dir)
    for metric in dict.fromkeys(default_plot_metrics(frame) + list(plot_metrics or [])):
        if metric not in frame:
            print(f"report: {missing_metric(frame, metric)}, not plotted")
            continue
        written.append(plot_metric(frame, metric, out_dir / f"{metric.replace('/', '_')}.png"))
    if TRAIN_MINUTES in frame:
        for metric in (k for k in headline_columns(frame) if k.startswith("zeroshot_classification/")):
            written.append(plot_against_training_time(
                frame, metric, out_dir / f"{metric.replace('/', '_')}_vs_train_minutes.png"))
    for manifest in manifests:
        written += _copy_mask_pictures(manifest, out_dir, f"{manifest['sweep_id']}_" if len(manifests) > 1 else "")
    removed = remove_stale_files(out_dir, written)
    for note in (unrecorded_points_note(manifests, frame), missing_metrics_note(table), loader_bound_note(frame),
                 code_versions_note(frame), hardware_note(frame), stale_files_note(removed)):
        if note:
            print(note)
    repeated = table[table.duplicated(["label", "ratio", "seed"], keep=False)]
    if not repeated.empty:
        print(f"report: {len(repeated)} points share a label, ratio and seed; the "
              "mean over seeds counts each: " + ", ".join(sorted({f"{r.label} {r.ratio} seed {r.seed}"
                                                                  for r in repeated.itertuples()})))
    print(f"report: {len(frame)} point(s) of {len(manifests)} sweep(s) -> {out_dir}")
    return out_dir


def unrecorded_points_note(manifests: List[dict], frame: pd.DataFrame) -> str:
    """The points of the sweeps whose MLflow run is not among the runs read (deleted in the MLflow UI: search_runs
    leaves deleted runs out), which the report would otherwise leave out without a word; '' if none."""
    read = set(frame["run_id"])
    missing = [(m["tracking_uri"], p) for m in manifests for p in m["points"]
               if p.get("mlflow_run_id") and p["mlflow_run_id"] not in read]
    if not missing:
        return ""
    return (f"report: {len(missing)} point(s) have no active MLflow run and are left out (deleted in the MLflow UI? "
            f"`mlflow.MlflowClient(URI).restore_run(RUN_ID)` brings one back): "
            + ", ".join(f"{point['name']} (run {point['mlflow_run_id']} in {uri})" for uri, point in missing))


WRITTEN = ".report_files"  # in the report's folder: the names of the files that the last report built there wrote


def remove_stale_files(out_dir: Path, written: Sequence[Optional[Path]]) -> List[str]:
    """Remove the files that the report last built in `out_dir` wrote and this one did not (the plot and tables of a
    benchmark no longer evaluated, the masks of a sweep no longer reported with it), never another file (a folder
    `--out paper/` also holds the paper's), and record this one's. Returns the names removed."""
    listing = out_dir / WRITTEN
    earlier = listing.read_text().split("\n") if listing.is_file() else []
    names = sorted({path.name for path in written if path is not None})
    stale = [name for name in earlier if name and name not in names and (out_dir / name).is_file()]
    for name in stale:
        (out_dir / name).unlink()
    listing.write_text("".join(f"{name}\n" for name in names))
    return stale


def stale_files_note(removed: List[str]) -> str:
    return (f"report: removed {len(removed)} file(s) that the report before this one wrote and this one has not (a "
            f"benchmark no longer evaluated, a --metric not asked for again, a sweep no longer reported): "
            f"{', '.join(removed)}") if removed else ""


def report_folder(out_dir: Path) -> Path:
    """`out_dir`, made if it is not there; before MLflow is read, an error naming it where it cannot hold the report
    (a file of that name, a folder that cannot be made)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the report's folder {out_dir} is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot make the report's folder {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def read_manifest(sweep_dir: Path) -> dict:
    return where_the_sweep_is(read_manifest_file(sweep_dir), Path(sweep_dir))


def _copy_mask_pictures(manifest: dict, out_dir: Path, prefix: str = "") -> List[Path]:
    import shutil

    copies = []
    for point in manifest["points"]:
        picture = Path(point["run_dir"]) / "masks.png"
        if picture.exists():
            copies.append(Path(shutil.copy(picture, out_dir / f"masks_{prefix}{point['name']}.png")))
    return copies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Tables and plots of a sweep (or of several together) from MLflow")
    parser.add_argument("sweep_dirs", nargs="+", metavar="sweep_dir")
    parser.add_argument("--out", type=Path, help="output directory (default SWEEP_DIR/report; required for "
                        "several sweeps)")
    parser.add_argument("--metric", action="append",
                        help="a metric key to plot against the mask ratio besides the defaults (repeatable)")
    args = parser.parse_args(argv)
    try:
        out = build_report(args.sweep_dirs, args.metric, args.out)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
