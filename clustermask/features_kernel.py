"""k-means' bf16 features, padded for the Gram's GEMM, from one Triton kernel that copies the pixels patch row by
patch row.

`masking.pad_rows(masking.kmeans_features(...))`, compiled by inductor, is one kernel over the features'
elements that reads each patch row of 16 pixels as its own 64-byte piece: on an H200, 0.099 ms for ViT-B-16 at
batch 256, twice the time of its bytes (bench/README.md, run 12). Here each program standardises one channel of
one row of patches: it loads the image rows they span in one piece and stores each patch's values, 0.061 ms (run
13). The features are those of `kmeans_features` bit for bit: the same fp32 subtraction and multiplication by the
channel's 1 / (std + eps), rounded to the nearest bf16.

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


def enabled(pixels: torch.Tensor) -> bool:
    """Whether `padded_features` serves these pixels in masking.kmeans_gram (bf16 conversions in hardware: sm80+)."""
    return (triton is not None and USE_ON_GPU and pixels.is_cuda
            and gram_kernel.has_bf16_tensor_cores(pixels.device.index))


if triton is not None:

    @triton.jit
    def _features_kernel(pixels, mean, inverse_scale, out, stride_b, stride_c, stride_h, stride_w, out_stride_b,
                         CHANNELS: tl.constexpr, PATCH: tl.constexpr, PATCH_BLOCK: tl.constexpr,
                         PATCHES_PER_ROW: tl.constexpr, ROW_BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """Channel `program_id(1)` of the patches in row `program_id(0)` of image `program_id(2)`."""
        patch_row = tl.program_id(0)
        channel = tl.program_id(1)
        image = tl.program_id(2)
        y = tl.arange(0, PATCH_BLOCK)[:, None, None]  # the pixel row within the patch
        along = tl.arange(0, ROW_BLOCK)[None, :, None]  # the patch within the row
        x = tl.arange(0, PATCH_BLOCK)[None, None, :]  # the pixel within the patch's row
        valid = (y < PATCH) & (along < PATCHES_PER_ROW) & (x < PATCH)
        source = (pixels + image.to(tl.int64) * stride_b + channel * stride_c
                  + (patch_row * PATCH + y) * stride_h + (along * PATCH + x) * stride_w)
        values = tl.load(source, mask=valid, other=0.0).to(tl.float32)
        mean_c = tl.load(mean + image * CHANNELS + channel)
        inverse_scale_c = tl.load(inverse_scale + image * CHANNELS + channel)
        standardised = (values - mean_c) * inverse_scale_c
        if ROUND_BY_HAND:  # the interpreter (triton 3.8) truncates to bf16: to nearest even by hand, exact in bf16
            bits = standardised.to(tl.uint32, bitcast=True)
            standardised = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        patch = patch_row * PATCHES_PER_ROW + along
        feature = channel * PATCH * PATCH + y * PATCH + x  # patchify's order: channel, pixel row, pixel
        target = out + image.to(tl.int64) * out_stride_b + patch * (CHANNELS * PATCH * PATCH) + feature
        tl.store(target, standardised.to(tl.bfloat16), mask=valid)


def padded_features(pixels: torch.Tensor, mean: torch.Tensor, inverse_scale: torch.Tensor, patch_size: int,
                    multiple: int) -> torch.Tensor:
    """(B, C, H, W) pixels, their channels' mean and inverse scale (B, C, 1, 1, `masking.channel_statistics`) ->
    (B, L', C * p * p) bf16, L' the patches rounded up to a multiple of `multiple`: the first L rows are
    `masking.kmeans_features`, the rows after them are left as the allocator gave them (the Gram's top-left
    L x L block, all that `masking.padded_gram` keeps, never reads them; zeroing them took a pass over the whole
    buffer once compiled, 0.024 ms on an H200)."""
    b, c, h, w = pixels.shape
    per_row, rows = w // patch_size, h // patch_size
    padded_length = triton.cdiv(per_row * rows, multiple) * multiple
    out = torch.empty(b, padded_length, c * patch_size * patch_size, device=pixels.device, dtype=torch.bfloat16)
    _features_kernel[(rows, c, b)](
        pixels, mean.reshape(b, c).float().contiguous(), inverse_scale.reshape(b, c).float().contiguous(), out,
        *pixels.stride(), out.stride(0), CHANNELS=c, PATCH=patch_size,
        PATCH_BLOCK=triton.next_power_of_2(patch_size), PATCHES_PER_ROW=per_row,
        ROW_BLOCK=triton.next_power_of_2(per_row), ROUND_BY_HAND=gram_kernel.interpreted())
    return out
