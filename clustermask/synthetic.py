"""Synthetic, seeded demo data: coloured shapes on textured backgrounds, with captions that name them.

Writes, under one root:

- ``train/``: training shards as img2dataset writes them (``{key}.jpg``, ``{key}.txt``, ``{key}.json``);
- ``eval/shapes/``: zero-shot / linear-probe classification set in clip_benchmark's ``wds/`` layout;
- ``eval/scenes/``: retrieval set (several captions per image) in the same layout;
- ``eval/sugar_crepe/``: SugarCrepe layout (``val2017/`` images plus the seven json files).

CLI: ``clustermask-data --out data/synthetic [--seed 0] [--train-samples 20000] ...``
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 200), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"to the left of": "to the right of", "to the right of": "to the left of",
             "above": "below", "below": "above"}
TEMPLATES = ("a photo of a {c}.", "a {c}.", "a {c} on a textured background.")
TAR_MTIME = 1_700_000_000  # fixed, so that the same seed writes byte-identical shards
SUGARCREPE_TASKS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


@dataclass
class SyntheticConfig:
    root: str = "data/synthetic"
    seed: int = 0
    image_size: int = 64
    train_samples: int = 12000
    train_shards: int = 8
    classification_train: int = 1200
    classification_test: int = 600
    retrieval_test: int = 300
    sugarcrepe_per_task: int = 150
    eval_shards: int = 2


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


# ---------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(70, 160)
    tint = rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
    stripes = 18 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    noise = rng.normal(0, 10, size=(size, size, 3))
    img = base + tint + stripes[..., None] + noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif thing.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)


def render(things: List[Thing], relation: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One thing centred, or two placed so that `things[0] relation things[1]` holds."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    jitter = lambda: rng.uniform(-0.06, 0.06) * size  # noqa: E731
    if len(things) == 1:
        _draw(draw, things[0], size / 2 + jitter(), size / 2 + jitter(), size * rng.uniform(0.22, 0.32))
        return img
    near, far = size * 0.27, size * 0.73
    first, second = {
        "to the left of": ((near, size / 2), (far, size / 2)), "to the right of": ((far, size / 2), (near, size / 2)),
        "above": ((size / 2, near), (size / 2, far)), "below": ((size / 2, far), (size / 2, near)),
    }[relation]
    for thing, (cx, cy) in ((things[0], first), (things[1], second)):
        _draw(draw, thing, cx + jitter(), cy + jitter(), size * rng.uniform(0.16, 0.21))
    return img


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ---------------------------------------------------------------- scenes and captions


def random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))


def random_pair(rng: random.Random) -> Tuple[Thing, Thing]:
    """Two things differing in both colour and shape, so that swaps always change the meaning."""
    colours, shapes = rng.sample(list(COLOURS), 2), rng.sample(SHAPES, 2)
    return Thing(colours[0], shapes[0]), Thing(colours[1], shapes[1])


def pair_caption(a: Thing, relation: str, b: Thing) -> str:
    return f"a {a.name} {relation} a {b.name}."


def training_example(rng: random.Random):
    if rng.random() < 0.5:
        thing = random_thing(rng)
        return [thing], "", rng.choice(TEMPLATES).format(c=thing.name)
    a, b = random_pair(rng)
    relation = rng.choice(list(RELATIONS))
    return [a, b], relation, pair_caption(a, relation, b)


def retrieval_captions(a: Thing, relation: str, b: Thing) -> List[str]:
    return [pair_caption(a, relation, b), pair_caption(b, RELATIONS[relation], a),
            f"a photo of a {a.name} and a {b.name}."]


def sugarcrepe_negative(task: str, a: Thing, relation: str, b: Thing, rng: random.Random) -> Tuple[str, str]:
    """(positive, negative) captions made by SugarCrepe's edit `task` on the scene `a relation b`."""
    positive = pair_caption(a, relation, b)
    other_colour = lambda *used: rng.choice([c for c in COLOURS if c not in used])  # noqa: E731
    other_shape = lambda *used: rng.choice([s for s in SHAPES if s not in used])  # noqa: E731
    if task == "add_att":  # the positive omits an attribute, the negative adds a wrong one
        positive = f"a {a.shape} {relation} a {b.name}."
        return positive, f"a {other_colour(a.colour)} {a.shape} {relation} a {b.name}."
    if task == "add_obj":
        extra = Thing(other_colour(a.colour, b.colour), other_shape())
        return positive, f"a {a.name} {relation} a {b.name} and a {extra.name}."
    if task == "replace_att":
        return positive, pair_caption(Thing(other_colour(a.colour), a.shape), relation, b)
    if task == "replace_obj":
        return positive, pair_caption(Thing(a.colour, other_shape(a.shape, b.shape)), relation, b)
    if task == "replace_rel":
        return positive, pair_caption(a, RELATIONS[relation], b)
    if task == "swap_att":
        return positive, pair_caption(Thing(b.colour, a.shape), relation, Thing(a.colour, b.shape))
    if task == "swap_obj":
        return positive, pair_caption(Thing(a.colour, b.shape), relation, Thing(b.colour, a.shape))
    raise ValueError(f"unknown SugarCrepe task {task!r}; expected one of {SUGARCREPE_TASKS}")


# ---------------------------------------------------------------- writers


def shard_ranges(count: int, shards: int) -> List[range]:
    """The indices of each of `shards` shards of `count` samples, as even as can be: none empty where there are
    as many samples as shards (ceil(count / shards) per shard left the last of 9 samples in 6 shards empty)."""
    return [range(shard * count // shards, (shard + 1) * count // shards) for shard in range(shards)]


def write_training_shards(cfg: SyntheticConfig, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(cfg.seed), np.random.default_rng(cfg.seed)
    for shard, indices in enumerate(shard_ranges(cfg.train_samples, cfg.train_shards)):
        with wds.TarWriter(str(out / f"{shard:05d}.tar"), mtime=TAR_MTIME) as sink:
            for index in indices:
                things, relation, caption = training_example(rng)
                key = f"{shard:05d}{index:06d}"
                meta = {"key": key, "caption": caption, "url": f"synthetic://{cfg.seed}/{index}",
                        "width": cfg.image_size, "height": cfg.image_size, "status": "success",
                        "things": [t.name for t in things], "relation": relation}
                sink.write({"__key__": key, "jpg": jpeg_bytes(render(things, relation, cfg.image_size, nrng)),
                            "txt": caption, "json": json.dumps(meta)})
    return cfg.train_samples


def _write_wds_split(out: Path, split: str, samples, shards: int) -> None:
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for shard, indices in enumerate(shard_ranges(len(samples), shards)):
        with wds.TarWriter(str(split_dir / f"{shard}.tar"), mtime=TAR_MTIME) as sink:
            for i in indices:
                sink.write({"__key__": f"s{i:07d}", **samples[i]})
    (split_dir / "nshards.txt").write_text(f"{shards}\n")


def classnames() -> List[str]:
    return [Thing(c, s).name for c in COLOURS for s in SHAPES]


def write_classification(cfg: SyntheticConfig, out: Path, seed_offset: int = 1) -> None:
    names = classnames()
    out.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(names) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (out / "dataset_type.txt").write_text("classification\n")
    for split, count, offset in (("train", cfg.classification_train, seed_offset),
                                 ("test", cfg.classification_test, seed_offset + 1)):
        rng, nrng = random.Random(cfg.seed * 1000 + offset), np.random.default_rng(cfg.seed * 1000 + offset)
        samples = []
        for i in range(count):
            label = i % len(names)  # balanced classes
            colour, shape = names[label].split(" ")
            img = render([Thing(colour, shape)], "", cfg.image_size, nrng)
            samples.append({"jpg": jpeg_bytes(img), "cls": label})
        rng.shuffle(samples)
        _write_wds_split(out, split, samples, cfg.eval_shards)


def write_retrieval(cfg: SyntheticConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset_type.txt").write_text("retrieval\n")
    rng, nrng = random.Random(cfg.seed * 1000 + 7), np.random.default_rng(cfg.seed * 1000 + 7)
    samples = []
    for _ in range(cfg.retrieval_test):
        a, b = random_pair(rng)
        relation = rng.choice(list(RELATIONS))
        img = render([a, b], relation, cfg.image_size, nrng)
        samples.append({"jpg": jpeg_bytes(img), "txt": "\n".join(retrieval_captions(a, relation, b))})
    _write_wds_split(out, "test", samples, cfg.eval_shards)


def write_sugarcrepe(cfg: SyntheticConfig, out: Path) -> None:
    images = out / "val2017"
    images.mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(cfg.seed * 1000 + 11), np.random.default_rng(cfg.seed * 1000 + 11)
    for task in SUGARCREPE_TASKS:
        annotations = {}
        for i in range(cfg.sugarcrepe_per_task):
            a, b = random_pair(rng)
            relation = rng.choice(list(RELATIONS))
            filename = f"{task}_{i:05d}.jpg"
            render([a, b], relation, cfg.image_size, nrng).save(images / filename, quality=95)
            caption, negative = sugarcrepe_negative(task, a, relation, b, rng)
            annotations[str(i)] = {"filename": filename, "caption": caption, "negative_caption": negative}
        (out / f"{task}.json").write_text(json.dumps(annotations, indent=1))


def validate(cfg: SyntheticConfig, flag=lambda field: field) -> None:
    """Raise ValueError naming a negative seed, or a count that would leave a set or a shard empty (a linear probe
    on no images, a retrieval of nothing: the evaluation would fail long after). `flag(field)`: how the message
    names a field."""
    if cfg.seed < 0:  # numpy's generators take none: a ValueError that named no option, once generation began
        raise ValueError(f"{flag('seed')}={cfg.seed} must be at least 0")
    counts = {name: value for name, value in asdict(cfg).items() if name not in ("root", "seed")}
    for field, value in counts.items():
        if value < 1:
            raise ValueError(f"{flag(field)}={value} must be at least 1")
    if cfg.train_shards > cfg.train_samples:
        raise ValueError(f"{flag('train_shards')}={cfg.train_shards} is more than {flag('train_samples')}="
                         f"{cfg.train_samples}: a shard would be empty")
    smallest = min(("classification_train", "classification_test", "retrieval_test"), key=counts.__getitem__)
    if cfg.eval_shards > counts[smallest]:
        raise ValueError(f"{flag('eval_shards')}={cfg.eval_shards} is more than {flag(smallest)}={counts[smallest]}: "
                         "a shard of that set would be empty")


def generate(cfg: SyntheticConfig) -> Path:
    """Write every set under cfg.root; returns the root. Refuses to write over a non-empty root.

    The sets are written into a folder beside the root, renamed to it once complete: an interrupted run (Ctrl-C
    in the demo) leaves no half-written root, which the next run would refuse as not empty."""
    validate(cfg)
    root = Path(cfg.root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; pick another --out or remove it first")
    partial = root.resolve().with_name(f".{root.resolve().name}.partial-{os.getpid()}")
    try:
        write_training_shards(cfg, partial / "train")
        write_classification(cfg, partial / "eval" / "shapes")
        write_retrieval(cfg, partial / "eval" / "scenes")
        write_sugarcrepe(cfg, partial / "eval" / "sugar_crepe")
        (partial / "synthetic.json").write_text(json.dumps(cfg.__dict__, indent=1))
        if root.exists():  # empty, as checked above; it may be the working folder, so filled rather than replaced
            for name in ("train", "eval", "synthetic.json"):
                (partial / name).rename(root / name)
        else:
            partial.rename(root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def ensure(cfg: SyntheticConfig) -> Path:
    """Generate unless the same config was generated there already."""
    marker = Path(cfg.root) / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg.__dict__:
        return Path(cfg.root)
    return generate(cfg)


def main(argv=None) -> None:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=defaults.root, help="a folder that is empty or not there yet "
                        "(default: %(default)s)")
    for field, what in (("seed", "every set follows it"), ("image_size", "pixels a side"),
                        ("train_samples", "image-caption pairs to train on"),
                        ("train_shards", "the .tar shards they are written into"),
                        ("classification_train", "images of the zero-shot / linear-probe set's train split"),
                        ("classification_test", "images of its test split"),
                        ("retrieval_test", "images of the retrieval set, 3 captions each"),
                        ("sugarcrepe_per_task", "images of each of the 7 SugarCrepe edits"),
                        ("eval_shards", "shards of each evaluation split")):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field),
                            help=f"{what} (default: %(default)s)")
    args = vars(parser.parse_args(argv))
    args["root"] = args.pop("out")
    cfg = SyntheticConfig(**args)
    try:
        validate(cfg, flag=lambda field: f"--{field.replace('_', '-')}")
        root = generate(cfg)
    except (FileExistsError, ValueError) as exc:  # names the folder or the count, and what to do
        parser.error(str(exc))
    except OSError as exc:
        parser.error(f"--out {args['root']}: cannot write there ({exc.strerror or exc})")
    print(f"synthetic data written to {root}")


if __name__ == "__main__":
    main()
