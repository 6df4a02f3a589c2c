"""Benchmark: the masking op alone and a full CLIP training step, per strategy and ratio, eager and compiled.

    python bench/masking.py                      # GPU: ViT-B-16, batch 256, bf16 autocast; CPU: tiny model, fp32
    python bench/masking.py --device cpu --steps 5 --no-compile

Prints each figure as a ratio to `random` at the same ratio, and the masking op's share of the step.
Writes JSON and Markdown next to --out. A measurement, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clustermask.masking import MaskingConfig  # noqa: E402
from clustermask.model import ModelConfig, create  # noqa: E402

CONFIGS = [  # (label, masking config)
    ("none", dict(strategy="none", ratio=0.0)),
    ("random", dict(strategy="random")),
    ("cluster-rgb", dict(strategy="cluster", features="rgb")),
    ("cluster-embedding", dict(strategy="cluster", features="embedding")),
    ("kmeans", dict(strategy="kmeans")),
]


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn, iters: int, warmup: int) -> float:
        """Median milliseconds per call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
        times.sort()
        return times[len(times) // 2]


def kernel_ms(fn, iters: int) -> float:
    """GPU time of the kernels one call of fn launches (torch.profiler), averaged over iters calls.

    The op's cost inside a training step, where the GPU runs ahead of Python and launch gaps are hidden;
    CUDA events around a lone call also count the gaps between its kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1000 / iters


def graph_ms(fn, timer, iters: int) -> float:
    """Milliseconds per replay of fn captured in a CUDA graph: its GPU time without launch gaps (a second
    measure beside the profiler's, in case CUPTI is unavailable on the machine)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timer(graph.replay, iters, 3)


def optional(what: str, measure, *args):
    """measure(*args), or None and a line saying why: a measurement that fails must not cost the rest of a
    GPU session's runs."""
    try:
        return measure(*args)
    except Exception as exc:
        print(f"{what} failed: {exc!r}", flush=True)
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(args, masking_kw, compiled: bool):
    torch.manual_seed(0)
    model, *_, masker = create(ModelConfig(name=args.model), MaskingConfig(**masking_kw), total_steps=1000,
                               device=args.device)
    model.train()
    gpu = args.device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    loss_fn = open_clip.ClipLoss()
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else \
        torch.autocast("cpu", enabled=False)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    texts = torch.randint(0, 49407, (args.batch, model.context_length if hasattr(model, "context_length") else 77),
                          device=args.device)

    def step():
        with autocast:
            image_features, text_features, scale = forward(images, texts)[:3]
            loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    visual = model.visual
    # in a step the masker sees conv1's output dtype: bf16 under autocast
    token_dtype = torch.bfloat16 if gpu else torch.float32
    tokens = torch.randn(args.batch, 1 + (size // visual.conv1.kernel_size[0]) ** 2, visual.conv1.out_channels,
                         device=args.device, dtype=token_dtype)
    op = torch.compile(masker) if compiled else masker

    def mask_op():
        masker.pixels = images
        with autocast:
            op(tokens)

    return step, mask_op


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--strategies", default=",".join(label for label, _ in CONFIGS))
    parser.add_argument("--compile-ratios", default="0.5,0.3", help="ratios also measured compiled")
    parser.add_argument("--budget-s", type=float, default=480, help="skip remaining runs after this long")
    parser.add_argument("--out", default="bench/results/masking")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("ViT-B-16" if gpu else "ViT-Tiny-8-64")
    args.batch = args.batch or (256 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 5)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if gpu else cpu_name()
    header = {"device": device_name, "torch": torch.__version__, "model": args.model, "batch": args.batch,
              "precision": "bf16 autocast" if gpu else "fp32", "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    timer, started, rows = Timer(args.device), time.time(), []
    ratios = [float(r) for r in args.ratios.split(",")]
    modes = [m for m in args.modes.split(",") if not (args.no_compile and m == "compiled")]
    wanted = set(args.strategies.split(","))
    compile_ratios = [float(r) for r in args.compile_ratios.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        mode_ratios = ratios if mode == "eager" else compile_ratios
        for ratio in mode_ratios:
            for label, kw in CONFIGS:
                if label not in wanted or (label == "none" and ratio != mode_ratios[0]):
                    continue
                if time.time() - started > args.budget_s:
                    print(f"budget spent: skipping {label} {ratio} {mode}", flush=True)
                    continue
                torch._dynamo.reset()
                kw = dict(kw, ratio=0.0 if label == "none" else ratio)
                step, mask_op = build(args, kw, mode == "compiled")
                warmup = 3 if mode == "compiled" else 2
                step_ms = timer(step, args.steps, warmup)
                op_ms = timer(mask_op, args.steps * 5, warmup) if label != "none" else 0.0
                gpu_op = gpu and label != "none"
                op_kernels = optional("kernel timing", kernel_ms, mask_op, args.steps * 5) if gpu_op else None
                op_graph = optional("CUDA graph timing", graph_ms, mask_op, timer, args.steps * 5) if gpu_op else None
                row = {"strategy": label, "ratio": kw["ratio"], "mode": mode, "step_ms": step_ms, "op_ms": op_ms,
                       "op_kernel_ms": op_kernels, "op_graph_ms": op_graph}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del step, mask_op
                if gpu:
                    torch.cuda.empty_cache()
                (out.with_suffix(".json")).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    table = render(header, rows)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def share_cells(op_ms, step_ms) -> str:
    return f"{op_ms:.3f} | {100 * op_ms / step_ms:.2f}%" if op_ms is not None else "- | -"


def render(header, rows) -> str:
    random_step = {(r["ratio"], r["mode"]): r["step_ms"] for r in rows if r["strategy"] == "random"}
    random_op = {(r["ratio"], r["mode"]): r["op_ms"] for r in rows if r["strategy"] == "random"}
    lines = [f"# masking benchmark: {header['model']} batch {header['batch']}, {header['precision']}",
             f"device: {header['device']}; torch {header['torch']}; {header['date']}", "",
             "| strategy | ratio | mode | step ms | step / random | op ms | op / random | op share of step | "
             "op kernels ms | kernels share of step | op CUDA graph ms | graph share of step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["ratio"], r["mode"])
        rel_step = r["step_ms"] / random_step[key] if key in random_step else float("nan")
        rel_op = r["op_ms"] / random_op[key] if random_op.get(key) else float("nan")
        share = r["op_ms"] / r["step_ms"] if r["step_ms"] else float("nan")
        gpu_cells = " | ".join(share_cells(r.get(key), r["step_ms"]) for key in ("op_kernel_ms", "op_graph_ms"))
        lines.append(f"| {r['strategy']} | {r['ratio']:g} | {r['mode']} | {r['step_ms']:.2f} | {rel_step:.3f} | "
                     f"{r['op_ms']:.3f} | {rel_op:.2f} | {100 * share:.2f}% | {gpu_cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
