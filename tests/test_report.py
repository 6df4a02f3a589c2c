import pandas as pd
import pytest
import torch
from clip_benchmark.metrics import zeroshot_retrieval

from analysis.report import (SUGARCREPE, code_versions_note, default_plot_metrics, hardware_note, headline_table,
                             loader_bound_note, missing_metric)
from clustermask.evaluate import EvalTask, metric_key

# two images and one caption each; caption b is closest to image A, so the directions disagree:
# text -> image: a finds A, b finds A (wrong): 0.5; image -> text: A finds b (wrong), B finds a (wrong): 0.0
IMAGES = {0: (1.0, 0.0), 1: (0.0, 1.0)}
CAPTIONS = {"a": (1.0, 0.9), "b": (1.0, 0.05)}


class Embeddings(torch.nn.Module):
    def encode_image(self, index):
        return torch.tensor([IMAGES[int(i)] for i in index])

    def encode_text(self, index):
        return torch.tensor([list(CAPTIONS.values())[int(i)] for i in index])


def test_retrieval_columns_name_the_direction_clip_benchmark_measured():
    loader = [(torch.tensor([0, 1]), [["a"], ["b"]])]
    tokenize = lambda texts: torch.tensor([list(CAPTIONS).index(t) for t in texts])  # noqa: E731
    metrics = zeroshot_retrieval.evaluate(Embeddings(), loader, tokenize, "cpu", amp=False, recall_k_list=[1])
    task = EvalTask("zeroshot_retrieval", "wds/scenes", "")
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0,
                           **{metric_key(task, name): value for name, value in metrics.items()}}])
    row = headline_table(frame).iloc[0]
    assert row["t2i_r1"] == 0.5 and row["i2t_r1"] == 0.0


def test_headline_has_a_column_per_dataset_named_after_it_when_there_are_several():
    """A paper sweep evaluates zero-shot on many datasets: each gets its column (and a plot); a task evaluated
    on one dataset keeps the short name. The training time comes last."""
    metrics = {"zeroshot_classification/wds/imagenet1k/acc1": 0.3, "zeroshot_classification/wds/cifar10/acc1": 0.6,
               "zeroshot_retrieval/wds/mscoco_captions/text_retrieval_recall_at_1": 0.2,
               "image_caption_selection/sugar_crepe/swap_att/acc": 0.7, "train/minutes": 95.5, "train/loss": 2.0}
    frame = pd.DataFrame([{"label": "cluster-rgb", "ratio": 0.5, "seed": 0, **metrics}])
    row = headline_table(frame).iloc[0].to_dict()
    assert row == {"label": "cluster-rgb", "ratio": 0.5, "seed": 0, "zs_acc1_cifar10": 0.6, "zs_acc1_imagenet1k": 0.3,
                   "i2t_r1": 0.2, "sc_swap_att": 0.7, "sc_mean": 0.7, "train_min": 95.5}
    assert default_plot_metrics(frame) == ["zeroshot_classification/wds/cifar10/acc1",
                                           "zeroshot_classification/wds/imagenet1k/acc1",
                                           "image_caption_selection/sugar_crepe/swap_att/acc"]
    # a metric asked for (--metric: an evaluator of one's own) gets a column before the minutes, once; a headline
    # one, or one the sweep lacks, none of its own
    frame["logit_scale/own/scale/value"] = 14.2
    asked = ["logit_scale/own/scale/value", "zeroshot_classification/wds/cifar10/acc1", "nope/x/y", "train/minutes",
             "logit_scale/own/scale/value"]
    assert list(headline_table(frame, asked).iloc[0].to_dict().items())[-3:] == [
        ("sc_mean", 0.7), ("logit_scale/own/scale/value", 14.2), ("train_min", 95.5)]


def test_a_dataset_evaluated_in_two_layouts_gets_two_columns_not_one_in_place_of_the_other():
    """`wds/flickr8k` beside `flickr8k` (clip_benchmark's wds and own layouts of one benchmark), `wds/vtab/cifar10`
    beside `wds/cifar10`: named by their last part, the second's column took the place of the first's."""
    from analysis.report import retrieval_table

    metrics = {"zeroshot_classification/wds/cifar10/acc1": 0.6, "zeroshot_classification/wds/vtab/cifar10/acc1": 0.5,
               "zeroshot_classification/wds/imagenet1k/acc1": 0.3,
               "zeroshot_retrieval/wds/flickr8k/text_retrieval_recall_at_1": 0.2,
               "zeroshot_retrieval/flickr8k/text_retrieval_recall_at_1": 0.25,
               "zeroshot_retrieval/wds/flickr8k/image_retrieval_recall_at_1": 0.1,
               "zeroshot_retrieval/flickr8k/image_retrieval_recall_at_1": 0.15}
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, **metrics}])
    row = headline_table(frame).iloc[0].to_dict()
    assert {k: v for k, v in row.items() if k.startswith(("zs_", "i2t", "t2i"))} == {
        "zs_acc1_wds_cifar10": 0.6, "zs_acc1_wds_vtab_cifar10": 0.5, "zs_acc1_imagenet1k": 0.3,
        "i2t_r1_flickr8k": 0.25, "i2t_r1_wds_flickr8k": 0.2, "t2i_r1_flickr8k": 0.15, "t2i_r1_wds_flickr8k": 0.1}
    assert retrieval_table(frame).iloc[0].to_dict() == {
        "label": "random", "ratio": 0.5, "seed": 0, "flickr8k_i2t_r1": 0.25, "flickr8k_t2i_r1": 0.15,
        "wds_flickr8k_i2t_r1": 0.2, "wds_flickr8k_t2i_r1": 0.1}


def test_points_whose_training_waited_for_the_loader_are_named():
    """Their train_min (and the accuracy-against-minutes plot) measures the loader as much as the masking."""
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, "train/data_wait_share": 0.05},
                          {"label": "cluster-rgb", "ratio": 0.5, "seed": 1, "train/data_wait_share": 0.42},
                          {"label": "kmeans", "ratio": 0.3, "seed": 0, "train/data_wait_share": float("nan")}])
    note = loader_bound_note(frame)
    assert "1 point(s) waited for their loader" in note and "cluster-rgb 0.5 seed 1 (42%)" in note
    assert "random" not in note and "kmeans" not in note
    assert loader_bound_note(frame.iloc[[0, 2]]) is None
    assert loader_bound_note(frame.drop(columns="train/data_wait_share")) is None  # sweeps before the metric


def test_points_that_trained_with_other_versions_of_the_code_are_named():
    """A failed point resubmitted after an edit trained with other code than the rest of the sweep."""
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, "code": "aaaaaaaaaaaa"},
                          {"label": "cluster-rgb", "ratio": 0.5, "seed": 0, "code": "aaaaaaaaaaaa"},
                          {"label": "cluster-rgb", "ratio": 0.3, "seed": 1, "code": "bbbbbbbbbbbb"},
                          {"label": "kmeans", "ratio": 0.3, "seed": 0, "code": ""}])  # a run made before the tag
    note = code_versions_note(frame)
    assert note.startswith("report: the points trained with 2 versions of the code")
    assert note.endswith(": aaaaaaaaaaaa: random 0.5 seed 0, cluster-rgb 0.5 seed 0; bbbbbbbbbbbb: cluster-rgb 0.3 "
                         "seed 1")
    many = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": seed, "code": "c" * 12} for seed in range(8)])
    assert code_versions_note(pd.concat([frame, many])).endswith(
        "cccccccccccc: random 0.5 seed 0, random 0.5 seed 1, random 0.5 seed 2, random 0.5 seed 3, random 0.5 seed 4, "
        "random 0.5 seed 5 and 2 more")
    assert code_versions_note(frame.iloc[[0, 1, 3]]) is None
    assert code_versions_note(frame.drop(columns="code")) is None


def test_points_that_trained_on_other_hardware_are_named():
    """A partition of mixed GPUs, or a point requeued onto other nodes: train_min compares the hardware too."""
    h100, a100 = "8x NVIDIA H100 80GB HBM3", "8x NVIDIA A100-SXM4-80GB"
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, "hardware": h100},
                          {"label": "cluster-rgb", "ratio": 0.5, "seed": 0, "hardware": h100},
                          {"label": "cluster-rgb", "ratio": 0.3, "seed": 1, "hardware": f"{a100} + {h100}"},
                          {"label": "kmeans", "ratio": 0.3, "seed": 0, "hardware": ""}])  # a run made before the tag
    note = hardware_note(frame)
    assert note == (f"report: the points trained on 2 kinds of hardware, so their train_min compares the hardware as "
                    f"much as the masking: {h100}: random 0.5 seed 0, cluster-rgb 0.5 seed 0; {a100} + {h100}: "
                    "cluster-rgb 0.3 seed 1")
    assert hardware_note(frame.iloc[[0, 1, 3]]) is None
    assert hardware_note(frame.drop(columns="hardware")) is None


def test_a_points_code_version_is_its_code_copys_digest_and_its_plugin_files():
    from analysis.report import code_version, points_frame

    assert code_version("/s/code/84bc3b49a4ce", "/home/me/my masks.py@9f1c2d3e4b5a mylab.masks@unknown") == \
        "84bc3b49a4ce+my masks.py@9f1c2d3e4b5a+mylab.masks@unknown"
    assert code_version(float("nan"), "/home/me/mine.py@9f1c2d3e4b5a") == "mine.py@9f1c2d3e4b5a"
    assert code_version(float("nan"), float("nan")) == ""
    runs = pd.DataFrame([{"tags.sweep_id": "s", "tags.mlflow.runName": "p", "params.masking.strategy": "random",
                          "params.masking.features": "rgb", "params.masking.ratio": "0.5",
                          "params.masking.attention": "False", "params.train.seed": "0", "status": "FINISHED",
                          "run_id": "r", "tags.train_code": "/s/code/84bc3b49a4ce"}])
    assert points_frame(runs)["code"].tolist() == ["84bc3b49a4ce"]
    assert points_frame(runs.drop(columns="tags.train_code"))["code"].tolist() == [""]


def test_a_metric_not_in_the_sweep_is_named_with_the_closest_that_are():
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, "zeroshot_classification/wds/shapes/acc1": 0.3,
                           "zeroshot_classification/wds/shapes/acc5": 0.8, "train/loss": 2.0}])
    assert missing_metric(frame, "zeroshot_classification/wds/shape/acc1") == (
        "no metric 'zeroshot_classification/wds/shape/acc1' in this sweep (did you mean "
        "'zeroshot_classification/wds/shapes/acc1', 'zeroshot_classification/wds/shapes/acc5'?)")
    assert missing_metric(frame, "sugar") == "no metric 'sugar' in this sweep"


def test_a_swept_setting_gets_its_own_label_and_seeds_are_averaged_within_it(tmp_path):
    """A threshold sweep of cluster masking, two seeds each, beside random masking, in a real MLflow store:
    the thresholds must not be merged into one line, and the mean over seeds is per threshold."""
    from analysis.report import seed_summary, sweep_frame
    from clustermask.tracking import PointRun, RunLogger, TrackingConfig, create_sweep_runs, flatten

    points, accuracy = [], []
    for strategy, threshold, seed, acc in [("cluster", 0.3, 0, 0.40), ("cluster", 0.3, 1, 0.50),
                                           ("cluster", 0.7, 0, 0.20), ("cluster", 0.7, 1, 0.30),
                                           ("random", 0.5, 0, 0.45)]:
        config = {"masking": {"strategy": strategy, "features": "rgb", "attention": False, "ratio": 0.5,
                              "threshold": threshold}, "train": {"seed": seed, "lr": 0.001}}
        points.append(PointRun(f"p{len(points)}", "", flatten(config)))
        accuracy.append(acc)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, run_ids = create_sweep_runs(TrackingConfig(experiment="t"), uri, "s1", {}, points)
    for run_id, acc in zip(run_ids, accuracy):
        RunLogger(uri, run_id).metrics({"zeroshot_classification/wds/shapes/acc1": acc})
    frame = sweep_frame(uri, "t", "s1")
    assert sorted(frame["label"]) == ["cluster-rgb threshold=0.3"] * 2 + ["cluster-rgb threshold=0.7"] * 2 + ["random"]
    summary = seed_summary(headline_table(frame)).set_index("label")
    assert summary.loc["cluster-rgb threshold=0.3", "zs_acc1"] == "0.450 ± 0.071"
    assert summary.loc["cluster-rgb threshold=0.7", "zs_acc1"] == "0.250 ± 0.071"
    assert summary.loc["random", "zs_acc1"] == "0.450" and summary.loc["random", "seeds"] == 1


def test_means_over_fewer_seeds_than_a_row_has_are_marked_and_the_points_named():
    """A report built while a sweep still evaluates, or the report job's after an evaluation failed: a row of
    three seeds must not show the mean of two as if it were the three's, nor a point's SugarCrepe mean over the
    edits it happens to have."""
    from analysis.report import latex_table, missing_metrics_note, seed_summary

    zs, swap, add = ("zeroshot_classification/wds/shapes/acc1", SUGARCREPE + "swap_att/acc",
                     SUGARCREPE + "add_att/acc")
    nan = float("nan")
    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": 0, zs: 0.40, swap: 0.6, add: 0.8},
                          {"label": "random", "ratio": 0.5, "seed": 1, zs: 0.50, swap: 0.7, add: nan},
                          {"label": "random", "ratio": 0.5, "seed": 2, zs: nan, swap: nan, add: nan},
                          {"label": "kmeans", "ratio": 0.5, "seed": 0, zs: 0.30, swap: 0.5, add: 0.7}])
    table = headline_table(frame)
    assert table["sc_mean"].tolist()[0] == pytest.approx(0.7) and table["sc_mean"].isna().tolist()[1:3] == [True] * 2
    summary = seed_summary(table).set_index("label")
    assert summary.loc["random", "seeds"] == 3
    assert summary.loc["random", "zs_acc1"] == "0.450 ± 0.071 (n=2)"
    assert summary.loc["random", "sc_add_att"] == "0.800 (n=1)" and summary.loc["random", "sc_mean"] == "0.700 (n=1)"
    assert summary.loc["kmeans", "zs_acc1"] == "0.300"  # every seed it has
    assert r" & 0.450 $\pm$ 0.071 (n=2) & " in latex_table(seed_summary(table))
    assert missing_metrics_note(table) == (
        "report: 2 of 4 point(s) lack metrics that others have (an evaluation not finished or failed, which "
        "clustermask-status shows, or sweeps evaluated on other tasks), and the means over seeds leave them out, "
        "marked (n=k): random 0.5 seed 1, random 0.5 seed 2")
    assert missing_metrics_note(table.iloc[[0, 3]]) is None
    assert missing_metrics_note(table[["label", "ratio", "seed"]]) == (
        "report: none of the 4 point(s) has evaluation metrics yet (clustermask-status says why)")


def test_the_latex_tables_compile(tmp_path):
    """The .tex tables go into a paper: pandas escapes nothing unless asked, and `zs_acc1` in a header stopped
    pdflatex (`Missing $ inserted`). Labels carry settings (`train_shards=/d/{0..9}.tar`), means `±`."""
    import os
    import shutil
    import subprocess

    from analysis.report import write_table_and_mean

    rows = pd.DataFrame({"label": ["cluster-rgb train_shards=/d/{0..9}.tar", "random lr=1e-4 note=50%_&_#1"] * 2,
                         "ratio": [0.5] * 4, "seed": [0, 0, 1, 1], "zs_acc1": [0.4, 0.3, 0.5, float("nan")],
                         "sc_swap_att": [0.6, 0.7, 0.8, 0.9]})
    written = write_table_and_mean(rows, tmp_path, "results")
    mean = (tmp_path / "results_mean.tex").read_text().splitlines()
    assert mean[2] == r"label & ratio & seeds & zs\_acc1 & sc\_swap\_att \\"
    assert mean[4] == (r"cluster-rgb train\_shards=/d/\{0..9\}.tar & 0.500 & 2 & 0.450 $\pm$ 0.071 & "
                       r"0.700 $\pm$ 0.141 \\")
    assert mean[5].startswith(r"random lr=1e-4 note=50\%\_\&\_\#1 & 0.500 & 2 & 0.300 (n=1) & ")
    if shutil.which("pdflatex") is None:
        if os.environ.get("CLUSTERMASK_REQUIRE_LATEX") == "1":
            pytest.fail("CLUSTERMASK_REQUIRE_LATEX=1 but there is no pdflatex")
        pytest.skip("no pdflatex (bash launch/setup.sh --slurm installs it)")
    tables = "".join(rf"\resizebox{{\textwidth}}{{!}}{{\input{{{path.name}}}}}" "\n\n"
                     for path in written if path.suffix == ".tex")
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n"
                                        f"\\begin{{document}}\n{tables}\\end{{document}}\n")
    made = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout[-2000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 1000


def test_plot_bars_one_std_over_seeds(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from analysis.report import plot_metric

    key = "zeroshot_classification/wds/shapes/acc1"
    frame = pd.DataFrame({"label": ["random"] * 3 + ["cluster-rgb"], "ratio": [0.3, 0.3, 0.5, 0.5],
                          "seed": [0, 1, 0, 0], key: [0.4, 0.6, 0.5, 0.2]})
    bars = []
    original = plt.Axes.errorbar
    monkeypatch.setattr(plt.Axes, "errorbar", lambda self, x, y, yerr=None, **kw: bars.append(
        (list(x), list(y), list(yerr))) or original(self, x, y, yerr=yerr, **kw))
    plot_metric(frame, key, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert len(bars) == 1  # cluster-rgb has one seed: no bar
    x, y, err = bars[0]
    assert x == [0.3, 0.5] and y == pytest.approx([0.5, 0.5])
    assert err[0] == pytest.approx(0.1414, abs=1e-3) and pd.isna(err[1])  # 0.5: one seed


def test_strategies_each_trained_at_one_ratio_are_plotted_side_by_side(tmp_path, monkeypatch):
    """experiment=feature_ablation trains every strategy at 0.5: against the ratio they were all one point, drawn
    on top of each other. Side by side, each gets its mean and bar; a baseline at another ratio is named with it."""
    import matplotlib.pyplot as plt

    from analysis.report import plot_metric

    key = "zeroshot_classification/wds/shapes/acc1"
    frame = pd.DataFrame({"label": ["random"] * 2 + ["cluster-rgb"] * 2 + ["cluster-embedding"],
                          "ratio": [0.5] * 5, "seed": [0, 1, 0, 1, 0], key: [0.4, 0.6, 0.3, 0.5, 0.2]})
    marks, ticks = [], []
    original_errorbar, original_ticks = plt.Axes.errorbar, plt.Axes.set_xticks
    monkeypatch.setattr(plt.Axes, "errorbar", lambda self, x, y, yerr=None, **kw: marks.append(
        (kw.get("label"), list(x), list(y), list(yerr))) or original_errorbar(self, x, y, yerr=yerr, **kw))
    monkeypatch.setattr(plt.Axes, "set_xticks", lambda self, positions, labels=None, **kw: ticks.append(
        (list(positions), list(labels or []))) or original_ticks(self, positions, labels, **kw))
    plot_metric(frame, key, tmp_path / "plot.png")
    assert [(label, x) for label, x, _, _ in marks] == [("cluster-embedding", [0]), ("cluster-rgb", [1]),
                                                       ("random", [2])]
    assert [y for _, _, (y,), _ in marks] == pytest.approx([0.2, 0.4, 0.5])
    assert pd.isna(marks[0][3][0]) and marks[2][3] == pytest.approx([0.1414], abs=1e-3)
    assert ticks == [([0, 1, 2], ["cluster-embedding", "cluster-rgb", "random"])]
    marks.clear(), ticks.clear()
    baseline = pd.DataFrame({"label": ["none"], "ratio": [0.0], "seed": [0], key: [0.45]})
    plot_metric(pd.concat([frame, baseline]), key, tmp_path / "with_none.png")
    assert ticks == [([0, 1, 2, 3], ["cluster-embedding\n0.5", "cluster-rgb\n0.5", "none\n0", "random\n0.5"])]
    marks.clear(), ticks.clear()
    more_ratios = pd.DataFrame({"label": ["random"], "ratio": [0.3], "seed": [0], key: [0.45]})
    plot_metric(pd.concat([frame, more_ratios]), key, tmp_path / "lines.png")
    assert not ticks  # random has two ratios: a line per strategy against the ratio


def test_plotted_means_over_fewer_seeds_than_their_row_has_are_marked(tmp_path, monkeypatch):
    """As the tables mark them `(n=k)`: a plot drawn while a sweep still evaluates must not pass one seed's value
    off as the mean of three."""
    import matplotlib.pyplot as plt

    from analysis.report import plot_against_training_time, plot_metric

    key, nan = "zeroshot_classification/wds/shapes/acc1", float("nan")
    frame = pd.DataFrame({"label": ["random"] * 5 + ["kmeans"] * 2, "ratio": [0.3, 0.3, 0.3, 0.5, 0.5, 0.3, 0.5],
                          "seed": [0, 1, 2, 0, 1, 0, 0], "train/minutes": [10.0, 11.0, 12.0, 7.0, 8.0, 9.0, 6.0],
                          key: [0.4, 0.6, nan, 0.45, 0.55, nan, 0.3]})
    notes = []
    original = plt.Axes.annotate
    monkeypatch.setattr(plt.Axes, "annotate", lambda self, text, xy, *args, **kw: notes.append(
        (text, tuple(float(v) for v in xy))) or original(self, text, xy, *args, **kw))
    plot_metric(frame, key, tmp_path / "lines.png")
    assert notes == [("n=2", (0.3, pytest.approx(0.5)))]  # kmeans 0.3 has no value: no mean to mark
    notes.clear()
    plot_metric(frame[frame["ratio"] == 0.3], key, tmp_path / "side_by_side.png")
    assert notes == [("n=2", (0.0, pytest.approx(0.5)))]  # kmeans has no value at 0.3: random alone, at x=0
    notes.clear()
    plot_against_training_time(frame, key, tmp_path / "cost.png")
    assert sorted(notes) == [("0.3 n=2", (11.0, pytest.approx(0.5))), ("0.5", (6.0, 0.3)), ("0.5", (7.5, 0.5))]


def test_accuracy_against_training_time_draws_each_strategy_through_its_ratios_in_order_of_cost(tmp_path,
                                                                                               monkeypatch):
    import matplotlib.pyplot as plt

    from analysis.report import plot_against_training_time

    key = "zeroshot_classification/wds/shapes/acc1"
    frame = pd.DataFrame({"label": ["random"] * 3 + ["cluster-rgb"] * 2, "ratio": [0.3, 0.3, 0.5, 0.3, 0.5],
                          "train/minutes": [10.0, 12.0, 7.0, 11.5, 8.0], key: [0.4, 0.6, 0.45, 0.55, 0.5]})
    lines = {}
    original = plt.Axes.plot
    monkeypatch.setattr(plt.Axes, "plot", lambda self, x, y, *args, **kw: lines.update(
        {kw["label"]: (list(x), list(y))}) or original(self, x, y, *args, **kw))
    plot_against_training_time(frame, key, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000
    assert lines["random"] == ([7.0, 11.0], [0.45, pytest.approx(0.5)])  # ratio 0.5 is the cheaper one
    assert lines["cluster-rgb"] == ([8.0, 11.5], [0.5, 0.55])


def recorded_sweep(folder, name: str, points):
    """A sweep directory as the launcher leaves it (manifest.json, its own sqlite MLflow store), with points
    (strategy, seed, lr, zero-shot accuracy) recorded in it."""
    import json

    from clustermask.tracking import PointRun, RunLogger, TrackingConfig, create_sweep_runs, flatten

    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    runs = [PointRun(f"{strategy}-{seed}", "", flatten({
        "sweep_name": name, "tracking": {"experiment": name}, "eval": {"batch_size": 64 if name == "a" else 128},
        "masking": {"strategy": strategy, "features": "rgb", "attention": False, "ratio": 0.5},
        "train": {"seed": seed, "lr": lr}})) for strategy, seed, lr, _ in points]
    _, run_ids = create_sweep_runs(TrackingConfig(experiment=name), uri, f"{name}-id", {}, runs)
    for run_id, (*_, accuracy) in zip(run_ids, points):
        RunLogger(uri, run_id).metrics({"zeroshot_classification/wds/shapes/acc1": accuracy})
    (folder / "manifest.json").write_text(json.dumps({"sweep_dir": str(folder), "tracking_uri": uri, "experiment": name,
                                                      "sweep_id": f"{name}-id", "points": []}))
    return folder


def test_an_output_folder_that_cannot_hold_the_report_is_named_and_a_file_there_kept(tmp_path, capsys):
    """`--out paper.tex` (a file) ended in a FileExistsError traceback; now one line, and the file is left alone."""
    from analysis.report import main

    sweep = recorded_sweep(tmp_path / "sweep", "a", [("random", 0, 1e-3, 0.40)])
    paper = tmp_path / "paper.tex"
    paper.write_text("\\input{results}")
    for out, error in ((paper, f"error: the report's folder {paper} is a file"),
                       (paper / "tables", f"error: cannot make the report's folder {paper / 'tables'}: Not a directory")):
        with pytest.raises(SystemExit) as exited:
            main([str(sweep), "--out", str(out)])
        assert exited.value.code == 2 and capsys.readouterr().err.strip() == error
    assert paper.read_text() == "\\input{results}"
    main([str(sweep), "--out", str(tmp_path / "new" / "tables")])  # a folder not there yet is made, parents too
    assert (tmp_path / "new" / "tables" / "results.md").exists()


def test_a_report_of_several_sweeps_averages_seeds_across_them_and_labels_what_differs(tmp_path, capsys):
    """Seeds added later as a second sweep (another name, MLflow store and eval batch size): one table, the
    mean over all seeds. A third sweep at another learning rate keeps its own label, and the others name theirs:
    cluster masking was trained at one rate only, but not at the third sweep's."""
    from analysis.report import main

    first = recorded_sweep(tmp_path / "first", "a", [("random", 0, 1e-3, 0.40), ("cluster", 0, 1e-3, 0.50)])
    seeds = recorded_sweep(tmp_path / "seeds", "b", [("random", 1, 1e-3, 0.60), ("cluster", 1, 1e-3, 0.70)])
    slower = recorded_sweep(tmp_path / "slower", "c", [("random", 0, 1e-4, 0.10)])
    main([str(first), str(seeds), str(slower), "--out", str(tmp_path / "paper")])
    summary = pd.read_csv(tmp_path / "paper" / "results_all_metrics.csv")
    assert list(summary.columns) == ["sweep", "point", "strategy", "features", "ratio", "attention", "seed", "status",
                                     "code", "hardware", "run_id", "label", "zeroshot_classification/wds/shapes/acc1"]
    assert sorted(summary["sweep"]) == ["a-id", "a-id", "b-id", "b-id", "c-id"]
    mean = (tmp_path / "paper" / "results_mean.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in mean.splitlines()[2:]}
    assert rows == {"cluster-rgb lr=0.001": ["0.500", "2", "0.600 ± 0.141"],
                    "random lr=0.001": ["0.500", "2", "0.500 ± 0.141"],
                    "random lr=0.0001": ["0.500", "1", "0.100"]}
    assert (tmp_path / "paper" / "zeroshot_classification_wds_shapes_acc1.png").exists()
    assert not (first / "report").exists()
    capsys.readouterr()
    main([str(first), str(tmp_path / "." / "first"), "--out", str(tmp_path / "once")])  # the same sweep twice
    assert "share a label" not in capsys.readouterr().out
    rerun = recorded_sweep(tmp_path / "rerun", "d", [("random", 0, 1e-3, 0.42)])
    main([str(first), str(rerun), "--out", str(tmp_path / "rerun_report")])
    assert "2 points share a label, ratio and seed; the mean over seeds counts each: random 0.5 seed 0" in \
        capsys.readouterr().out
    for argv, message in (([str(first), str(seeds)], "a report of 2 sweeps needs an output directory"),
                          ([str(tmp_path)], f"{tmp_path} is not a sweep directory")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_rebuilt_report_removes_what_the_last_one_wrote_and_this_one_does_not_and_nothing_else(tmp_path, capsys):
    """A benchmark evaluated again away (its metric superseded, logged NaN) leaves the tables: its plot, and the
    retrieval tables where retrieval is gone, must not stay beside them as if current. A file the report did not
    write (the paper's, in `--out paper/`) stays."""
    import mlflow

    from analysis.report import main
    from clustermask.tracking import RunLogger

    sweep = recorded_sweep(tmp_path / "sweep", "a", [("random", 0, 1e-3, 0.40), ("cluster", 0, 1e-3, 0.50)])
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run_ids = list(mlflow.search_runs(experiment_names=["a"], filter_string="tags.kind = 'point'")["run_id"])
    probe, recall = "linear_probe/wds/shapes/lp_acc1", "zeroshot_retrieval/wds/scenes/image_retrieval_recall_at_1"
    for run_id in run_ids:
        RunLogger(uri, run_id).metrics({probe: 0.3, recall: 0.1})
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "main.tex").write_text("\\input{results}")
    (paper / "zeroshot_classification_wds_shapes_acc1.png").write_text("an older one, written by hand")
    main([str(sweep), "--out", str(paper)])
    plot, retrieval = paper / "linear_probe_wds_shapes_lp_acc1.png", paper / "results_retrieval.md"
    assert plot.exists() and retrieval.exists()
    capsys.readouterr()
    for run_id in run_ids:
        RunLogger(uri, run_id).metrics({probe: float("nan"), recall: float("nan")})  # as an evaluation again does
    main([str(sweep), "--out", str(paper)])
    assert not plot.exists() and not retrieval.exists() and not (paper / "results_retrieval_mean.tex").exists()
    assert (paper / "main.tex").read_text() == "\\input{results}"
    assert (paper / "zeroshot_classification_wds_shapes_acc1.png").stat().st_size > 1000  # rewritten: this report's
    assert ("report: removed 5 file(s) that the report before this one wrote and this one has not (a benchmark no "
            "longer evaluated, a --metric not asked for again, a sweep no longer reported): "
            "linear_probe_wds_shapes_lp_acc1.png, results_retrieval.md, "
            "results_retrieval.tex, results_retrieval_mean.md, results_retrieval_mean.tex") in capsys.readouterr().out
    main([str(sweep), "--out", str(paper)])
    assert "removed" not in capsys.readouterr().out and (paper / "main.tex").exists()


def test_a_point_whose_mlflow_run_was_deleted_is_named_not_left_out_without_a_word(tmp_path, capsys):
    """A run deleted in the MLflow UI is not among the runs MLflow's search gives: the report named 1 point of a
    sweep of 2 and said nothing. It now names the point, its run and how to restore it."""
    import json

    import mlflow

    from analysis.report import main

    sweep = recorded_sweep(tmp_path / "sweep", "a", [("random", 0, 1e-3, 0.40), ("cluster", 0, 1e-3, 0.50)])
    uri = f"sqlite:///{sweep / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["a"], filter_string="tags.kind = 'point'")
    manifest = json.loads((sweep / "manifest.json").read_text())
    manifest["points"] = [{"index": i, "name": name, "run_dir": str(sweep / "points" / name), "mlflow_run_id": run_id}
                          for i, (name, run_id) in enumerate(zip(runs["tags.mlflow.runName"], runs["run_id"]))]
    (sweep / "manifest.json").write_text(json.dumps(manifest))
    main([str(sweep)])
    assert "no active MLflow run" not in capsys.readouterr().out
    deleted = manifest["points"][1]
    mlflow.MlflowClient(uri).delete_run(deleted["mlflow_run_id"])
    main([str(sweep)])
    out = capsys.readouterr().out
    assert (f"report: 1 point(s) have no active MLflow run and are left out (deleted in the MLflow UI? "
            f"`mlflow.MlflowClient(URI).restore_run(RUN_ID)` brings one back): {deleted['name']} (run "
            f"{deleted['mlflow_run_id']} in {uri})") in out
    assert deleted["name"] not in (sweep / "report" / "results_all_metrics.csv").read_text()
    mlflow.MlflowClient(uri).delete_run(manifest["points"][0]["mlflow_run_id"])
    main([str(sweep)])
    assert "report: 2 point(s) have no active MLflow run" in capsys.readouterr().out


def test_the_retrieval_table_has_both_directions_at_every_k_per_dataset(tmp_path):
    """The paper reports retrieval as recall@1/5/10 in both directions per dataset; the headline keeps R@1."""
    from analysis.report import retrieval_table, write_tables

    def recalls(dataset, i2t, t2i):
        return {f"zeroshot_retrieval/wds/{dataset}/{kind}_retrieval_recall_at_{k}": value
                for kind, values in (("text", i2t), ("image", t2i)) for k, value in zip((1, 5, 10), values)}

    frame = pd.DataFrame([{"label": "random", "ratio": 0.5, "seed": seed, "zeroshot_classification/wds/x/acc1": 0.1,
                           **recalls("mscoco_captions", [0.30 + seed / 10, 0.5, 0.6], [0.2, 0.4, 0.5]),
                           **recalls("flickr30k", [0.5, 0.8, 0.9], [0.4, 0.7, 0.8 + seed / 10])} for seed in (0, 1)])
    table = retrieval_table(frame)
    assert list(table.columns) == ["label", "ratio", "seed"] + [
        f"{d}_{direction}_r{k}" for d in ("flickr30k", "mscoco_captions") for direction in ("i2t", "t2i")
        for k in (1, 5, 10)]
    assert table.loc[1, "mscoco_captions_i2t_r1"] == 0.4 and table.loc[1, "flickr30k_t2i_r10"] == pytest.approx(0.9)
    assert retrieval_table(frame.drop(columns=[c for c in frame if "retrieval" in c])) is None
    write_tables(headline_table(frame), frame, tmp_path)
    mean = (tmp_path / "results_retrieval_mean.md").read_text().splitlines()[2]
    assert "0.350 ± 0.071" in mean and "0.850 ± 0.071" in mean  # mscoco i2t R@1 and flickr30k t2i R@10
    assert (tmp_path / "results_retrieval.tex").read_text().count("\\\\") >= 3
