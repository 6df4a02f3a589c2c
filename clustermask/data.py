"""Training data: img2dataset-style webdataset shards -> (image, tokens) batches.

Our own pipeline (open_clip_train's loader breaks on webdataset >= 0.2.96). The stream is resampled
(infinite, shards drawn with replacement), so training is counted in steps and a resumed job needs no epoch
bookkeeping. The draw, the shuffle and the crops are seeded, per checkpoint interval: the same seed gives the same
batches, and a step's batch is the same whichever checkpoint the run resumed from.
"""
from __future__ import annotations

import functools
import glob
import itertools
import os
import random
import sys
import warnings

from .config import DataConfig, is_git_lfs_pointer, lfs_pull_hint, validate_data as validate


def shard_urls(spec: str) -> list:
    """Expand a brace pattern (``a/{000..007}.tar``), a glob or a directory into a sorted list of shards; several
    such sources joined by ``::`` (open_clip's ``--train-data a::b``) into one list, whose shards are drawn alike (a
    source in proportion to its shards)."""
    sources = spec.split("::")
    urls = []
    for source in sources:
        where = f"data.train_shards={spec!r}" + (f" (its {source!r})" if len(sources) > 1 else "")
        urls += source_urls(source, where)
    local = [u for u in urls if "://" not in u]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"data.train_shards={spec!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    pointers = [u for u in local if is_git_lfs_pointer(u)]
    if pointers:
        raise FileNotFoundError(f"data.train_shards={spec!r}: {lfs_pull_hint(pointers, 'their clone')}")
    return urls


def source_urls(source: str, where: str) -> list:
    """The shards of one source (`where`: how errors name it)."""
    if os.path.isdir(source):
        urls = sorted(glob.glob(os.path.join(source, "*.tar")))
    elif any(ch in source for ch in "*?["):
        urls = sorted(glob.glob(source))
    elif not any(ch in source for ch in "{:") and not os.path.exists(source):  # one path (not a brace pattern or URL)
        raise FileNotFoundError(f"{where}: no such folder or shard")
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(source))
    if not urls:
        raise FileNotFoundError(f"{where} matches no shard")
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


def derive_seed(*parts) -> int:
    """A seed for the tuple `parts` (ints, strings), the same in every process (SHA-512 of their text, not
    Python's salted hash), and different for every tuple in practice."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def batch_pipeline(cfg: DataConfig, urls: list, transform, tokenizer, batch_size: int, seed: int):
    """An endless stream of (images, tokens) batches: shards drawn with replacement and their samples shuffled,
    both from `seed` alone."""
    import webdataset as wds

    skip = SkipUnreadable(cfg.train_shards)
    shuffle = [wds.shuffle(cfg.shuffle_buffer, seed=seed)] if cfg.shuffle_buffer > 0 else []
    return wds.DataPipeline(
        # WebDataset(resampled=True) ignores its seed: it draws shards from the pid, the clock and os.urandom.
        # The worker's own seed is not mixed in either: `seed` already says which slot of which rank this is.
        wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=lambda: 0),
        wds.tarfile_to_samples(handler=skip),
        *shuffle,
        wds.decode("pilrgb", handler=skip),
        wds.to_tuple("jpg;jpeg;png;webp", "txt", handler=skip),  # img2dataset writes jpg, png or webp
        wds.map(skip.read),
        wds.map_tuple(transform, lambda text: tokenizer([text])[0]),
        wds.batched(batch_size, partial=False),
    )


def split_transform(transform):
    """(the host part, the device part) of an open_clip image transform that ends in ToTensor and Normalize.

    The host part ends with the image as a uint8 tensor (C, H, W) instead of normalised floats: a quarter of the
    bytes for a loader worker to batch and hand over and for the trainer to pin and copy to the GPU, and a loader
    worker spared the float conversion and normalisation (a third of its time per image on ViT-B-16's 224 px
    crops). The device part turns a batch of those into what the whole transform gives, to the last bit: the same
    fp32 division by 255, subtraction and division, elementwise. A transform of another form stays whole on the
    host; its device part leaves the batch as it is."""
    import torch
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return transform, lambda images: images
    normalize = steps[-1]

    def finish(images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(torch.get_default_dtype()).div(255))  # as ToTensor, then Normalize

    return T.Compose([*steps[:-2], T.PILToTensor()]), finish


def interval_batches(open_slot, intervals, seed: int):
    """The batches of the steps of `intervals` ([(first, end)]: checkpoint intervals), as one loader worker's part.

    The loader takes its workers' batches in turn, so worker w of W makes those of steps start + w, start + w + W,
    ... Within an interval the steps first + j, first + j + W, ... (slot j) come from a stream of their own,
    `open_slot(seed of (seed, first, j))`: a step's batch does not depend on the step that the run started from (a
    run resumed at a checkpoint gives each worker other slots, and the same batches). In a worker the crops (torch's
    random state) follow the slot too; without workers they draw from the global random state, as the masks do."""
    import torch

    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    start = intervals[0][0]
    for first, end in intervals:
        steps = range(first + (start + worker - first) % workers, end, workers)
        if not steps:
            continue
        slot_seed = derive_seed(seed, first, steps[0] - first)
        if info is not None:
            torch.manual_seed(slot_seed)
            random.seed(slot_seed)
        yield from itertools.islice(open_slot(slot_seed), len(steps))


def training_stream(cfg: DataConfig, transform, tokenizer, batch_size: int, seed: int, intervals=None,
                    pin_memory: bool = False):
    """A loader of (images, tokens) batches that follows `seed` alone (the shards each worker draws, the
    shuffle, and the crops when it has workers), for the steps of `intervals` ([(first, end)], checkpoint
    intervals; endless by default). With workers it neither reads nor draws from the global random state.
    `pin_memory` (for a GPU): batches in page-locked memory, whose copy to the GPU need not wait on the host."""
    import torch
    import webdataset as wds  # here, not at the top: the launcher checks shard paths without importing torch

    validate(cfg)
    urls = shard_urls(cfg.train_shards)
    open_slot = functools.partial(batch_pipeline, cfg, urls, transform, tokenizer, batch_size)
    batches = wds.DataPipeline(functools.partial(interval_batches, open_slot, intervals or [(0, sys.maxsize)], seed))
    return wds.WebLoader(batches, batch_size=None, num_workers=check_workers(urls, cfg.workers), pin_memory=pin_memory,
                         generator=torch.Generator().manual_seed(seed))  # the workers' seeds: not the global state


def sample_batches(cfg: DataConfig, transform, tokenizer, batch_size: int, count: int, seed: int = 0):
    """The first `count` batches of a fresh stream (for threshold calibration and pictures), no workers."""
    loader_cfg = DataConfig(cfg.train_shards, cfg.eval_root, 0, cfg.shuffle_buffer)
    batches = []
    for images, texts in training_stream(loader_cfg, transform, tokenizer, batch_size, seed):
        batches.append((images, texts))
        if len(batches) == count:
            break
    return batches
