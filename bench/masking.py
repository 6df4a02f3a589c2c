"""Benchmark: the masking op alone and a full CLIP training step, per strategy and ratio, eager and compiled.

Modes: `eager` (model and op), `op-compiled` (the model eager, the op compiled on its own: what
`model.compile: false` runs on a GPU), `compiled` (the whole model, the op in its graph).

    python bench/masking.py                      # GPU: ViT-B-16, batch 256, bf16 autocast; CPU: tiny model, fp32
    python bench/masking.py --device cpu --steps 5 --no-compile
    python bench/masking.py --op-only --modes compiled --variants current,previous,bmm --kernels 8
    python bench/masking.py --modes compiled --compile-ratios 0.5 --strategies random,cluster-rgb --interleave 5
    python bench/masking.py --modes compiled --compile-ratios 0.5 --strategies random,kmeans --interleave 5 \
        --variants tgram

Prints each figure as a ratio to `random` at the same ratio, and the masking op's share of the step.
Writes JSON and Markdown next to --out. A measurement, not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clustermask import assignment_kernel, features_kernel, gram_kernel, masking  # noqa: E402
from clustermask.masking import MaskingConfig  # noqa: E402
from clustermask.model import ModelConfig, create  # noqa: E402
from bench.results_files import write_results  # noqa: E402

CONFIGS = [  # (label, masking config)
    ("none", dict(strategy="none", ratio=0.0)),
    ("random", dict(strategy="random")),
    ("cluster-rgb", dict(strategy="cluster", features="rgb")),
    ("cluster-embedding", dict(strategy="cluster", features="embedding")),
    ("cluster-mixed", dict(strategy="cluster", features="mixed")),  # both similarities, whatever the step
    ("kmeans", dict(strategy="kmeans")),
]


def previous_rgb_similarity(pixels: torch.Tensor, patch_size: int, anchors: torch.Tensor) -> torch.Tensor:
    """The rgb similarity as it was until 2026-11-27 (measured on an H200 that day), the baseline of the
    `previous` variant: standardise every pixel, then the cosine over each patch's C * p * p values."""
    return masking.anchor_similarity(masking.standardised_patches(pixels, patch_size), anchors)


def twopass_rgb_similarity(pixels: torch.Tensor, patch_size: int, anchors: torch.Tensor) -> torch.Tensor:
    """`twopass` variant: the rgb similarity from 2026-11-27 until 2026-11-28 (0.290 ms of kernels on an H200,
    run 5): the channel statistics from a pass over the pixels of their own (0.049 ms), then the centred pixels'
    dot products and squares, weighted by the channels' 1 / std^2."""
    x, mean, inverse_scale = masking.channel_statistics(pixels)
    groups = masking.patch_groups(x - mean, patch_size)  # (B, C, L, P)
    anchor_pixels = groups.gather(2, anchors[:, None, :, None].expand(-1, groups.shape[1], -1, groups.shape[3]))
    weights = inverse_scale.flatten(1).square()  # (B, C)
    dots = (masking.batched_dots(groups, anchor_pixels) * weights[:, :, None, None]).sum(1)
    squares = (groups.pow(2).sum(-1) * weights[:, :, None]).sum(1)
    return masking.cosines(dots, squares, anchors)


def previous_kmeans_assignment(feats: torch.Tensor, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """K-means as it was until 2026-11-27 (0.62 ms of kernels on an H200 that day, 1% of the step): Lloyd's
    iterations on the normalised (B, L, D) features, two fp32 bmm over them per iteration."""
    feats = F.normalize(feats, dim=-1, eps=1e-6)
    centres = feats.gather(1, initial[..., None].expand(-1, -1, feats.shape[-1]))
    for _ in range(iters):
        onehot = masking._one_hot(torch.bmm(feats, centres.transpose(1, 2)).argmax(-1), initial.shape[1], feats.dtype)
        sums = torch.bmm(onehot.transpose(1, 2), feats)
        centres = torch.where(onehot.sum(1)[..., None] > 0, F.normalize(sums, dim=-1, eps=1e-6), centres)
    return torch.bmm(feats, centres.transpose(1, 2)).argmax(-1)


def previous_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    return previous_kmeans_assignment(masking.standardised_patches(pixels, patch_size), initial, iters)


def split_gram(feats: torch.Tensor) -> torch.Tensor:
    """`split` variant: k-means' Gram of the fp32 features to ~4e-6 of their norms, as from 2026-11-27 until
    2026-11-28 (0.530 ms of k-means on an H200): each feature split into bf16 `high` and the bf16 rounding of
    what `high` leaves out, two bf16 GEMMs (high.high, high.low) with fp32 sums."""
    high = feats.to(torch.bfloat16)
    low = (feats - high.float()).to(torch.bfloat16)
    cross = masking.bf16_bmm(high, low.transpose(1, 2))
    return masking.bf16_bmm(high, high.transpose(1, 2)) + cross + cross.transpose(1, 2)


def split_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    feats = masking.standardised_patches(pixels, patch_size)
    return masking.kmeans_assignment(split_gram(feats), initial, iters)


def pooled_kmeans_features(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`pooled` variant: k-means on each patch's standardised pixels averaged 2 x 2, in bf16 (a quarter of the
    features; the image's statistics still from every pixel); the library's Gram and iterations."""
    x, mean, inverse_scale = masking.channel_statistics(pixels)
    return masking.patchify((F.avg_pool2d(x, 2) - mean) * inverse_scale, patch_size // 2).to(torch.bfloat16)


def unpadded_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    """`unpadded` variant: k-means' Gram from the 196 patches as they are, as until 2026-12-04 (cuBLAS's sm80
    kernel on an H200; `masking.gram` pads them to a multiple of 8)."""
    feats = masking.kmeans_features(pixels, patch_size)
    return masking.kmeans_assignment(masking.bf16_bmm(feats, feats.transpose(1, 2)), initial, iters)


def transposed_kmeans_assignment(dots: torch.Tensor, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """`itert` variant: `masking.kmeans_assignment` with each iteration's bmm as (members^T dots)^T, the same
    sums (dots is symmetric), for the kernel cuBLAS picks with the k = 8 centres as its rows."""
    length, k = dots.shape[1], initial.shape[1]
    inverse_norms = masking.norms_from_squares(dots.diagonal(dim1=1, dim2=2)).reciprocal()
    to_initial = dots.gather(2, initial[:, None, :].expand(-1, length, -1))
    similarity = to_initial * inverse_norms.gather(1, initial)[:, None, :]
    for _ in range(iters):
        members = masking._one_hot(similarity.argmax(-1), k, dots.dtype)
        unit_members = members * inverse_norms[:, :, None]
        to_sums = torch.bmm(unit_members.transpose(1, 2), dots).transpose(1, 2)
        norms = masking.norms_from_squares((unit_members * to_sums).sum(1))
        similarity = torch.where(members.sum(1, keepdim=True) > 0, to_sums / norms[:, None, :], similarity)
    return similarity.argmax(-1)


def num_patches(pixels: torch.Tensor, patch_size: int) -> int:
    return (pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size)


def padded_kmeans_assignment(dots: torch.Tensor, length: int, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """`masking.kmeans_assignment` on a Gram padded with zero-feature patches (B, L', L'), the padded patches no
    cluster's members: each iteration's bmm then has rows in multiples of 8 too."""
    k = initial.shape[1]
    real = (torch.arange(dots.shape[1], device=dots.device) < length).to(dots.dtype)  # (L',)
    inverse_norms = masking.norms_from_squares(dots.diagonal(dim1=1, dim2=2)).reciprocal() * real
    to_initial = dots.gather(2, initial[:, None, :].expand(-1, dots.shape[1], -1))
    similarity = to_initial * inverse_norms.gather(1, initial)[:, None, :]
    for _ in range(iters):
        members = masking._one_hot(similarity.argmax(-1), k, dots.dtype) * real[:, None]
        unit_members = members * inverse_norms[:, :, None]
        to_sums = torch.bmm(dots, unit_members)
        norms = masking.norms_from_squares((unit_members * to_sums).sum(1))
        similarity = torch.where(members.sum(1, keepdim=True) > 0, to_sums / norms[:, None, :], similarity)
    return similarity.argmax(-1)[:, :length]


def padded_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    """`paditer` variant: k-means' iterations on the padded Gram itself rather than on its (B, L, L) block
    (bench/results/gram_h200_run8.md: 0.040 against 0.053 ms a bmm, eager)."""
    feats = masking.pad_rows(masking.kmeans_features(pixels, patch_size))
    dots = masking.bf16_bmm(feats, feats.transpose(1, 2))
    return padded_kmeans_assignment(dots, num_patches(pixels, patch_size), initial, iters)


def use_gram_kernel(tile: int):
    """`tgram` and `tgram128` variants: k-means' Gram from clustermask.gram_kernel (one Triton kernel from the
    pixels, in tiles of 64 or 128 patches a side) rather than the features' kernel and cuBLAS (`features`, the
    library's path)."""
    gram_kernel.USE_ON_GPU = True
    gram_kernel.TILE = tile


def kernel_padded_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    """`tgrampad` variant: gram_kernel's Gram padded to a multiple of 8 patches, and `paditer`'s iterations on it."""
    _, mean, inverse_scale = masking.channel_statistics(pixels)
    dots = gram_kernel.standardised_patch_gram(pixels, mean, inverse_scale, patch_size,
                                               pad_to=masking.GEMM_ROW_MULTIPLE)
    return padded_kmeans_assignment(dots, num_patches(pixels, patch_size), initial, iters)


def fused_embedding_similarity(tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """`fusedemb` variant: the embedding similarity as until 2026-12-04, fp32 sums fused by inductor into one
    reduction that reads each image's anchors again for every patch (0.187 ms on an H200; `masking.
    embedding_similarity` now takes bf16 tokens' dot products from a GEMM)."""
    return masking.anchor_similarity(tokens.float(), anchors)


def bf16_gram_kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int):
    """`bf16gram` variant: the Gram's GEMM with bf16 results (dot products to 2^-9 of themselves), then fp32."""
    feats = masking.kmeans_features(pixels, patch_size)
    return masking.kmeans_assignment(torch.bmm(feats, feats.transpose(1, 2)).float(), initial, iters)


def divided_standardised_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`divided` variant: the standardisation as until 2026-12-04 (twenty-sixth session), a division by std + eps
    whose square root and division inductor inlined into every pixel of the kernel that writes k-means' features
    (0.121 ms on an H200, run 9); `masking.channel_statistics` now gives 1 / (std + eps) as a buffer of its own."""
    x = pixels.float()
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    return masking.patchify((x - mean) / (std + 1e-6), patch_size)


def summed_channel_statistics(pixels: torch.Tensor):
    """`sumstats` variant: `masking.channel_statistics` from each channel's sum and sum of squares, shifted by its
    first pixel so that the centring cancels little, rather than from Welford's update (a division per pixel)."""
    x = pixels.float()
    shifted = x - x[:, :, :1, :1]
    count = x.shape[2] * x.shape[3]
    sums, squares = shifted.sum((2, 3), keepdim=True), shifted.square().sum((2, 3), keepdim=True)
    variance = (squares - sums.square() / count) / (count - 1)
    mean = x[:, :, :1, :1] + sums / count
    return x, masking.materialised(mean), masking.materialised((variance.clamp_min(0).sqrt() + 1e-6).reciprocal())


def use_divided_standardisation():
    """`divided` variant (in inductor's features: the features' own kernel has taken 1 / (std + eps) since)."""
    masking.standardised_patches = divided_standardised_patches
    features_kernel.USE_ON_GPU = False


def use_fused_statistics(programs_per_sm: int):
    features_kernel.FUSED_STATISTICS = True
    features_kernel.PROGRAMS_PER_SM = programs_per_sm


def use_previous():
    masking.rgb_similarity = previous_rgb_similarity
    masking.kmeans_clusters = previous_kmeans_clusters


# the images' dtype in the `bf16pixels` variant (None: fp32, as the loader hands them to a step)
PIXEL_DTYPE = {"dtype": None}


def use_bf16_pixels():
    """`bf16pixels` variant: under bf16 autocast, the tower given bf16 images. conv1 casts its fp32 input to bf16
    under autocast anyway, so the model's input is bit for bit the same (the cast moves out of the step to where
    the batch reaches the GPU), while the masking op reads the pixels once in 77 MB rather than 154 MB (ViT-B-16,
    batch 256). The rgb features then come from pixels rounded to bf16: at most 2^-9 x 2.2 of a CLIP-normalised
    value, about 0.3 of an 8-bit level."""
    PIXEL_DTYPE["dtype"] = torch.bfloat16


# variant -> (the strategies it changes, how to set it up); `current` is the library as it is. Variants join
# with "+" (`pooled+bf16pixels`): each set up, for the strategies they all change
VARIANTS = {
    "current": (None, lambda: None),
    "previous": ({"cluster-rgb", "kmeans"}, use_previous),
    "twopass": ({"cluster-rgb", "cluster-mixed"}, lambda: setattr(masking, "rgb_similarity", twopass_rgb_similarity)),
    "bmm": ({"cluster-rgb", "cluster-embedding"}, lambda: setattr(masking, "UNROLLED_DOTS_MAX", 0)),
    "split": ({"kmeans"}, lambda: setattr(masking, "kmeans_clusters", split_kmeans_clusters)),
    "pooled": ({"kmeans"}, lambda: setattr(masking, "kmeans_features", pooled_kmeans_features)),
    "bf16pixels": ({"cluster-rgb", "cluster-mixed", "kmeans"}, use_bf16_pixels),
    "unpadded": ({"kmeans"}, lambda: setattr(masking, "kmeans_clusters", unpadded_kmeans_clusters)),
    "paditer": ({"kmeans"}, lambda: setattr(masking, "kmeans_clusters", padded_kmeans_clusters)),
    "itert": ({"kmeans"}, lambda: setattr(masking, "kmeans_assignment", transposed_kmeans_assignment)),
    "fusedemb": ({"cluster-embedding", "cluster-mixed"},
                 lambda: setattr(masking, "embedding_similarity", fused_embedding_similarity)),
    "bf16gram": ({"kmeans"}, lambda: setattr(masking, "kmeans_clusters", bf16_gram_kmeans_clusters)),
    "tgram": ({"kmeans"}, lambda: use_gram_kernel(64)),
    "tgram128": ({"kmeans"}, lambda: use_gram_kernel(128)),
    "features": ({"kmeans"}, lambda: setattr(gram_kernel, "USE_ON_GPU", False)),
    "tgrampad": ({"kmeans"}, lambda: setattr(masking, "kmeans_clusters", kernel_padded_kmeans_clusters)),
    "divided": ({"kmeans"}, use_divided_standardisation),
    "sumstats": ({"kmeans"}, lambda: setattr(masking, "channel_statistics", summed_channel_statistics)),
    # what k-means' fp32 iterations would gain on tensor cores (TF32 rounds the dot products to 2^-11 of
    # themselves: a change of the method's precision, not taken)
    "tf32iter": ({"kmeans"}, lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)),
    # k-means' features from inductor's kernel, as until run 13 (clustermask.features_kernel's since)
    "inductorfeat": ({"kmeans"}, lambda: setattr(features_kernel, "USE_ON_GPU", False)),
    # the statistics in the features' kernel (clustermask.features_kernel.standardised_features), with 2 (its
    # default), 1 or 4 programs per SM
    "tfused": ({"kmeans"}, lambda: use_fused_statistics(2)),
    "tfused1": ({"kmeans"}, lambda: use_fused_statistics(1)),
    "tfused4": ({"kmeans"}, lambda: use_fused_statistics(4)),
    # k-means' steps between its GEMMs in clustermask.assignment_kernel's kernels, one launch per iteration (off by
    # default until measured)
    "tassign": ({"kmeans"}, lambda: setattr(assignment_kernel, "USE_ON_GPU", True)),
}


# what the variants change, restored after each
VARIANT_SETTINGS = [(masking, name) for name in ("rgb_similarity", "kmeans_clusters", "kmeans_features",
                                                 "UNROLLED_DOTS_MAX", "kmeans_assignment", "embedding_similarity",
                                                 "standardised_patches", "channel_statistics")]
VARIANT_SETTINGS += [(gram_kernel, "USE_ON_GPU"), (gram_kernel, "TILE"),
                     (torch.backends.cuda.matmul, "allow_tf32")]
VARIANT_SETTINGS += [(features_kernel, name) for name in ("USE_ON_GPU", "FUSED_STATISTICS", "PROGRAMS_PER_SM")]
VARIANT_SETTINGS += [(assignment_kernel, "USE_ON_GPU")]


@contextlib.contextmanager
def variant(name: str):
    saved = [(module, setting, getattr(module, setting)) for module, setting in VARIANT_SETTINGS]
    pixel_dtype = dict(PIXEL_DTYPE)
    for part in name.split("+"):
        VARIANTS[part][1]()
    try:
        yield
    finally:
        for module, setting, value in saved:
            setattr(module, setting, value)
        PIXEL_DTYPE.update(pixel_dtype)


def variant_applies(name: str, label: str) -> bool:
    return all(VARIANTS[part][0] is None or label in VARIANTS[part][0] for part in name.split("+"))


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


def kernel_ms(fn, iters: int, top: int = 0):
    """(GPU time of the kernels one call of fn launches (torch.profiler), averaged over iters calls, the number of
    kernels it launches, the `top` costliest kernels as [name, ms per call]).

    The op's cost inside a training step, where the GPU runs ahead of Python and launch gaps are hidden;
    CUDA events around a lone call also count the gaps between its kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_name, launches = {}, 0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_name[event.name] = per_name.get(event.name, 0.0) + event.time_range.elapsed_us() / 1000 / iters
            launches += 1
    costliest = [[name, ms] for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]]
    return sum(per_name.values()), launches / iters, costliest


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


MODES = ("eager", "op-compiled", "compiled")


def build(args, masking_kw, mode: str):
    torch.manual_seed(0)
    compiled = mode == "compiled"
    model_cfg = ModelConfig(name=args.model, compile=compiled, compile_masking=mode == "op-compiled")
    model, *_, masker = create(model_cfg, MaskingConfig(**masking_kw), total_steps=1000, device=args.device)
    model.train()
    gpu = args.device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    loss_fn = open_clip.ClipLoss()
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else \
        torch.autocast("cpu", enabled=False)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.randn(args.batch, 3, size, size, device=args.device).to(PIXEL_DTYPE["dtype"] or torch.float32)
    # without autocast (the CPU's fp32 step) conv1 takes fp32 images: only the op sees bf16 ones there
    step_images = images if gpu else images.float()
    texts = torch.randint(0, 49407, (args.batch, model.context_length if hasattr(model, "context_length") else 77),
                          device=args.device)

    def step():
        with autocast:
            image_features, text_features, scale = forward(step_images, texts)[:3]
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
        masker.in_tower, masker.pixels = True, images  # as the tower's hooks set them for its call
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
    parser.add_argument("--modes", default="eager,compiled", help=f"comma-separated, of {MODES}")
    parser.add_argument("--strategies", default=",".join(label for label, _ in CONFIGS))
    parser.add_argument("--compile-ratios", default="0.5,0.3", help="the ratios of the `compiled` mode")
    parser.add_argument("--budget-s", type=float, default=480, help="skip remaining runs after this long")
    parser.add_argument("--out", default="bench/results/masking")
    parser.add_argument("--op-only", action="store_true", help="measure the masking op alone, not the step")
    parser.add_argument("--variants", default="current",
                        help=f"comma-separated, of {sorted(VARIANTS)}: `previous` is the rgb similarity and "
                             "k-means before 2026-11-27, `bmm` batched_dots as a bmm when compiled, `split` k-means' "
                             "Gram of fp32 features (2026-11-27), `pooled` k-means on 2 x 2-averaged pixels, "
                             "`twopass` the rgb similarity with its statistics' own pass (2026-11-27), `bf16pixels` "
                             "bf16 images (under autocast, the tower's input unchanged), `tgram`/`tgram128` "
                             "k-means' Gram from clustermask.gram_kernel's Triton kernel (tiles of 64/128), "
                             "`tgrampad` that Gram padded and `paditer`'s iterations on it, `features` k-means' Gram "
                             "from the features' kernel and cuBLAS (the library's path, whatever gram_kernel's "
                             "switch), `divided` the standardisation's square root and division per pixel "
                             "(as until 2026-12-04), `sumstats` the channel statistics from shifted sums, "
                             "`tf32iter` k-means' iterations in TF32, `inductorfeat` k-means' features from inductor's "
                             "kernel rather than clustermask.features_kernel's, `tfused`/`tfused1`/`tfused4` the "
                             "statistics in that kernel (2, 1 or 4 programs per SM), `tassign` k-means' steps "
                             "between its GEMMs in clustermask.assignment_kernel's kernels; join with + "
                             "(`pooled+bf16pixels`); with --interleave, one variant for every strategy")
    parser.add_argument("--kernels", type=int, default=0, help="on a GPU, list the op's N costliest kernels")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="time the strategies' steps in turn, ROUNDS times, all models built first: step "
                             "ratios that drift with the machine's state cancel (no op timing)")
    args = parser.parse_args(argv)
    if set(args.modes.split(",")) - set(MODES):
        parser.error(f"unknown --modes {sorted(set(args.modes.split(',')) - set(MODES))}; known: {list(MODES)}")
    unknown = {part for name in args.variants.split(",") for part in name.split("+")} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    if args.interleave and args.op_only:
        parser.error(f"--interleave {args.interleave} times steps: not with --op-only")
    if args.interleave and "," in args.variants:
        parser.error(f"--interleave {args.interleave} times every strategy under one variant, not --variants "
                     f"{args.variants}")
    gpu = args.device.startswith("cuda")
    args.model = args.model or ("ViT-B-16" if gpu else "ViT-Tiny-8-64")
    args.batch = args.batch or (256 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 5)
    # TF32 stays off for fp32 matmuls, as in training: under bf16 autocast the only ones are the masking op's,
    # whose similarities are fp32 on purpose (until 2026-11-28 the bench turned TF32 on)
    device_name = torch.cuda.get_device_name() if gpu else cpu_name()
    header = {"device": device_name, "torch": torch.__version__, "model": args.model, "batch": args.batch,
              "precision": "bf16 autocast" if gpu else "fp32", "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    timer, started, rows = Timer(args.device), time.time(), []
    ratios = [float(r) for r in args.ratios.split(",")]
    modes = [m for m in args.modes.split(",") if not (args.no_compile and m == "compiled")]
    wanted = set(args.strategies.split(","))
    compile_ratios = [float(r) for r in args.compile_ratios.split(",")]
    for mode in modes:
        mode_ratios = compile_ratios if mode == "compiled" else ratios
        for ratio in mode_ratios:
            if args.interleave:
                chosen = [(label, dict(kw, ratio=0.0 if label == "none" else ratio)) for label, kw in CONFIGS
                          if label in wanted and not (label == "none" and ratio != mode_ratios[0])]
                with variant(args.variants):
                    rows += measure_interleaved(args, timer, chosen, mode)
                print("\n".join(json.dumps(row) for row in rows[-len(chosen):]), flush=True)
                write_results(args.out, header, rows)
                continue
            for label, kw in CONFIGS:
                if label not in wanted or (label == "none" and ratio != mode_ratios[0]):
                    continue
                for name in args.variants.split(","):
                    if not variant_applies(name, label):
                        continue
                    if time.time() - started > args.budget_s:
                        print(f"budget spent: skipping {label} {ratio} {mode} {name}", flush=True)
                        continue
                    with variant(name):
                        row = optional(f"{label} {ratio} {mode} {name}", measure, args, timer, label,
                                       dict(kw, ratio=0.0 if label == "none" else ratio), mode)
                    if row is None:
                        continue
                    row["variant"] = name
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_results(args.out, header, rows)
    write_results(args.out, header, rows, render(header, rows))
    return 0


def warmup_calls(mode: str) -> int:
    """Calls before timing: compiling takes the first one or two."""
    return 2 if mode == "eager" else 3


def measure(args, timer, label: str, kw: dict, mode: str) -> dict:
    """One row: the step (unless --op-only) and the op alone, in `mode`."""
    gpu = args.device.startswith("cuda")
    torch._dynamo.reset()
    step, mask_op = build(args, kw, mode)
    warmup = warmup_calls(mode)
    step_ms = None if args.op_only else timer(step, args.steps, warmup)
    op_ms = timer(mask_op, args.steps * 5, warmup) if label != "none" else 0.0
    row = {"strategy": label, "ratio": kw["ratio"], "mode": mode, "step_ms": step_ms, "op_ms": op_ms,
           "op_kernel_ms": None, "op_graph_ms": None}
    if gpu and label != "none":
        kernels = optional("kernel timing", kernel_ms, mask_op, args.steps * 5, args.kernels)
        if kernels is not None:
            row["op_kernel_ms"], row["op_kernels"], top_kernels = kernels
            if args.kernels:
                row["op_top_kernels"] = top_kernels
        row["op_graph_ms"] = optional("CUDA graph timing", graph_ms, mask_op, timer, args.steps * 5)
    del step, mask_op
    if gpu:
        torch.cuda.empty_cache()
    return row


def measure_interleaved(args, timer, chosen: list, mode: str) -> list:
    """Rows with the median over `args.interleave` rounds of each config's step time (itself the median of
    `args.steps` steps); every model is built and warmed up first, and each round times them all, starting
    from a different one each time."""
    torch._dynamo.reset()
    steps = {}
    for label, kw in chosen:
        steps[label] = build(args, kw, mode)[0]
        for _ in range(warmup_calls(mode)):
            steps[label]()
    rounds = {label: [] for label, _ in chosen}
    order = [label for label, _ in chosen]
    for i in range(args.interleave):
        for label in order[i % len(order):] + order[: i % len(order)]:
            rounds[label].append(timer(steps[label], args.steps, 1))
    rows = []
    for label, kw in chosen:
        times = sorted(rounds[label])
        name = args.variants if variant_applies(args.variants, label) else "current"
        rows.append({"strategy": label, "ratio": kw["ratio"], "mode": mode, "variant": name,
                     "step_ms": times[len(times) // 2], "step_rounds_ms": rounds[label], "op_ms": None,
                     "op_kernel_ms": None, "op_graph_ms": None})
    del steps
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def share_cells(op_ms, step_ms) -> str:
    if op_ms is None:
        return "- | -"
    return f"{op_ms:.3f} | {100 * op_ms / step_ms:.2f}%" if step_ms else f"{op_ms:.3f} | -"


def number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(header, rows) -> str:
    """The table: ratios to `random` (current variant) at the same ratio and mode; then each op's costliest
    kernels where they were listed."""
    baseline = {(r["ratio"], r["mode"]): r for r in rows
                if r["strategy"] == "random" and r.get("variant", "current") == "current"}
    lines = [f"# masking benchmark: {header['model']} batch {header['batch']}, {header['precision']}",
             f"device: {header['device']}; torch {header['torch']}; {header['date']}", "",
             "| strategy | variant | ratio | mode | step ms | step / random | op ms | op / random | op share of step | "
             "op kernels ms | kernels share of step | kernels per call | op CUDA graph ms | graph share of step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = baseline.get((r["ratio"], r["mode"]), {})
        rel_step = r["step_ms"] / base["step_ms"] if r["step_ms"] and base.get("step_ms") else None
        rel_op = r["op_ms"] / base["op_ms"] if r["op_ms"] is not None and base.get("op_ms") else None
        share = r["op_ms"] / r["step_ms"] if r["step_ms"] and r["op_ms"] is not None else None
        gpu_cells = " | ".join([share_cells(r.get("op_kernel_ms"), r["step_ms"]), number(r.get("op_kernels"), 0),
                                share_cells(r.get("op_graph_ms"), r["step_ms"])])
        lines.append(f"| {r['strategy']} | {r.get('variant', 'current')} | {r['ratio']:g} | {r['mode']} | "
                     f"{number(r['step_ms'], 2)} | {number(rel_step, 3)} | {number(r['op_ms'], 3)} | "
                     f"{number(rel_op, 2)} | {'-' if share is None else f'{100 * share:.2f}%'} | {gpu_cells} |")
    for r in rows:
        if r.get("step_rounds_ms"):
            lines.append(f"\n{r['strategy']} {r['ratio']:g} {r['mode']}, step ms per round (interleaved): "
                         + ", ".join(f"{ms:.2f}" for ms in r["step_rounds_ms"]))
    for r in rows:
        if r.get("op_top_kernels"):
            lines += ["", f"{r['strategy']} ({r.get('variant', 'current')}) {r['ratio']:g} {r['mode']}: "
                          "costliest kernels of the op, ms per call", ""]
            lines += [f"- {ms:.4f} {name[:120]}" for name, ms in r["op_top_kernels"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
