"""k-means' Gram of standardised patches in one Triton kernel that reads the images themselves.

`masking.gram(masking.kmeans_features(...))` writes the (B, L, C * p * p) bf16 features to memory, in an inductor
kernel that permutes the pixels into patches (on an H200 0.121 ms for ViT-B-16 at batch 256, 2.5x the time of its
bytes), and cuBLAS then reads them back for the Gram (0.037 ms). Here each program computes one tile of an image's
Gram straight from the pixels: it loads the tile's patches a channel and a few pixel rows at a time, standardises
them with the image's channel statistics, rounds them to bf16 as `kmeans_features` does and accumulates their dot
products in fp32 on tensor cores. The Gram is symmetric, so only the tiles on and above the diagonal are computed:
those above it are stored twice, and those on it load their patches once.

CUDA only, behind `enabled()`; on the CPU (and where Triton is missing, or on a GPU older than sm80) `masking.gram`
stays the path. Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, which is how the tests check it without a
GPU (tests/conftest.py sets it before anything imports Triton: `triton.jit` chooses the interpreter when a function
is decorated, Triton's own tl.zeros included).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: masking.gram is the path
    triton = None

# whether masking.kmeans_clusters computes the Gram here on a GPU: off. On an H200 (runs 9-11, bench/README.md) the
# kernel takes 0.130 ms where the features' kernel and cuBLAS's Gram take 0.158 ms, but kmeans' whole op came to
# 0.344 ms with it in run 9 and to 0.370-0.371 ms (0.368-0.369 without it) in runs 10 and 11, where inductor fused
# the last iteration with the scores into a 0.033 ms kernel: no gain that holds
USE_ON_GPU = False
# patches per side of a program's tile of the Gram: each program reads its two tiles' pixels in fp32, so the bytes
# read from L2 fall as the tiles grow (ViT-B-16 at batch 256: 805 MB in tiles of 64, 403 MB in tiles of 128)
TILE = 128
PIXELS_PER_STEP = 64  # pixels of one channel of each patch loaded per step of the K loop (tl.dot needs >= 16)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def has_bf16_tensor_cores(device_index: int) -> bool:
    """sm80 or later (A100, H100, ...): a bf16 tl.dot. A V100 keeps masking.gram. (A constant to dynamo, which
    calls it once when tracing.)"""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def enabled(pixels: torch.Tensor) -> bool:
    """Whether `standardised_patch_gram` serves these pixels in masking.kmeans_clusters."""
    return triton is not None and USE_ON_GPU and pixels.is_cuda and has_bf16_tensor_cores(pixels.device.index)


if triton is not None:

    @triton.jit
    def nearest_bf16_by_hand(x):
        """fp32 x rounded to the nearest bf16 value (ties to even), as fp32: the interpreter (triton 3.8) truncates
        when it converts to bf16."""
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)

    @triton.jit
    def _standardised_tile(pixels, patch_offsets, pixel_offsets, pixel_valid, mean, inverse_scale,
                           WHOLE_STEPS: tl.constexpr, DOT_BF16: tl.constexpr):
        """(tile, PIXELS_PER_STEP) standardised pixels of the patches at `patch_offsets`, rounded to bf16; zeros
        for the pixels past a patch's end (they then add nothing to a dot product)."""
        where = pixels + patch_offsets[:, None] + pixel_offsets[None, :]
        if WHOLE_STEPS:
            x = (tl.load(where).to(tl.float32) - mean) * inverse_scale
        else:
            x = tl.load(where, mask=pixel_valid[None, :], other=0.0)
            x = tl.where(pixel_valid[None, :], (x.to(tl.float32) - mean) * inverse_scale, 0.0)
        if DOT_BF16:
            rounded = x.to(tl.bfloat16)  # to nearest even
        else:
            # the interpreter's bf16 tl.dot is wrong too: the same bf16 values as fp32 (exact, and so are their
            # products)
            rounded = nearest_bf16_by_hand(x)
        return rounded

    @triton.jit
    def _patch_offsets(first, num_patches, stride_h, stride_w, TILE: tl.constexpr, PATCH: tl.constexpr,
                       PATCHES_PER_ROW: tl.constexpr):
        """The top-left pixel of the tile's patches (row-major, as open_clip's conv1 tokens); past the last
        patch, the last patch again: its rows are computed and never stored, and no load needs a mask."""
        patches = tl.minimum(first + tl.arange(0, TILE), num_patches - 1)
        return (patches // PATCHES_PER_ROW) * PATCH * stride_h + (patches % PATCHES_PER_ROW) * PATCH * stride_w

    @triton.jit
    def _gram_kernel(pixels, mean, inverse_scale, out, num_patches, out_length, tiles,
                     stride_b, stride_c, stride_h, stride_w, out_stride_b,
                     CHANNELS: tl.constexpr, PATCH: tl.constexpr, PATCHES_PER_ROW: tl.constexpr, TILE: tl.constexpr,
                     PIXELS_PER_STEP: tl.constexpr, STEPS_PER_CHANNEL: tl.constexpr, WHOLE_STEPS: tl.constexpr,
                     DIAGONAL: tl.constexpr, DOT_BF16: tl.constexpr):
        """One tile of an image's Gram: with DIAGONAL, tile i of the diagonal (its patches' pixels loaded once for
        both operands of the dot); else tile (i, j) for j > i, stored at (i, j) and transposed at (j, i), and the
        programs for j <= i do nothing."""
        image = tl.program_id(1)
        if DIAGONAL:
            row_tile = tl.program_id(0)
            col_tile = row_tile
        else:
            row_tile = tl.program_id(0) // tiles
            col_tile = tl.program_id(0) % tiles
        if DIAGONAL or col_tile > row_tile:
            base = pixels + image.to(tl.int64) * stride_b
            row_offsets = _patch_offsets(row_tile * TILE, num_patches, stride_h, stride_w, TILE, PATCH,
                                         PATCHES_PER_ROW)
            col_offsets = _patch_offsets(col_tile * TILE, num_patches, stride_h, stride_w, TILE, PATCH,
                                         PATCHES_PER_ROW)
            within_step = tl.arange(0, PIXELS_PER_STEP)
            acc = tl.zeros((TILE, TILE), dtype=tl.float32)
            # one loop over the channels and their pixels, so that Triton pipelines its loads across channels
            for step in range(CHANNELS * STEPS_PER_CHANNEL):
                channel = step // STEPS_PER_CHANNEL
                mean_c = tl.load(mean + image * CHANNELS + channel)
                inverse_scale_c = tl.load(inverse_scale + image * CHANNELS + channel)
                pixel = (step % STEPS_PER_CHANNEL) * PIXELS_PER_STEP + within_step  # within the patch, row-major
                pixel_offsets = channel * stride_c + (pixel // PATCH) * stride_h + (pixel % PATCH) * stride_w
                pixel_valid = pixel < PATCH * PATCH
                a = _standardised_tile(base, row_offsets, pixel_offsets, pixel_valid, mean_c, inverse_scale_c,
                                       WHOLE_STEPS, DOT_BF16)
                if DIAGONAL:
                    b = a
                else:
                    b = _standardised_tile(base, col_offsets, pixel_offsets, pixel_valid, mean_c, inverse_scale_c,
                                           WHOLE_STEPS, DOT_BF16)
                acc += tl.dot(a, tl.trans(b))
            rows = row_tile * TILE + tl.arange(0, TILE)
            cols = col_tile * TILE + tl.arange(0, TILE)
            # zero-feature patches pad the Gram up to out_length (their rows and columns were computed from the
            # last patch)
            acc = tl.where((rows < num_patches)[:, None] & (cols < num_patches)[None, :], acc, 0.0)
            stored = (rows < out_length)[:, None] & (cols < out_length)[None, :]
            target = out + image.to(tl.int64) * out_stride_b
            tl.store(target + rows[:, None] * out_length + cols[None, :], acc, mask=stored)
            if not DIAGONAL:
                tl.store(target + cols[None, :] * out_length + rows[:, None], acc, mask=stored)


def num_warps(tile: int) -> int:
    return 4 if tile <= 64 else 8


def standardised_patch_gram(pixels: torch.Tensor, mean: torch.Tensor, inverse_scale: torch.Tensor,
                            patch_size: int, tile: Optional[int] = None, pad_to: int = 1) -> torch.Tensor:
    """(B, C, H, W) pixels, their channels' mean and inverse scale (B, C, 1, 1, `masking.channel_statistics`) ->
    (B, L, L) fp32: what `masking.gram(masking.kmeans_features(pixels, patch_size))` computes, up to the order of
    the fp32 sums. With `pad_to`, the Gram of the patches and zero-feature ones up to a multiple of it,
    (B, L', L')."""
    tile = tile or TILE
    b, c, h, w = pixels.shape
    per_row, per_column = w // patch_size, h // patch_size
    length = per_row * per_column
    out_length = triton.cdiv(length, pad_to) * pad_to
    tiles = triton.cdiv(length, tile)
    if out_length > tiles * tile:
        raise ValueError(f"pad_to={pad_to}: the Gram's {tile} x {tile} tiles cover {length} patches only up to "
                         f"{tiles * tile}, not {out_length}")
    out = torch.empty(b, out_length, out_length, device=pixels.device, dtype=torch.float32)
    mean = mean.reshape(b, c).float().contiguous()
    inverse_scale = inverse_scale.reshape(b, c).float().contiguous()
    for diagonal in (True, False):
        _gram_kernel[(tiles if diagonal else tiles * tiles, b)](
            pixels, mean, inverse_scale, out, length, out_length, tiles, *pixels.stride(), out.stride(0),
            CHANNELS=c, PATCH=patch_size, PATCHES_PER_ROW=per_row, TILE=tile, PIXELS_PER_STEP=PIXELS_PER_STEP,
            STEPS_PER_CHANNEL=triton.cdiv(patch_size * patch_size, PIXELS_PER_STEP),
            WHOLE_STEPS=patch_size * patch_size % PIXELS_PER_STEP == 0, DIAGONAL=diagonal,
            DOT_BF16=not interpreted(), num_warps=num_warps(tile))
    return out
