"""k-means' bf16 features, padded for the Gram's GEMM, from one Triton kernel that copies the pixels patch row by
patch row.

`masking.pad_rows(masking.kmeans_features(...))`, compiled by inductor, is one kernel over the features'
elements that reads each patch row of 16 pixels as its own 64-byte piece: on an H200, 0.099 ms for ViT-B-16 at
batch 256, twice the time of its bytes (bench/README.md, run 12). Here each program standardises one channel of
one row of patches: it loads the image rows they span in one piece and stores each patch's values, 0.061 ms (run
13). The features are those of `kmeans_features` bit for bit: the same fp32 subtraction and multiplication by the
channel's 1 / (std + eps), rounded to the nearest bf16.

`standardised_features` computes each channel's statistics in the same kernel, from the pixels it then reads
again (from L2 while few programs run at once), in place of masking.channel_statistics' pass: off
(`FUSED_STATISTICS`) until a GPU measures it (`bench/gpu_check18.sh`).

CUDA only (sm80 or later), behind `enabled()`; on the CPU (and where Triton is missing) inductor's kernel, or
eager torch, is the path. Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, which is how the tests check it
without a GPU (as `gram_kernel`'s).
"""
from __future__ import annotations

import torch

from . import gram_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: masking.kmeans_features is the path
    triton = None

# whether masking.kmeans_gram takes the features from here on a GPU (runs 12 and 13 on an H200, bench/README.md)
USE_ON_GPU = True
# whether they come with their channels' statistics from `standardised_features` (one kernel, the pixels read from
# memory once) rather than from masking.channel_statistics and `padded_features`: off until a GPU measures it
FUSED_STATISTICS = False
PROGRAMS_PER_SM = 2  # `standardised_features`' programs: each (image, channel) in turn, its pixels read twice
ROWS_PER_STEP = 16  # image rows per step of the statistics' pass


def enabled(pixels: torch.Tensor) -> bool:
    """Whether `padded_features` serves these pixels in masking.kmeans_gram (bf16 conversions in hardware: sm80+)."""
    return (triton is not None and USE_ON_GPU and pixels.is_cuda
            and gram_kernel.has_bf16_tensor_cores(pixels.device.index))


if triton is not None:

    @triton.jit
    def _standardise_patch_row(channel_pixels, image_out, channel, patch_row, mean, inverse_scale, stride_h,
                               stride_w, CHANNELS: tl.constexpr, PATCH: tl.constexpr, PATCH_BLOCK: tl.constexpr,
                               PATCHES_PER_ROW: tl.constexpr, ROW_BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """One channel of the patches in one row: their pixels (x - mean) * inverse_scale, rounded to the nearest
        bf16, stored at each patch's features in patchify's order (channel, pixel row, pixel)."""
        y = tl.arange(0, PATCH_BLOCK)[:, None, None]  # the pixel row within the patch
        along = tl.arange(0, ROW_BLOCK)[None, :, None]  # the patch within the row
        x = tl.arange(0, PATCH_BLOCK)[None, None, :]  # the pixel within the patch's row
        valid = (y < PATCH) & (along < PATCHES_PER_ROW) & (x < PATCH)
        source = channel_pixels + (patch_row * PATCH + y) * stride_h + (along * PATCH + x) * stride_w
        standardised = (tl.load(source, mask=valid, other=0.0).to(tl.float32) - mean) * inverse_scale
        if ROUND_BY_HAND:
            standardised = gram_kernel.nearest_bf16_by_hand(standardised)
        patch = patch_row * PATCHES_PER_ROW + along
        feature = channel * PATCH * PATCH + y * PATCH + x
        tl.store(image_out + patch * (CHANNELS * PATCH * PATCH) + feature, standardised.to(tl.bfloat16), mask=valid)

    @triton.jit
    def _features_kernel(pixels, mean, inverse_scale, out, stride_b, stride_c, stride_h, stride_w, out_stride_b,
                         CHANNELS: tl.constexpr, PATCH: tl.constexpr, PATCH_BLOCK: tl.constexpr,
                         PATCHES_PER_ROW: tl.constexpr, ROW_BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """Channel `program_id(1)` of the patches in row `program_id(0)` of image `program_id(2)`."""
        patch_row = tl.program_id(0)
        channel = tl.program_id(1)
        image = tl.program_id(2)
        _standardise_patch_row(pixels + image.to(tl.int64) * stride_b + channel * stride_c,
                               out + image.to(tl.int64) * out_stride_b, channel, patch_row,
                               tl.load(mean + image * CHANNELS + channel),
                               tl.load(inverse_scale + image * CHANNELS + channel), stride_h, stride_w, CHANNELS,
                               PATCH, PATCH_BLOCK, PATCHES_PER_ROW, ROW_BLOCK, ROUND_BY_HAND)

    @triton.jit
    def _standardising_kernel(pixels, out, images_channels, programs, stride_b, stride_c, stride_h, stride_w,
                              out_stride_b, HEIGHT: tl.constexpr, WIDTH: tl.constexpr, CHANNELS: tl.constexpr,
                              PATCH: tl.constexpr, PATCH_BLOCK: tl.constexpr, PATCHES_PER_ROW: tl.constexpr,
                              ROW_BLOCK: tl.constexpr, PATCH_ROWS: tl.constexpr, ROWS_PER_STEP: tl.constexpr,
                              WIDTH_BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """For each (image, channel) this program takes in turn: the channel's mean and 1 / (std + 1e-6) over all
        its pixels (sums and squares of the pixels less the first, so that the centring cancels little), then its
        part of every patch's features, as `_features_kernel` writes them. The second pass reads what the first
        just read, from L2 while few enough programs run at once."""
        for image_channel in range(tl.program_id(0), images_channels, programs):
            image = image_channel // CHANNELS
            channel = image_channel % CHANNELS
            base = pixels + image.to(tl.int64) * stride_b + channel * stride_c
            first = tl.load(base).to(tl.float32)
            sums = tl.zeros((ROWS_PER_STEP, WIDTH_BLOCK), dtype=tl.float32)
            squares = tl.zeros((ROWS_PER_STEP, WIDTH_BLOCK), dtype=tl.float32)
            columns = tl.arange(0, WIDTH_BLOCK)[None, :]
            for top in range(0, HEIGHT, ROWS_PER_STEP):
                rows = top + tl.arange(0, ROWS_PER_STEP)[:, None]
                inside = (rows < HEIGHT) & (columns < WIDTH)
                shifted = tl.load(base + rows * stride_h + columns * stride_w, mask=inside, other=0.0)
                shifted = tl.where(inside, shifted.to(tl.float32) - first, 0.0)
                sums += shifted
                squares += shifted * shifted
            count = HEIGHT * WIDTH
            total = tl.sum(tl.sum(sums, axis=1), axis=0)
            variance = (tl.sum(tl.sum(squares, axis=1), axis=0) - total * total / count) / (count - 1)
            mean = first + total / count
            inverse_scale = 1.0 / (tl.sqrt_rn(tl.maximum(variance, 0.0)) + 1e-6)
            for patch_row in range(PATCH_ROWS):
                _standardise_patch_row(base, out + image.to(tl.int64) * out_stride_b, channel, patch_row, mean,
                                       inverse_scale, stride_h, stride_w, CHANNELS, PATCH, PATCH_BLOCK,
                                       PATCHES_PER_ROW, ROW_BLOCK, ROUND_BY_HAND)


def padded_output(pixels: torch.Tensor, patch_size: int, multiple: int) -> torch.Tensor:
    """The features' buffer, (B, L', C * p * p) bf16, L' the patches rounded up to a multiple of `multiple`."""
    b, c, h, w = pixels.shape
    padded_length = triton.cdiv((h // patch_size) * (w // patch_size), multiple) * multiple
    return torch.empty(b, padded_length, c * patch_size * patch_size, device=pixels.device, dtype=torch.bfloat16)


@torch.compiler.assume_constant_result
def multiprocessors(device_index: int) -> int:
    """The GPU's SM count (a constant to dynamo, which calls it once when tracing)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def standardised_features(pixels: torch.Tensor, patch_size: int, multiple: int, programs: int = 0) -> torch.Tensor:
    """(B, C, H, W) pixels -> `padded_features` with the statistics computed in the same kernel: each channel's
    mean and 1 / (std + eps) as `masking.channel_statistics` gives them, up to the order and form of the fp32 sums
    (a feature may then round to the neighbouring bf16 value). `programs`: how many run (default
    PROGRAMS_PER_SM per SM; under the interpreter, one per image channel)."""
    b, c, h, w = pixels.shape
    per_row, rows = w // patch_size, h // patch_size
    out = padded_output(pixels, patch_size, multiple)
    if not programs:
        programs = b * c if not pixels.is_cuda else multiprocessors(pixels.device.index) * PROGRAMS_PER_SM
    programs = min(programs, b * c)
    _standardising_kernel[(programs,)](
        pixels, out, b * c, programs, *pixels.stride(), out.stride(0), HEIGHT=h, WIDTH=w, CHANNELS=c,
        PATCH=patch_size, PATCH_BLOCK=triton.next_power_of_2(patch_size), PATCHES_PER_ROW=per_row,
        ROW_BLOCK=triton.next_power_of_2(per_row), PATCH_ROWS=rows, ROWS_PER_STEP=ROWS_PER_STEP,
        WIDTH_BLOCK=triton.next_power_of_2(w), ROUND_BY_HAND=gram_kernel.interpreted(), num_warps=8)
    return out


def padded_features(pixels: torch.Tensor, mean: torch.Tensor, inverse_scale: torch.Tensor, patch_size: int,
                    multiple: int) -> torch.Tensor:
    """(B, C, H, W) pixels, their channels' mean and inverse scale (B, C, 1, 1, `masking.channel_statistics`) ->
    (B, L', C * p * p) bf16, L' the patches rounded up to a multiple of `multiple`: the first L rows are
    `masking.kmeans_features`, the rows after them are left as the allocator gave them (the Gram's top-left
    L x L block, all that `masking.padded_gram` keeps, never reads them; zeroing them took a pass over the whole
    buffer once compiled, 0.024 ms on an H200)."""
    b, c, h, w = pixels.shape
    per_row, rows = w // patch_size, h // patch_size
    out = padded_output(pixels, patch_size, multiple)
    _features_kernel[(rows, c, b)](
        pixels, mean.reshape(b, c).float().contiguous(), inverse_scale.reshape(b, c).float().contiguous(), out,
        *pixels.stride(), out.stride(0), CHANNELS=c, PATCH=patch_size,
        PATCH_BLOCK=triton.next_power_of_2(patch_size), PATCHES_PER_ROW=per_row,
        ROW_BLOCK=triton.next_power_of_2(per_row), ROUND_BY_HAND=gram_kernel.interpreted())
    return out
