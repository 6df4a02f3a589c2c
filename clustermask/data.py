"""Training data: img2dataset-style webdataset shards -> (image, tokens) batches.

Our own pipeline (open_clip_train's loader breaks on webdataset >= 0.2.96). The stream is resampled
(infinite, shards drawn with replacement per worker), so training is counted in steps and a resumed job
needs no epoch bookkeeping. The draw and the shuffle are seeded: the same seed gives the same batches.
"""
from __future__ import annotations

import glob
import os
import warnings

from .config import DataConfig, validate_data as validate


def shard_urls(spec: str) -> list:
    """Expand a brace pattern (``a/{000..007}.tar``), a glob or a directory into a sorted list of shards."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(ch in spec for ch in "*?["):
        urls = sorted(glob.glob(spec))
    elif not any(ch in spec for ch in "{:") and not os.path.exists(spec):  # one path (not a brace pattern or URL)
        raise FileNotFoundError(f"data.train_shards={spec!r}: no such folder or shard")
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


class SkipUnreadable:
    """A webdataset handler: skip an unreadable shard or sample with a warning, as img2dataset data needs, but
    raise once `limit` fail in a row. The stream is resampled, so where every shard is unreadable (truncated,
    not tar) skipping alone would spin for ever and a job would burn its whole time limit, then requeue."""

    def __init__(self, spec: str, limit: int = 1000):
        self.spec, self.limit, self.failures_in_a_row = spec, limit, 0

    def __call__(self, exn: Exception) -> bool:
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.limit:
            raise RuntimeError(f"data.train_shards={self.spec!r}: {self.limit} shards or samples in a row could not "
                               f"be read, the last with {exn!r}") from exn
        warnings.warn(repr(exn))  # as wds.warn_and_continue, without its 0.5 s sleep per failure
        return True

    def read(self, sample):
        self.failures_in_a_row = 0
        return sample


def training_stream(cfg: DataConfig, transform, tokenizer, batch_size: int, seed: int):
    import webdataset as wds  # here, not at the top: the launcher checks shard paths without importing torch

    validate(cfg)
    urls = shard_urls(cfg.train_shards)
    workers = check_workers(urls, cfg.workers)
    skip = SkipUnreadable(cfg.train_shards)
    shuffle = [wds.shuffle(cfg.shuffle_buffer, seed=seed)] if cfg.shuffle_buffer > 0 else []
    pipeline = wds.DataPipeline(
        # WebDataset(resampled=True) ignores its seed: it draws shards from the pid, the clock and os.urandom.
        # Here each rank and loader worker draws its own shards from `seed` and its rank * 1000 + worker.
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=skip),
        *shuffle,
        wds.decode("pilrgb", handler=skip),
        wds.to_tuple("jpg;png;webp", "txt", handler=skip),
        wds.map(skip.read),
        wds.map_tuple(transform, lambda text: tokenizer([text])[0]),
        wds.batched(batch_size, partial=False),
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
