"""The training loader's throughput in one stream and in checkpoint intervals (train.exact_resume).

    python bench/loader_intervals.py --data data/synthetic [--workers 2] [--batch 64] [--steps 400]
    python bench/loader_intervals.py --data DATA256 --model ViT-B-16 --batch 256 --steps 24 --intervals one --workers 1

Each interval starts every loader worker's part afresh (its shards, its shuffle buffer), so that a resumed run
draws what it would have drawn: this times the loader alone, no model, for one interval and for intervals of
50 and 10 steps, twice each, and prints batches and images per second. With `--model ViT-B-16` (its 224 px
crops) on 256 px shards and one worker, it is what one CPU core feeds a GPU (`clustermask-data --image-size 256`).
"""
import argparse
import time

from clustermask.data import DataConfig, split_transform, training_stream
from clustermask.model import ModelConfig, create


def batches_per_s(cfg: DataConfig, transform, tokenizer, batch: int, intervals) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in training_stream(cfg, transform, tokenizer, batch, seed=0, intervals=intervals))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a folder with train/ shards (clustermask-data --out ...)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--model", default=ModelConfig.name, help="whose transform and tokenizer (its crop size)")
    parser.add_argument("--intervals", default="one,50,10", help="comma-separated: `one` stream, or steps per interval")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--whole-transform", action="store_true",
                        help="normalised float images from the workers, as the trainer's loader until 2026-12-04 (now "
                             "uint8, normalised on the device: data.split_transform)")
    args = parser.parse_args()
    _, transform, _, tokenizer, _ = create(ModelConfig(name=args.model), None)
    if not args.whole_transform:
        transform = split_transform(transform)[0]
    cfg = DataConfig(train_shards=f"{args.data}/train", workers=args.workers)
    print(f"| intervals | batches/s ({args.workers} workers, batches of {args.batch}, {args.steps} steps, "
          f"{args.model}'s transform{', whole' if args.whole_transform else ' to uint8'}) | images/s |")
    print("|---|---|---|")
    for every in [args.steps if e == "one" else int(e) for e in args.intervals.split(",")] * args.repeat:
        intervals = [(first, min(first + every, args.steps)) for first in range(0, args.steps, every)]
        rate = batches_per_s(cfg, transform, tokenizer, args.batch, intervals)
        print(f"| {'one' if every == args.steps else f'{every} steps'} | {rate:.2f} | {rate * args.batch:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
