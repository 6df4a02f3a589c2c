"""Benchmark: a training step's batch copied to the GPU from pageable or from pinned memory, behind a step's work.

    python bench/h2d.py                      # ViT-B-16's batch: 256 images of 3 x 224 x 224 in fp32, 77 tokens each
    python bench/h2d.py --step-ms 60 --steps 20

Each iteration copies a batch to the GPU as `Trainer._inputs` does (`.to(device, non_blocking=True)`) and then
queues a stand-in for the step: matmuls that read the batch and take about --step-ms of GPU time. From pageable
memory (the training loader until 2026-12-04), the copy first waits on the host for the GPU to finish the queued
work, then stages the batch, so the GPU idles for the copy and for the launch of the next work; from pinned memory
(the loader's `pin_memory`, on a GPU since then) the copy is queued behind the work. Prints milliseconds per
iteration of the work alone and with each copy, and the GPU's idle share; and the same for the uint8 batch that the
loader now hands over (a quarter of the bytes; its normalisation on the GPU is not in the stand-in). A measurement,
not a test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_files import write_results  # noqa: E402


def stand_in_step(side: int, step_ms: float):
    """A function of the batch whose GPU time is about step_ms: a chain of bf16 matmuls, their count measured."""
    weight = torch.randn(side, side, device="cuda", dtype=torch.bfloat16) / side ** 0.5

    def matmuls(images: torch.Tensor, count: int) -> torch.Tensor:
        x = weight + images.flatten()[:side].to(torch.bfloat16)[None, :]  # reads the batch: waits for its copy
        for _ in range(count):
            x = x @ weight
        return x.sum()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe = torch.zeros(side, device="cuda")
    matmuls(probe, 10)
    start.record()
    matmuls(probe, 50)
    end.record()
    torch.cuda.synchronize()
    count = max(1, round(50 * step_ms / start.elapsed_time(end)))
    return lambda images: matmuls(images, count)


def per_iteration_ms(step, batches, texts, steps: int, copy: bool) -> float:
    """Wall milliseconds per iteration over `steps` iterations, each copying the next batch (when `copy`) and
    queueing the step on it; the GPU is drained before and after."""
    on_gpu = batches[0].to("cuda")
    torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(steps):
        if copy:
            on_gpu = batches[i % len(batches)].to("cuda", non_blocking=True)
            texts[i % len(texts)].to("cuda", non_blocking=True)
        step(on_gpu)
    torch.cuda.synchronize()
    return (time.perf_counter() - began) * 1000 / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--step-ms", type=float, default=60.0, help="the stand-in step's GPU time (default: about a "
                        "compiled ViT-B-16 step at batch 256 on an H200)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench/results/h2d")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the copy to it is what this measures")
    shape = (args.batch, 3, args.image_size, args.image_size)
    # a few batches in turn, as a loader hands out fresh ones; the pinned ones are pinned before timing, as the
    # loader's pinning thread does while the previous step runs
    pageable = [torch.randn(shape) for _ in range(3)]
    pinned = [batch.pin_memory() for batch in pageable]
    pinned_uint8 = [torch.randint(0, 256, shape, dtype=torch.uint8).pin_memory() for _ in range(3)]
    texts = [torch.randint(0, 49408, (args.batch, 77)) for _ in range(3)]
    pinned_texts = [tokens.pin_memory() for tokens in texts]
    step = stand_in_step(4096, args.step_ms)
    for batches, tokens in ((pageable, texts), (pinned, pinned_texts), (pinned_uint8, pinned_texts)):  # warm up
        per_iteration_ms(step, batches, tokens, 3, copy=True)
    work = per_iteration_ms(step, pinned, pinned_texts, args.steps, copy=False)
    rows = {"work alone": work,
            "pageable copy": per_iteration_ms(step, pageable, texts, args.steps, copy=True),
            "pinned copy": per_iteration_ms(step, pinned, pinned_texts, args.steps, copy=True),
            "pinned copy, uint8 (as now)": per_iteration_ms(step, pinned_uint8, pinned_texts, args.steps, copy=True)}
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_mb":
              pageable[0].numel() * 4 / 1e6, "step_ms": args.step_ms, "date": time.strftime("%Y-%m-%d")}
    lines = [f"# a {header['batch_mb']:.0f} MB batch copied to the GPU behind a {args.step_ms:g} ms step",
             f"device: {header['device']}; torch {header['torch']}; {header['date']}", "",
             "| | ms per iteration | GPU idle share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {100 * (1 - work / ms):.1f}% |" for name, ms in rows.items()]
    write_results(args.out, header, rows, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
