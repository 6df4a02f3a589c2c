import functools
import hashlib
import itertools
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds
from clip_benchmark.datasets.builder import build_dataset

from clustermask import synthetic
from clustermask.data import DataConfig, check_workers, interval_batches, shard_urls, split_transform, training_stream
from clustermask.model import ModelConfig, create
from clustermask.synthetic import SUGARCREPE_TASKS, SyntheticConfig, ensure, generate

from conftest import SMALL, git_lfs_pointer

# smaller than SMALL still, for the tests that generate their own sets
TINY = {**SMALL, "train_samples": 40, "classification_train": 36, "classification_test": 18, "retrieval_test": 6,
        "sugarcrepe_per_task": 3}


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_from_the_seed(tmp_path):
    a = generate(SyntheticConfig(root=str(tmp_path / "a"), **TINY))
    b = generate(SyntheticConfig(root=str(tmp_path / "b"), **TINY))
    c = generate(SyntheticConfig(root=str(tmp_path / "c"), **{**TINY, "seed": 1}))
    assert digest(a / "train") == digest(b / "train")
    assert digest(a / "eval") == digest(b / "eval")
    assert digest(a / "train") != digest(c / "train")


def test_generate_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate(SyntheticConfig(root=str(tmp_path)))
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("made_empty", [False, True])
def test_an_interrupted_generation_leaves_nothing_the_next_refuses(tmp_path, monkeypatch, made_empty):
    """Ctrl-C while the demo writes its data: no half-written root (which `ensure` would refuse as not empty) and
    nothing beside it; the next run writes it all. A root that is there, empty, is filled."""
    cfg = SyntheticConfig(root=str(tmp_path / "data" / "synthetic"), **TINY)
    (tmp_path / "data").mkdir()
    if made_empty:
        (tmp_path / "data" / "synthetic").mkdir()
    write_retrieval = synthetic.write_retrieval

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_retrieval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure(cfg)
    assert list((tmp_path / "data").iterdir()) == ([Path(cfg.root)] if made_empty else [])
    assert not made_empty or list(Path(cfg.root).iterdir()) == []
    monkeypatch.setattr(synthetic, "write_retrieval", write_retrieval)
    root = ensure(cfg)
    assert sorted(p.name for p in root.iterdir()) == ["eval", "synthetic.json", "train"]
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["scenes", "shapes", "sugar_crepe"]
    assert list((tmp_path / "data").iterdir()) == [root]
    assert ensure(cfg) == root  # the same config: kept


def test_the_data_command_and_the_demo_name_a_folder_they_cannot_use(tmp_path, capsys):
    """A folder that holds something else, or one that cannot be made: a line naming it, exit 2, no traceback."""
    from launch import demo

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "a_file").write_text("")
    for out, error in ((tmp_path / "full", f"{tmp_path / 'full'} is not empty; pick another --out"),
                       (tmp_path / "a_file" / "data", f"--out {tmp_path / 'a_file' / 'data'}: cannot write there")):
        with pytest.raises(SystemExit) as exit_:
            synthetic.main(["--out", str(out)])
        assert exit_.value.code == 2 and error in capsys.readouterr().err
    (tmp_path / "root" / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "root" / "data" / "synthetic" / "mine.txt").write_text("")
    for root, error in ((tmp_path / "root", f"{tmp_path / 'root' / 'data' / 'synthetic'} holds something other than "
                                            "the demo's data; pick another --root"),
                        (tmp_path / "a_file", f"--root {tmp_path / 'a_file'}: cannot write there")):
        assert demo.main(["--root", str(root)]) == 2
        assert capsys.readouterr().err.startswith(f"[demo] error: {error}")
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_counts_that_would_leave_a_set_or_shard_empty_are_refused_before_anything_is_written(tmp_path, capsys):
    """An empty linear-probe or retrieval set made the evaluation fail long after; --image-size 0 was a traceback."""
    cases = {("--image-size", "0"): "--image-size=0 must be at least 1",
             ("--classification-train", "0"): "--classification-train=0 must be at least 1",
             ("--sugarcrepe-per-task", "0"): "--sugarcrepe-per-task=0 must be at least 1",
             ("--train-samples", "4"): "--train-shards=8 is more than --train-samples=4: a shard would be empty",
             ("--eval-shards", "7", "--retrieval-test", "6"): "--eval-shards=7 is more than --retrieval-test=6",
             ("--seed", "-1"): "--seed=-1 must be at least 0"}
    for args, error in cases.items():
        with pytest.raises(SystemExit) as exit_:
            synthetic.main(["--out", str(tmp_path / "data"), *args])
        assert exit_.value.code == 2 and error in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="train_samples=0 must be at least 1"):
        generate(SyntheticConfig(root=str(tmp_path / "data"), **{**TINY, "train_samples": 0}))


def test_as_many_samples_as_shards_fill_every_shard(tmp_path):
    """ceil(count / shards) per shard left the last of 9 samples in 6 shards empty."""
    root = generate(SyntheticConfig(root=str(tmp_path / "data"), **{**TINY, "train_samples": 9, "train_shards": 6,
                                                                       "retrieval_test": 7, "eval_shards": 6}))
    for folder, total in ((root / "train", 9), (root / "eval" / "scenes" / "test", 7)):
        sizes = [sum(1 for _ in wds.WebDataset(str(shard), shardshuffle=False))
                 for shard in sorted(folder.glob("*.tar"))]
        assert len(sizes) == 6 and min(sizes) >= 1 and sum(sizes) == total
    keys = [sample["__key__"] for sample in wds.WebDataset(str(root / "eval" / "scenes" / "test" / "{0..5}.tar"),
                                                           shardshuffle=False)]
    assert keys == [f"s{i:07d}" for i in range(7)]


def test_training_shards_in_img2dataset_format(synthetic_root):
    urls = shard_urls(str(synthetic_root / "train"))
    assert len(urls) == SMALL["train_shards"] >= 2
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == SMALL["train_samples"]
    sample = samples[0]
    assert {"jpg", "txt", "json"} <= set(sample)
    meta = sample["json"]
    assert meta["caption"] == sample["txt"] and meta["key"] == sample["__key__"] and meta["status"] == "success"
    assert sample["jpg"].size == (64, 64)
    # captions name colours and shapes, and pairs carry a spatial relation
    captions = [s["txt"] for s in samples[:200]]
    assert any(" left of " in c or " above " in c or " below " in c or " right of " in c for c in captions)
    assert all(any(col in c for col in synthetic.COLOURS) for c in captions)


def test_classification_set_reads_through_clip_benchmark(synthetic_root):
    root = str(synthetic_root / "eval" / "shapes")
    test = build_dataset("wds/shapes", root=root, split="test", download=False, task="zeroshot_classification")
    train = build_dataset("wds/shapes", root=root, split="train", download=False, task="linear_probe")
    assert test.classes == synthetic.classnames() and len(test.classes) == 18
    assert all("{c}" in t for t in test.templates)
    labels = [label for _, label in test]
    assert len(labels) == SMALL["classification_test"] and set(labels) == set(range(18))
    assert sum(1 for _ in train) == SMALL["classification_train"]


def test_retrieval_set_has_several_captions_per_image(synthetic_root):
    ds = build_dataset("wds/scenes", root=str(synthetic_root / "eval" / "scenes"), split="test", download=False,
                       task="zeroshot_retrieval")
    items = list(ds)
    assert len(items) == SMALL["retrieval_test"]
    assert all(len(captions) == 3 for _, captions in items)


@pytest.mark.parametrize("task", SUGARCREPE_TASKS)
def test_sugarcrepe_layout_and_negatives(synthetic_root, task):
    ds = build_dataset(f"sugar_crepe/{task}", root=str(synthetic_root / "eval" / "sugar_crepe"), download=False,
                       task="image_caption_selection")
    assert len(ds) == SMALL["sugarcrepe_per_task"]
    image, (positive, negative) = ds[0]
    assert image.size == (64, 64) and positive != negative
    annotations = json.loads((synthetic_root / "eval" / "sugar_crepe" / f"{task}.json").read_text())
    assert set(annotations["0"]) == {"filename", "caption", "negative_caption"}


def test_sugarcrepe_edits_do_what_their_name_says():
    import random

    a, b = synthetic.Thing("red", "circle"), synthetic.Thing("blue", "square")
    rng = random.Random(0)
    pos, neg = synthetic.sugarcrepe_negative("swap_att", a, "above", b, rng)
    assert (pos, neg) == ("a red circle above a blue square.", "a blue circle above a red square.")
    pos, neg = synthetic.sugarcrepe_negative("swap_obj", a, "above", b, rng)
    assert neg == "a red square above a blue circle."
    pos, neg = synthetic.sugarcrepe_negative("replace_rel", a, "above", b, rng)
    assert neg == "a red circle below a blue square."
    pos, neg = synthetic.sugarcrepe_negative("replace_att", a, "above", b, rng)
    assert neg != pos and neg.endswith("circle above a blue square.") and not neg.startswith("a red")
    pos, neg = synthetic.sugarcrepe_negative("add_obj", a, "above", b, rng)
    assert neg.startswith(pos[:-1] + " and a ")


def stream(shards: str, workers: int, batch_size: int = 16, seed: int = 0):
    _, train_tf, _, tokenizer, _ = create(ModelConfig(), None)
    cfg = DataConfig(train_shards=shards, workers=workers)
    return iter(training_stream(cfg, train_tf, tokenizer, batch_size=batch_size, seed=seed))


def first_batches(shards: str, workers: int, seed: int, count: int = 4, global_seed: int = 0):
    torch.manual_seed(global_seed)  # without workers the crops draw from the global random state
    return [batch for batch, _ in zip(stream(shards, workers, seed=seed), range(count))]


def same(batches, others):
    return all(torch.equal(images, other_images) and torch.equal(texts, other_texts)
               for (images, texts), (other_images, other_texts) in zip(batches, others, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_gives_the_same_batches(synthetic_root, workers):
    """The shards a worker draws, their shuffle and the crops follow the seed (webdataset's own resampled
    WebDataset draws shards from the clock and os.urandom, whatever its seed)."""
    shards = str(synthetic_root / "train")
    batches = first_batches(shards, workers, seed=3)
    assert same(batches, first_batches(shards, workers, seed=3))
    assert not same(batches, first_batches(shards, workers, seed=4))
    if workers:  # the loader takes batches from its workers in turn; each worker draws its own shards
        assert not torch.equal(batches[0][1], batches[1][1])
        # the workers' crops follow the stream's seed alone, not the global random state (the masks' noise)
        assert same(batches, first_batches(shards, workers, seed=3, global_seed=1))
        _, train_tf, _, tokenizer, _ = create(ModelConfig(), None)
        state = torch.get_rng_state()
        next(iter(training_stream(DataConfig(train_shards=shards, workers=workers), train_tf, tokenizer, 16, seed=3)))
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_steps_batch_does_not_depend_on_the_step_the_loader_started_from(workers):
    """Checkpoint intervals [0, 3), [3, 6), [6, 8): the loader that starts at step 3 (a resumed run) gives the
    batches of steps 3 to 7 that the loader started at 0 gave, though its workers take other steps; each
    interval's part of each worker is drawn from a seed of its own, and the seed given decides them all."""
    def open_slot(slot_seed):  # an endless stream of batches, each naming its slot's seed and its place
        return ((slot_seed, place) for place in itertools.count())

    def batches(intervals, seed=0):
        pipeline = wds.DataPipeline(functools.partial(interval_batches, open_slot, intervals, seed))
        return [tuple(map(int, batch)) for batch in wds.WebLoader(pipeline, batch_size=None, num_workers=workers)]

    from_0 = batches([(0, 3), (3, 6), (6, 8)])
    assert len(from_0) == 8 and len(set(from_0)) == 8
    assert len({slot for slot, _ in from_0}) == 2 * min(workers, 3) + min(workers, 2)  # slots per interval
    assert batches([(3, 6), (6, 8)]) == from_0[3:]
    assert set(batches([(0, 3), (3, 6), (6, 8)], seed=1)).isdisjoint(from_0)


@pytest.mark.parametrize("model", ["ViT-Tiny-8-64", "ViT-B-16"])
def test_the_loader_hands_over_uint8_images_that_the_device_part_makes_the_whole_transforms(synthetic_root, model):
    """The trainer's loader runs the transform up to a uint8 tensor (a quarter of the bytes to batch, hand over, pin
    and copy); normalised on the device, each batch is the whole transform's, bit for bit, crops included."""
    _, train_tf, _, tokenizer, _ = create(ModelConfig(name=model), None)
    host, finish = split_transform(train_tf)
    cfg = DataConfig(train_shards=str(synthetic_root / "train"), workers=2)
    whole = training_stream(cfg, train_tf, tokenizer, batch_size=8, seed=5)
    split = training_stream(cfg, host, tokenizer, batch_size=8, seed=5)
    for (images, texts), (small, same_texts), _ in zip(whole, split, range(3)):
        assert small.dtype == torch.uint8 and images.dtype == torch.float32 and small.shape == images.shape
        assert torch.equal(finish(small), images) and torch.equal(texts, same_texts)
    # a transform of another form stays whole on the host, and the device part leaves the batch alone
    host, finish = split_transform(train_tf.transforms[0])
    assert host is train_tf.transforms[0] and finish(images) is images


def test_training_stream_with_as_many_workers_as_shards(synthetic_root):
    shards = str(synthetic_root / "train")
    images, texts = next(stream(shards, workers=2))
    assert images.shape == (16, 3, 64, 64) and texts.shape == (16, 32)
    assert check_workers(shard_urls(shards), 8) == SMALL["train_shards"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("image_key, pil_format", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"),
                                                   ("webp", "WEBP")])
def test_shards_of_each_image_format_img2dataset_and_webdataset_write_are_read(synthetic_root, tmp_path, image_key,
                                                                              pil_format):
    """img2dataset writes jpg, png or webp (--encode_format); other tools write `.jpeg` (a shard of those failed
    every sample, and the job after 1000 of them)."""
    import io

    from PIL import Image

    source = next(iter(wds.WebDataset(str(sorted((synthetic_root / "train").glob("*.tar"))[0]), shardshuffle=False)))
    encoded = io.BytesIO()
    Image.open(io.BytesIO(source["jpg"])).save(encoded, format=pil_format)
    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for i in range(20):
            sink.write({"__key__": f"{i:05d}", image_key: encoded.getvalue(), "txt": source["txt"]})
    images, texts = next(stream(str(tmp_path / "0.tar"), workers=0, batch_size=8))
    assert images.shape == (8, 3, 64, 64) and texts.shape == (8, 32)


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*: 4 shard\(s\) missing, e.g. .*nothing-000.tar"):
        shard_urls(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*nothing-\*.tar' matches no shard"):
        shard_urls(str(tmp_path / "nothing-*.tar"))
    # a folder that is not there is not "1 shard missing"
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*/nowhere': no such folder or shard$"):
        shard_urls(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*/empty' matches no shard"):
        (tmp_path / "empty").mkdir()
        shard_urls(str(tmp_path / "empty"))


def test_sources_joined_by_double_colons_are_read_together_as_open_clip_reads_them(synthetic_root, tmp_path):
    """open_clip's `--train-data cc3m/{...}.tar::cc12m/{...}.tar`: brace-expanded whole, it named shards such as
    `00000.tar::.../00002.tar`, "4 shard(s) missing"; a relative one was not made absolute for the jobs."""
    from launch.graph import pinned_path

    first, second = tmp_path / "cc3m", tmp_path / "cc12m"
    for folder, names in ((first, ("00000.tar", "00001.tar")), (second, ("00002.tar", "00003.tar"))):
        folder.mkdir()
        for name in names:
            shutil.copy(synthetic_root / "train" / name, folder / name)
    spec = f"{first}/{{00000..00001}}.tar::{second}"
    assert shard_urls(spec) == [str(first / "00000.tar"), str(first / "00001.tar"), str(second / "00002.tar"),
                                str(second / "00003.tar")]
    images, _ = next(stream(spec, workers=2))
    assert images.shape == (16, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards='.*' \(its '.*/nowhere'\): no such folder"):
        shard_urls(f"{first}::{tmp_path / 'nowhere'}")
    assert pinned_path("cc3m::cc12m/*.tar", tmp_path) == f"{first}::{second}/*.tar"
    assert pinned_path("pipe:cat x.tar::/abs/{0..1}.tar", tmp_path) == "pipe:cat x.tar::/abs/{0..1}.tar"


def test_shards_that_are_git_lfs_pointers_are_named(synthetic_root, tmp_path):
    """A Hugging Face dataset cloned without git lfs holds pointers in place of its shards. The training read them
    as truncated tars and skipped them with a warning each: it trained on the shards that were pulled, or, with
    none, failed after a thousand warnings."""
    shards = shutil.copytree(synthetic_root / "train", tmp_path / "train")
    for name in ("00001.tar", "00003.tar"):
        git_lfs_pointer(shards / name)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*: 2 shard\(s\) are Git LFS pointers, not "
                                                r"shards, e.g. .*/train/00001.tar: fetch them with `git lfs pull` in "
                                                "their clone"):
        shard_urls(str(shards / "{00000..00003}.tar"))
    assert len(shard_urls(str(shards / "0000[02].tar"))) == 2


@pytest.mark.timeout(180)  # the stream is resampled: before the guard this spun for ever
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_of_unreadable_shards_fails_naming_them(tmp_path, workers):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(RuntimeError, match=r"data.train_shards=.*bad-\{0\.\.1\}.tar.*in a row could not be read"):
        next(stream(str(tmp_path / "bad-{0..1}.tar"), workers))


@pytest.mark.timeout(180)
def test_a_truncated_shard_beside_a_good_one_is_skipped_with_a_warning(synthetic_root, tmp_path):
    """A shard cut short (a copy that died midway) ends in a sample without its caption: skipped, training goes on
    (before, to_tuple raised and the job died)."""
    good, cut = sorted((synthetic_root / "train").glob("*.tar"))[:2]
    (tmp_path / "0.tar").write_bytes(good.read_bytes())
    (tmp_path / "1.tar").write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    samples_per_shard = SMALL["train_samples"] // SMALL["train_shards"]
    # the shards are drawn at random with replacement: read until the cut shard's last sample has come through
    # (40 shards' worth, whatever the seed, would miss it with odds of 2^-40), then 4 batches more
    batches, after_warning = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch, _ in zip(stream(str(tmp_path), 0, batch_size=100), range(40 * samples_per_shard // 100)):
            batches.append(batch)
            warned = any(issubclass(w.category, UserWarning) and re.search(r"didn't find \['txt'\]", str(w.message))
                         for w in caught)
            after_warning = len(batches) if warned and after_warning is None else after_warning
            if after_warning is not None and len(batches) == after_warning + 4:
                break
    assert after_warning is not None and len(batches) == after_warning + 4
    assert all(images.shape[0] == 100 for images, _ in batches)
