"""Training data: img2dataset-style webdataset shards -> (image, tokens) batches.

Our own pipeline (open_clip_train's loader breaks on webdataset >= 0.2.96). The stream is resampled
(infinite, shards drawn with replacement per worker), so training is counted in steps and a resumed job
needs no epoch bookkeeping.
"""
from __future__ import annotations

import glob
import os

from .config import DataConfig, validate_data as validate


def shard_urls(spec: str) -> list:
    """Expand a brace pattern (``a/{000..007}.tar``), a glob or a directory into a sorted list of shards."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(ch in spec for ch in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    if not urls:
        raise FileNotFoundError(f"data.train_shards={spec!r} matches no shard")
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"data.train_shards={spec!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


def check_workers(urls: list, workers: int) -> int:
    """webdataset 1.x raises when a worker gets no shard: never start more workers than shards."""
    return min(workers, len(urls))


def training_stream(cfg: DataConfig, transform, tokenizer, batch_size: int, seed: int):
    import webdataset as wds  # here, not at the top: the launcher checks shard paths without importing torch

    validate(cfg)
    urls = shard_urls(cfg.train_shards)
    workers = check_workers(urls, cfg.workers)
    pipeline = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node, seed=seed,
                       handler=wds.warn_and_continue)
        .shuffle(cfg.shuffle_buffer, seed=seed)
        .decode("pilrgb", handler=wds.warn_and_continue)
        .to_tuple("jpg;png;webp", "txt")
        .map_tuple(transform, lambda text: tokenizer([text])[0])
        .batched(batch_size, partial=False)
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def sample_batches(cfg: DataConfig, transform, tokenizer, batch_size: int, count: int, seed: int = 0):
    """The first `count` batches of a fresh stream (for threshold calibration and pictures), no workers."""
    loader_cfg = DataConfig(cfg.train_shards, cfg.eval_root, 0, cfg.shuffle_buffer)
    batches = []
    for images, texts in training_stream(loader_cfg, transform, tokenizer, batch_size, seed):
        batches.append((images, texts))
        if len(batches) == count:
            break
    return batches
