"""Two Triton kernels for k-means' op on a GPU: its bf16 features, and each iteration's sums over the clusters.

- `padded_features`: `masking.pad_rows(masking.kmeans_features(...))`, bit for bit. Compiled by inductor, that
  permutation of the standardised pixels into patches is one kernel over the features' elements that reads each
  patch row as its own 64-byte piece (on an H200, 0.099 ms for ViT-B-16 at batch 256, twice the time of its
  bytes). Here each program copies one channel of one row of patches: it loads the image rows they span whole and
  stores each patch's p * p values in one piece.
- `member_sums`: `torch.bmm(dots, unit_members)` in fp32 for k-means' iterations. cuBLAS runs it in an sm80 FFMA
  kernel whose 32-wide tiles the 8 centres fill a quarter of (0.080 ms for the three iterations); here each
  program sums 64 rows of one image's dot products against its centres' members, in fp32.

CUDA only, behind `features_enabled` and `sums_enabled`; on the CPU (and where Triton is missing) the library's
torch code is the path. Under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how the tests check them
without a GPU (as `gram_kernel`'s).
"""
from __future__ import annotations

import torch

from . import gram_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: the library's torch code is the path
    triton = None

# whether masking takes these kernels on a GPU (bench/README.md, run 13)
FEATURES_ON_GPU = False
SUMS_ON_GPU = False
STORE_BY_PATCH = True  # each patch's values permuted in registers before the store (else as loaded)
SUM_ROWS = 64  # rows of the dot products per program of `member_sums`
SUM_STEP = 32  # of their columns per step


def features_enabled(pixels: torch.Tensor) -> bool:
    return triton is not None and FEATURES_ON_GPU and pixels.is_cuda


def sums_enabled(dots: torch.Tensor) -> bool:
    return triton is not None and SUMS_ON_GPU and dots.is_cuda


if triton is not None:

    @triton.jit
    def _round_to_bf16_by_hand(x):
        """x rounded to the nearest bf16 (ties to even), as fp32: the interpreter (triton 3.8) truncates."""
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)

    @triton.jit
    def _features_kernel(pixels, mean, inverse_scale, out, stride_b, stride_c, stride_h, stride_w, out_stride_b,
                         CHANNELS: tl.constexpr, PATCH: tl.constexpr, PATCH_BLOCK: tl.constexpr,
                         PATCHES_PER_ROW: tl.constexpr, ROW_BLOCK: tl.constexpr, STORE_BY_PATCH: tl.constexpr,
                         ROUND_BY_HAND: tl.constexpr):
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
        if ROUND_BY_HAND:
            standardised = _round_to_bf16_by_hand(standardised)
        rounded = standardised.to(tl.bfloat16)
        patch = patch_row * PATCHES_PER_ROW + along
        feature = channel * PATCH * PATCH + y * PATCH + x  # patchify's order: channel, pixel row, pixel
        target = out + image.to(tl.int64) * out_stride_b + patch * (CHANNELS * PATCH * PATCH) + feature
        if STORE_BY_PATCH:
            tl.store(tl.permute(target, (1, 0, 2)), tl.permute(rounded, (1, 0, 2)),
                     mask=tl.permute(valid, (1, 0, 2)))
        else:
            tl.store(target, rounded, mask=valid)

    @triton.jit
    def _member_sums_kernel(dots, members, out, length, centres, dots_stride_b, dots_stride_row, members_stride_b,
                            members_stride_row, out_stride_b, out_stride_row, ROWS: tl.constexpr,
                            STEP: tl.constexpr, CENTRES_BLOCK: tl.constexpr):
        """Rows `program_id(0)` * ROWS.. of image `program_id(1)`'s dots @ members, fp32 products and sums."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        image = tl.program_id(1).to(tl.int64)
        columns = tl.arange(0, CENTRES_BLOCK)
        row_valid = rows < length
        total = tl.zeros((ROWS, CENTRES_BLOCK), dtype=tl.float32)
        for start in range(0, length, STEP):
            inner = start + tl.arange(0, STEP)
            a = tl.load(dots + image * dots_stride_b + rows[:, None] * dots_stride_row + inner[None, :],
                        mask=row_valid[:, None] & (inner[None, :] < length), other=0.0)
            b = tl.load(members + image * members_stride_b + inner[:, None] * members_stride_row + columns[None, :],
                        mask=(inner[:, None] < length) & (columns[None, :] < centres), other=0.0)
            total += tl.dot(a, b, input_precision="ieee")
        tl.store(out + image * out_stride_b + rows[:, None] * out_stride_row + columns[None, :], total,
                 mask=row_valid[:, None] & (columns[None, :] < centres))


def padded_features(pixels: torch.Tensor, mean: torch.Tensor, inverse_scale: torch.Tensor, patch_size: int,
                    multiple: int) -> torch.Tensor:
    """(B, C, H, W) pixels, their channels' mean and inverse scale (B, C, 1, 1, `masking.channel_statistics`) ->
    (B, L', C * p * p) bf16: `masking.kmeans_features` with zero rows appended up to a multiple of `multiple`."""
    b, c, h, w = pixels.shape
    per_row, rows = w // patch_size, h // patch_size
    length = per_row * rows
    padded_length = triton.cdiv(length, multiple) * multiple
    out = torch.empty(b, padded_length, c * patch_size * patch_size, device=pixels.device, dtype=torch.bfloat16)
    out[:, length:] = 0
    _features_kernel[(rows, c, b)](
        pixels, mean.reshape(b, c).float().contiguous(), inverse_scale.reshape(b, c).float().contiguous(), out,
        *pixels.stride(), out.stride(0), CHANNELS=c, PATCH=patch_size,
        PATCH_BLOCK=triton.next_power_of_2(patch_size), PATCHES_PER_ROW=per_row,
        ROW_BLOCK=triton.next_power_of_2(per_row), STORE_BY_PATCH=STORE_BY_PATCH,
        ROUND_BY_HAND=gram_kernel.interpreted())
    return out


def member_sums(dots: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(B, L, L) fp32 dot products (rows of unit stride), (B, L, k) fp32 -> (B, L, k) fp32: torch.bmm's result,
    up to the order of the fp32 sums."""
    b, length, centres = members.shape
    if dots.stride(2) != 1 or members.stride(2) != 1:
        raise ValueError(f"member_sums needs rows of unit stride, not dots {dots.stride()}, members "
                         f"{members.stride()}")
    out = torch.empty(b, length, centres, device=dots.device, dtype=torch.float32)
    _member_sums_kernel[(triton.cdiv(length, SUM_ROWS), b)](
        dots, members, out, length, centres, dots.stride(0), dots.stride(1), members.stride(0), members.stride(1),
        out.stride(0), out.stride(1), ROWS=SUM_ROWS, STEP=SUM_STEP,
        CENTRES_BLOCK=max(16, triton.next_power_of_2(centres)))
    return out
