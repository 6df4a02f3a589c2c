import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from clip_benchmark.metrics import linear_probe

from clustermask.evaluate import EvalConfig, EvalContext, EvalTask, linear_probe_eval, run_task, validate
from clustermask.model import ModelConfig, create

from conftest import NEEDS_CUDA, SMALL, git_lfs_pointer


def test_each_cuda_linear_probe_starts_from_an_empty_feature_cache(tmp_path, synthetic_root, monkeypatch):
    """clip_benchmark's linear probe (CUDA only, so replaced here by a recorder that caches and answers as it does)
    keeps features in feature_root/model_id and reuses a cache it finds there. Each dataset must get its own empty
    directory, a stale cache from an earlier evaluation must not be read, and nothing is left behind. Of what it
    returns only the scores are metrics: its settings beside them made the report's columns differ by device (seen
    on an H200, 2026-12-04)."""
    calls = []
    scores = {"lp_acc1": 0.5, "lp_acc5": 0.75, "lp_mean_per_class_recall": 0.25}

    def caching_evaluate(model, train, test, *, model_id, feature_root, **options):
        cache = Path(feature_root) / model_id
        calls.append((cache, sorted(p.name for p in cache.glob("*"))))
        cache.mkdir(exist_ok=True)
        (cache / "targets_train.pt").write_bytes(b"features of this model on this dataset")
        # clip_benchmark 1.6.2's answer, settings included
        return {**scores, "weight_decay": 0, "epochs": options["epochs"], "seed": options["seed"],
                "fewshot_k": options["fewshot_k"], "normalized": True}

    monkeypatch.setattr(linear_probe, "evaluate", caching_evaluate)
    ctx = EvalContext("cuda", batch_size=32, workers=0, amp=False, feature_dir=tmp_path / "features")
    stale = ctx.feature_dir / "wds_shapes"
    stale.mkdir(parents=True)
    (stale / "targets_train.pt").write_bytes(b"features of the previous model")
    root = str(synthetic_root / "eval" / "shapes")
    for dataset in ("wds/shapes", "wds/shapes_again"):
        task = EvalTask("linear_probe", dataset, root)
        assert dict(linear_probe_eval(None, None, None, task, ctx)) == scores
    assert [files for _, files in calls] == [[], []]
    assert calls[0][0] != calls[1][0]
    assert not any(cache.exists() for cache, _ in calls)


def test_the_probe_reports_top_5_only_where_clip_benchmark_does():
    """clip_benchmark's CUDA linear probe gives top-5 accuracy only where the test labels reach 5, NaN otherwise;
    the CPU path must report the same, not the top-k of however many classes there are."""
    import math

    from clustermask.evaluate import probe_accuracies

    g = torch.Generator().manual_seed(0)
    many = torch.randn(200, 18, generator=g), torch.randint(0, 18, (200,), generator=g)
    expected = linear_probe.accuracy(*many, topk=(1, 5))
    assert probe_accuracies(*many) == pytest.approx(tuple(expected))
    assert 0 < expected[0] < expected[1] < 1
    few_logits, few_targets = torch.randn(200, 5, generator=g), torch.randint(0, 5, (200,), generator=g)
    acc1, acc5 = probe_accuracies(few_logits, few_targets)
    assert acc1 == pytest.approx((few_logits.argmax(1) == few_targets).float().mean().item())
    assert math.isnan(acc5)


def test_more_loader_workers_than_shards_give_the_same_metrics(tmp_path, synthetic_root):
    """webdataset 1.x fails a loader that has more workers than the split has shards: evaluation takes at most
    one worker per shard, as training does."""
    model, _, transform, tokenizer, _ = create(ModelConfig(), None)
    model.eval()
    task = EvalTask("zeroshot_classification", "wds/shapes", str(synthetic_root / "eval" / "shapes"))
    results = [run_task(model, transform, tokenizer, task, EvalContext("cpu", 32, workers, False, tmp_path))
               for workers in (0, SMALL["eval_shards"] + 2)]
    assert results[0] == results[1] and results[0]["acc1"] >= 0


def untrained_checkpoint(path: Path) -> Path:
    from clustermask.train import save_checkpoint

    save_checkpoint(path, create(ModelConfig(), None)[0], None, 0, "ViT-Tiny-8-64", [0.5])
    return path


def test_an_incomplete_sugarcrepe_root_fails_the_eval_job_before_clip_benchmark_downloads_into_it(tmp_path):
    """clip_benchmark's builder fetches whatever part of SugarCrepe it does not find (wget from the evaluation
    job, then unzip), leaving a partial download in the dataset directory and failing on a missing image. A
    root with the annotations but not COCO's images must fail at once, naming what it lacks, untouched."""
    from clustermask.evaluate import evaluate_checkpoint
    from clustermask.synthetic import SUGARCREPE_TASKS

    checkpoint = untrained_checkpoint(tmp_path / "final.pt")
    root = tmp_path / "sugar_crepe"
    root.mkdir()
    for edit in SUGARCREPE_TASKS:
        (root / f"{edit}.json").write_text("{}")
    before = sorted(os.listdir(root))
    cfg = EvalConfig(tasks=[EvalTask("image_caption_selection", "sugar_crepe/swap_att", str(root))], device="cpu")
    with pytest.raises(FileNotFoundError, match=r"tasks\[0\].root=.*sugar_crepe/swap_att.*lacks val2017/ "):
        evaluate_checkpoint("ViT-Tiny-8-64", str(checkpoint), cfg, tmp_path / "results")
    assert sorted(os.listdir(root)) == before


def refused_naming_the_root(cases) -> None:
    """Each (task, message) of `cases`: the preflight refuses the task, naming its root, evaluator and dataset, then
    `message` (a pattern)."""
    for task, message in cases:
        with pytest.raises(FileNotFoundError, match=rf"eval.tasks\[0\].root='{task.root}' \({task.name} on "
                                                    rf"{task.dataset}\): {message}"):
            validate(EvalConfig(tasks=[task]))


def test_preflight_names_the_images_a_sugarcrepe_or_flickr_annotation_file_names_and_its_folder_lacks(
        tmp_path, synthetic_root):
    """COCO's val2017.zip unzipped into val2017/ (one folder too deep), a copy cut short, an annotation file left
    empty by a failed fetch: each passed the check of the folders and files, and failed the evaluation job on its
    first missing image (or JSON error), after the training."""
    sugar_crepe = synthetic_root / "eval" / "sugar_crepe"
    swap_att = [entry["filename"] for entry in json.loads((sugar_crepe / "swap_att.json").read_text()).values()]
    nested = Path(shutil.copytree(sugar_crepe, tmp_path / "nested"))
    (nested / "val2017").rename(tmp_path / "val2017")
    (nested / "val2017").mkdir()
    (tmp_path / "val2017").rename(nested / "val2017" / "val2017")
    cut_short = Path(broken_copy(sugar_crepe, tmp_path / "cut", f"val2017/{swap_att[3]}"))
    emptied = Path(shutil.copytree(sugar_crepe, tmp_path / "emptied"))
    (emptied / "swap_att.json").write_text("")
    flickr = flickr8k_layout_of(synthetic_root / "eval" / "scenes", tmp_path / "flickr8k")
    first_image = sorted(flickr.glob("*.jpg"))[0]
    first_image.unlink()
    coco = tmp_path / "coco"
    (coco / "val2014").mkdir(parents=True)
    (coco / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(b"an image")
    (coco / "coco_test_karpathy.json").write_text(json.dumps({"images": [
        {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
        {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}], "annotations": []}))
    cases = [
        (EvalTask("image_caption_selection", "sugar_crepe/swap_att", str(nested)),
         rf"val2017/ lacks {len(swap_att)} of the {len(swap_att)} images swap_att.json names, e.g. {swap_att[0]} "
         r"\(val2017/val2017/ is there: unzipped one folder too deep\?\)"),
        (EvalTask("image_caption_selection", "sugar_crepe/swap_att", str(cut_short)),
         rf"val2017/ lacks 1 of the {len(swap_att)} images swap_att.json names, e.g. {swap_att[3]}$"),
        (EvalTask("image_caption_selection", "sugar_crepe/swap_att", str(emptied)),
         r"swap_att.json is empty \(a download that failed\?\)"),
        (EvalTask("zeroshot_retrieval", "flickr8k", str(flickr)),
         rf"the root lacks 1 of the {SMALL['retrieval_test']} images flickr8k_test_karpathy.txt names, "
         rf"e.g. {first_image.name}"),
        (EvalTask("zeroshot_retrieval", "mscoco_captions", str(coco)),
         r"val2014/ lacks 1 of the 2 images coco_test_karpathy.json names, e.g. COCO_val2014_000000000002.jpg"),
    ]
    refused_naming_the_root(cases)
    validate(EvalConfig(tasks=[EvalTask("image_caption_selection", f"sugar_crepe/{edit}", str(cut_short))
                               for edit in ("add_att", "replace_rel")]))


def broken_copy(source: Path, destination: Path, remove: str) -> str:
    shutil.copytree(source, destination)
    target = destination / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return str(destination)


def lfs_clone(source: Path, destination: Path, pointer: str) -> str:
    """A copy of `source` as a clone without git lfs holds it: `pointer` a Git LFS pointer."""
    shutil.copytree(source, destination)
    git_lfs_pointer(destination / pointer)
    return str(destination)


def test_preflight_names_what_a_wds_root_lacks_for_its_task(tmp_path, synthetic_root):
    """Each of these passed the old check (the root exists) and failed the evaluation job, after training."""
    shapes, scenes = synthetic_root / "eval" / "shapes", synthetic_root / "eval" / "scenes"
    cases = [
        (EvalTask("linear_probe", "wds/shapes", broken_copy(shapes, tmp_path / "a", "train")),
         "lacks train/nshards.txt"),
        (EvalTask("zeroshot_classification", "wds/shapes",
                  broken_copy(shapes, tmp_path / "b", "zeroshot_classification_templates.txt")),
         "lacks zeroshot_classification_templates.txt"),
        (EvalTask("zeroshot_classification", "wds/shapes", broken_copy(shapes, tmp_path / "c", "test/1.tar")),
         r"test/nshards.txt names 2 shards, 1 missing, e.g. test/1.tar"),
        (EvalTask("zeroshot_retrieval", "wds/shapes", str(shapes)),
         "dataset_type.txt says 'classification'; zeroshot_retrieval needs a retrieval dataset"),
        (EvalTask("zeroshot_classification", "wds/scenes", str(scenes)),
         "dataset_type.txt says 'retrieval'; zeroshot_classification needs a classification dataset"),
        (EvalTask("linear_probe", "wds/shapes", lfs_clone(shapes, tmp_path / "d", "train/1.tar")),
         r"1 shard\(s\) are Git LFS pointers, not shards, e.g. train/1.tar: fetch them with `git lfs pull` in the "
         "dataset's clone"),
    ]
    for task, message in cases:
        with pytest.raises(FileNotFoundError, match=rf"eval.tasks\[0\].root='{task.root}' \({task.name} on "):
            validate(EvalConfig(tasks=[task]))
        with pytest.raises(FileNotFoundError, match=message):
            validate(EvalConfig(tasks=[task]))
    # every task that is not ready, in one error, and none that is
    tasks = [task for task, _ in cases]
    tasks.insert(2, EvalTask("zeroshot_classification", "wds/shapes", str(shapes)))
    tasks.append(EvalTask("linear_probe", "wds/shapes", str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError) as raised:
        validate(EvalConfig(tasks=tasks))
    lines = str(raised.value).splitlines()
    assert [re.match(r"eval.tasks\[(\d+)\]", line)[1] for line in lines] == ["0", "1", "3", "4", "5", "6", "7"]
    for line, (_, message) in zip(lines, cases):
        assert re.search(message, line), line
    # the folder above the dataset's: data.eval_root itself, say
    eval_root = tmp_path / "clip_benchmark"
    shutil.copytree(shapes, eval_root / "wds_shapes")
    shutil.copytree(synthetic_root / "eval" / "sugar_crepe", eval_root / "sugar_crepe")
    for task, folder in ((EvalTask("linear_probe", "wds/shapes", str(eval_root)), "wds_shapes"),
                         (EvalTask("image_caption_selection", "sugar_crepe/add_obj", str(eval_root)), "sugar_crepe")):
        with pytest.raises(FileNotFoundError, match=rf"\); {folder}/ is in it: give {eval_root / folder}\?$"):
            validate(EvalConfig(tasks=[task]))
    assert lines[-1].endswith("(wds/shapes) does not exist")
    for task in (EvalTask("zeroshot_classification", "wds/shapes", str(shapes)),
                 EvalTask("linear_probe", "wds/shapes", str(shapes)),
                 EvalTask("zeroshot_retrieval", "wds/scenes", str(scenes)),
                 EvalTask("image_caption_selection", "sugar_crepe/add_att", str(synthetic_root / "eval" / "sugar_crepe"))):
        validate(EvalConfig(tasks=[task]))


def test_clip_benchmarks_own_cli_loads_our_checkpoint_scores_it_as_we_do_and_builds_from_our_results(
        tmp_path, synthetic_root):
    """The contracts with clip_benchmark: `clustermask-clip-benchmark eval` (its CLI, our model configs known to
    open_clip) loads a checkpoint of ours and gets the metrics our evaluator wrote for it; `build` reads the
    JSON files we wrote."""
    import csv
    import json
    import subprocess
    import sys

    from clustermask.evaluate import evaluate_checkpoint

    checkpoint = untrained_checkpoint(tmp_path / "final.pt")
    shapes = str(synthetic_root / "eval" / "shapes")
    cfg = EvalConfig(tasks=[EvalTask("zeroshot_classification", "wds/shapes", shapes)], device="cpu", batch_size=64)
    ours = evaluate_checkpoint("ViT-Tiny-8-64", str(checkpoint), cfg, tmp_path / "results")
    cli = Path(sys.executable).parent / "clustermask-clip-benchmark"
    theirs = tmp_path / "theirs.json"
    run = subprocess.run([str(cli), "eval", "--model", "ViT-Tiny-8-64", "--pretrained", str(checkpoint),
                          "--dataset", "wds/shapes", "--dataset_root", shapes, "--task", "zeroshot_classification",
                          "--output", str(theirs), "--num_workers", "0", "--batch_size", "64", "--no_amp"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(theirs.read_text())["metrics"]
    assert metrics["acc1"] == pytest.approx(ours["zeroshot_classification/wds/shapes/acc1"], abs=1e-9)
    assert metrics["acc5"] == pytest.approx(ours["zeroshot_classification/wds/shapes/acc5"], abs=1e-9)
    built = tmp_path / "built.csv"
    results = sorted(str(p) for p in (tmp_path / "results").glob("*.json"))
    run = subprocess.run([str(cli), "build", *results, "--output", str(built)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader(built.read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["dataset"] == "wds/shapes" and rows[0]["task"] == "zeroshot_classification"
    assert float(rows[0]["acc1"]) == pytest.approx(ours["zeroshot_classification/wds/shapes/acc1"])


def test_a_resumed_evaluation_runs_only_the_tasks_it_had_not_finished(tmp_path, monkeypatch):
    """Requeued at its time limit or resubmitted after a failure, an evaluation reads back the tasks finished on
    that checkpoint instead of running them again. A task whose settings changed, a checkpoint written again,
    an evaluation that does not resume and one after `forget_evaluated` run every task."""
    from clustermask import evaluate

    runs, killed_at = [], set()

    def counting(model, transform, tokenizer, task, ctx):
        if task.dataset in killed_at:
            raise KeyboardInterrupt  # what the job's end looks like from here
        runs.append(task.dataset)
        yield "acc", float(len(runs))

    monkeypatch.setitem(evaluate.EVALUATORS, "counting", counting)
    monkeypatch.setitem(evaluate.EVALUATOR_OPTIONS, "counting", None)  # takes any: b's options below
    checkpoint = str(untrained_checkpoint(tmp_path / "final.pt"))
    results = tmp_path / "results"

    def evaluate_tasks(resume=True, b_options=None, log=None):
        logged = {}
        tasks = [EvalTask("counting", "a", str(tmp_path)), EvalTask("counting", "b", str(tmp_path), b_options or {})]
        flat = evaluate.evaluate_checkpoint("ViT-Tiny-8-64", checkpoint, EvalConfig(tasks=tasks, device="cpu"),
                                            results, log=log or logged.update, resume=resume)
        assert log or logged == flat  # what was read back is logged (MLflow, progress) like what was run
        return flat, runs.copy()

    def stop(metrics):
        raise KeyboardInterrupt

    killed_at.add("b")
    with pytest.raises(KeyboardInterrupt):
        evaluate_tasks()
    killed_at.clear()
    flat, ran = evaluate_tasks()
    assert ran == ["a", "b"] and flat == {"counting/a/acc": 1.0, "counting/b/acc": 2.0}
    assert evaluate_tasks() == (flat, ["a", "b"])  # every task finished: nothing runs
    assert sorted(p.name for p in results.glob("*.json")) == ["a_final.pt_ViT-Tiny-8-64_en_counting.json",
                                                             "b_final.pt_ViT-Tiny-8-64_en_counting.json"]
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b"]  # b's settings changed
    with pytest.raises(KeyboardInterrupt):  # a stop while reading back forgets nothing
        evaluate_tasks(b_options={"recall_k": [1, 10]}, log=stop)
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b"]
    killed_at.add("a")  # an evaluation that does not resume forgets the earlier ones, even stopped at once
    with pytest.raises(KeyboardInterrupt):
        evaluate_tasks(resume=False, b_options={"recall_k": [1, 10]})
    killed_at.clear()
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b", "a", "b"]
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b", "a", "b"]
    untrained_checkpoint(tmp_path / "final.pt")
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b"] + ["a", "b"] * 2
    evaluate.forget_evaluated(results)
    assert evaluate_tasks(b_options={"recall_k": [1, 10]})[1] == ["a", "b", "b"] + ["a", "b"] * 3


@pytest.mark.gpu
@NEEDS_CUDA
def test_on_a_gpu_every_evaluator_names_the_metrics_the_cpu_names(tmp_path, synthetic_root):
    """The CUDA path (clip_benchmark's own linear probe, which asserts CUDA, and pinned loaders) gives the report the
    same columns as the CPU path; zero-shot, retrieval and SugarCrepe scores of the same model agree but for ties."""
    from clustermask.evaluate import evaluate_checkpoint

    checkpoint = untrained_checkpoint(tmp_path / "final.pt")
    root = synthetic_root / "eval"
    tasks = [EvalTask("zeroshot_classification", "wds/shapes", str(root / "shapes")),
             EvalTask("linear_probe", "wds/shapes", str(root / "shapes"), {"lr": 0.1, "epochs": 2}),
             EvalTask("zeroshot_retrieval", "wds/scenes", str(root / "scenes"), {"recall_k": [1, 5]}),
             EvalTask("image_caption_selection", "sugar_crepe/swap_att", str(root / "sugar_crepe"))]
    results = {device: evaluate_checkpoint("ViT-Tiny-8-64", str(checkpoint),
                                           EvalConfig(tasks=tasks, device=device, batch_size=64), tmp_path / device)
               for device in ("cpu", "cuda")}
    assert results["cuda"].keys() == results["cpu"].keys()
    for key, value in results["cpu"].items():
        assert 0 <= results["cuda"][key] <= 1, key
        if not key.startswith("linear_probe/"):
            assert results["cuda"][key] == pytest.approx(value, abs=0.03), key


def test_an_evaluator_declares_the_options_it_reads_and_others_are_refused(monkeypatch):
    """A plugin evaluator that names its options gets its typos caught before submission, like the built-ins; one
    that does not say takes any, as before."""
    from clustermask import evaluate

    for name in ("declares", "says_nothing"):
        monkeypatch.delitem(evaluate.EVALUATORS, name, raising=False)
        monkeypatch.delitem(evaluate.EVALUATOR_OPTIONS, name, raising=False)
    evaluate.register_evaluator("declares", options=("temperature",))(lambda *args: iter(()))
    evaluate.register_evaluator("says_nothing")(lambda *args: iter(()))
    assert evaluate.EVALUATOR_OPTIONS["declares"] == ("temperature",)
    assert evaluate.EVALUATOR_OPTIONS["says_nothing"] is None
    assert evaluate.EVALUATOR_OPTIONS["linear_probe"] == ("lr", "epochs")

    def check(name, options):
        validate(EvalConfig(tasks=[EvalTask(name, "a", "/nowhere", options)]), check_paths=False)

    check("declares", {"temperature": 2})
    check("says_nothing", {"anything": 1})
    with pytest.raises(ValueError, match=r"^eval.tasks\[0\].options.temprature: declares reads no such option "
                                         r"\(did you mean temperature\?\); it reads temperature$"):
        check("declares", {"temprature": 2})
    with pytest.raises(ValueError, match=r"options.recall_k='5' \(zeroshot_retrieval\) must be a list"):
        check("zeroshot_retrieval", {"recall_k": "5"})
    check("zeroshot_retrieval", {"recall_k": [1, 5, 10]})
    check("linear_probe", {"lr": 1e-3, "epochs": 20.0})


def flickr8k_layout_of(scenes: Path, root: Path) -> Path:
    """The synthetic retrieval set (clip_benchmark's wds layout) in clip_benchmark's own layout for Flickr8k: the
    images beside `flickr8k_test_karpathy.txt` (a header, then `image.jpg,caption` per caption)."""
    import tarfile

    root.mkdir()
    lines = ["image,caption"]
    for shard in sorted((scenes / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(members):
            key, extension = name.rsplit(".", 1)
            if extension == "jpg":
                (root / name).write_bytes(members[name])
                lines += [f"{name},{caption}" for caption in members[f"{key}.txt"].decode().splitlines()]
    (root / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_benchmark_in_clip_benchmarks_own_layout_scores_as_in_its_wds_layout(tmp_path, synthetic_root):
    """Flickr8k, MS-COCO, CIFAR and ImageNet may be given in clip_benchmark's own layouts (`dataset: flickr8k`) as
    well as its wds layout (`dataset: wds/flickr8k`): the same images and captions read either way score the same."""
    model, _, transform, tokenizer, _ = create(ModelConfig(), None)
    model.eval()
    scenes = synthetic_root / "eval" / "scenes"
    raw = EvalTask("zeroshot_retrieval", "flickr8k", str(flickr8k_layout_of(scenes, tmp_path / "flickr8k")))
    validate(EvalConfig(tasks=[raw]))
    ctx = EvalContext("cpu", 32, 0, False, tmp_path)
    from_raw = run_task(model, transform, tokenizer, raw, ctx)
    from_wds = run_task(model, transform, tokenizer, EvalTask("zeroshot_retrieval", "wds/scenes", str(scenes)), ctx)
    assert set(from_raw) == {f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5)}
    assert from_raw == pytest.approx(from_wds)
    assert 0 < from_raw["image_retrieval_recall@5"] < 1


def test_preflight_names_what_clip_benchmarks_own_layout_of_a_benchmark_lacks(tmp_path, synthetic_root):
    """clip_benchmark's builder fetches (wget, from the evaluation job) a Flickr annotation file or COCO's images
    that it does not find, and torchvision's sets fail there: each is named before submission. An empty annotation
    file, which a failed fetch leaves, would read as a dataset of no images."""
    flickr = flickr8k_layout_of(synthetic_root / "eval" / "scenes", tmp_path / "flickr8k")
    no_annotations = broken_copy(flickr, tmp_path / "a", "flickr8k_test_karpathy.txt")
    emptied = Path(shutil.copytree(flickr, tmp_path / "b"))
    (emptied / "flickr8k_test_karpathy.txt").write_text("")
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "coco_test_karpathy.json").write_text("[]")
    imagenet = tmp_path / "imagenet"
    (imagenet / "val").mkdir(parents=True)
    (imagenet / "meta.bin").write_bytes(b"index")
    cases = [
        (EvalTask("zeroshot_retrieval", "flickr8k", no_annotations),
         r"lacks flickr8k_test_karpathy.txt \(clip_benchmark's layout for flickr8k\)"),
        (EvalTask("zeroshot_retrieval", "flickr8k", str(emptied)),
         r"flickr8k_test_karpathy.txt is empty \(a download that failed\?\)"),
        (EvalTask("zeroshot_retrieval", "mscoco_captions", str(coco)), r"lacks val2014/ "),
        (EvalTask("linear_probe", "imagenet1k", str(imagenet)), r"lacks train/\|ILSVRC2012_img_train.tar "),
        (EvalTask("zeroshot_classification", "flickr8k", str(flickr)),
         "flickr8k is 'retrieval'; zeroshot_classification needs a classification dataset"),
        (EvalTask("linear_probe", "cifar10", str(coco)), r"lacks cifar-10-batches-py/ "),
    ]
    refused_naming_the_root(cases)
    validate(EvalConfig(tasks=[EvalTask("zeroshot_classification", "imagenet1k", str(imagenet))]))
    # clip_benchmark streams a wds dataset given as a Hugging Face URL
    url = "https://huggingface.co/datasets/clip-benchmark/wds_cifar10/tree/main"
    with pytest.raises(FileNotFoundError, match=r"root='https://.*' \(wds/cifar10\) is a URL: the jobs download "
                                                "nothing; clone the dataset"):
        validate(EvalConfig(tasks=[EvalTask("zeroshot_classification", "wds/cifar10", url)]))


def test_a_fetch_clip_benchmark_would_start_from_the_evaluation_job_is_refused_before_it_writes(tmp_path):
    """Left to itself clip_benchmark's builder ran `wget --output-document=<root>/flickr8k_test_karpathy.txt` from
    the job: on a node without internet it left that file empty, and the next evaluation read a dataset of no
    images; with internet it downloads into the dataset folder (COCO's val2014.zip: 6 GB). Whatever the preflight
    does not know (a dataset outside its table, a root changed after submission) must stop there, naming the
    fetch, with the root as it was."""
    import subprocess

    import requests

    from clustermask.evaluate import DownloadRefused, _dataset

    root = tmp_path / "flickr8k"
    root.mkdir()
    (root / "1000268201.jpg").write_bytes(b"an image")
    for dataset, fetch in [("flickr8k", "wget https://github.com/.*/flickr8k_test_karpathy.txt"),
                           ("mscoco_captions", "wget http://images.cocodataset.org/zips/val2014.zip"),
                           ("xtd10", "wget ")]:
        task = EvalTask("zeroshot_retrieval", dataset, str(root))
        with pytest.raises(DownloadRefused, match=rf"zeroshot_retrieval on {dataset}: clip_benchmark would fetch "
                                                  rf"what it did not find under root='{root}' \(`{fetch}"):
            _dataset(task, None)
        assert [p.name for p in root.iterdir() if p.is_file()] == ["1000268201.jpg"]
    assert subprocess.call is not None and subprocess.call("true", shell=True) == 0
    assert requests.get.__module__ == "requests.api"
