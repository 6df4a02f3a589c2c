"""k-means' iterations (`masking.kmeans_assignment`) in one Triton kernel, one program per image.

Compiled by inductor, each iteration is a cuBLAS fp32 bmm of the (B, L, L) dot products with the (B, L, k) unit
members (on an H200 an sm80 FFMA kernel, 0.079 ms for 3 iterations of ViT-B-16 at batch 256, about 3x the time of
its bytes: k = 8 columns fill a quarter of its 32-wide tiles) and a few small kernels around it (argmax, one-hot,
the centres' norms). Here one program holds an image's similarity to its centres in registers for all the
iterations, and reads its dot products from L2 once per iteration, in blocks of columns. The only memory it writes
is the output, which holds each iteration's assignment so that a block of columns can read its patches' clusters.

CUDA only, behind `enabled()`, as `gram_kernel`; the tests run it on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from clustermask.gram_kernel import interpreted, triton

if triton is not None:
    import triton.language as tl

# whether masking.kmeans_clusters runs the iterations here on a GPU: off until a GPU run has measured it against
# the library's path (bench/masking.py's `titer` variant)
USE_ON_GPU = False
# the fp32 products' precision: "tf32x3" (three TF32 tensor-core products, the error of about fp32's), "ieee" (fp32
# FMAs: ViT-B-16 at batch 256 is ~1.3 GFLOP for 3 iterations, the patches padded to 256 rows) or "tf32" (one TF32
# product: inputs to 10 bits, as a bmm with torch's allow_tf32; the fewest registers)
DOT_PRECISION = "tf32x3"
COLUMNS_PER_STEP = 16  # patches whose dot products a step of the sums reads (tl.dot needs >= 16)
DOT_MIN_SIZE = 16  # tl.dot's smallest side: the patches and the centres are padded up to at least it
# compiled for sm90 (bench/results/kmeans_kernel_sm90.md), 8 warps and 16 columns a step hold a program's 256 x 16
# similarities, sums and block of dot products in 184-198 registers a thread with no spill (TF32 x 3; 4 warps or 32
# columns spill)
NUM_WARPS = 8
NUM_STAGES = 2


def enabled(dots: torch.Tensor) -> bool:
    """Whether `assignment` serves these dot products in masking.kmeans_clusters."""
    return triton is not None and USE_ON_GPU and dots.is_cuda


if triton is not None:

    @triton.jit
    def _norms(squares):
        # as masking.norms_from_squares
        return tl.maximum(tl.sqrt(tl.maximum(squares, 0.0)), 1e-6)

    @triton.jit
    def _inverse_norms(squares):
        return 1.0 / _norms(squares)

    @triton.jit
    def _kmeans_kernel(dots, initial, out, length, k, iters, stride_b, stride_row, initial_stride_b, out_stride_b,
                       ROWS: tl.constexpr, CENTRES: tl.constexpr, COLUMNS_PER_STEP: tl.constexpr,
                       PRECISION: tl.constexpr):
        image = tl.program_id(0).to(tl.int64)
        base = dots + image * stride_b
        assigned = out + image * out_stride_b
        rows = tl.arange(0, ROWS)
        centres = tl.arange(0, CENTRES)
        row_valid = rows < length
        centre_valid = centres < k
        # rows past the last patch read the last patch's dot products, so that no 2-D load needs a mask (nor its
        # registers); their weight in the centres is zero and their clusters are never stored
        row_offsets = tl.minimum(rows, length - 1) * stride_row
        inverse_norms = tl.where(row_valid, _inverse_norms(tl.load(base + row_offsets + rows, mask=row_valid)), 0.0)
        first = tl.load(initial + image * initial_stride_b + centres, mask=centre_valid, other=0)
        to_first = tl.load(base + row_offsets[:, None] + first[None, :])
        first_inverse_norms = _inverse_norms(tl.load(base + first * (stride_row + 1)))
        # the padding centres never win an argmax
        similarity = tl.where(centre_valid[None, :], to_first * first_inverse_norms[None, :], float("-inf"))
        for _ in range(iters):
            assignment = tl.argmax(similarity, axis=1)  # the first of equals, as torch.argmax
            tl.store(assigned + rows, assignment, mask=row_valid)
            tl.debug_barrier()  # every row's cluster written before any block of columns reads them
            to_sums = tl.zeros((ROWS, CENTRES), dtype=tl.float32)
            for start in range(0, length, COLUMNS_PER_STEP):
                columns = start + tl.arange(0, COLUMNS_PER_STEP)
                column_valid = columns < length
                # as the rows: columns past the last patch read the last one's, with no cluster
                safe_columns = tl.minimum(columns, length - 1)
                block = tl.load(base + row_offsets[:, None] + safe_columns[None, :])
                column_clusters = tl.load(assigned + columns, mask=column_valid, other=-1)
                column_inverse_norms = _inverse_norms(tl.load(base + safe_columns * (stride_row + 1)))
                unit_members = tl.where(column_clusters[:, None] == centres[None, :], column_inverse_norms[:, None],
                                        0.0)
                to_sums += tl.dot(block, unit_members, input_precision=PRECISION)
            tl.debug_barrier()  # every block read before the next iteration overwrites the clusters
            # the padding rows' inverse norms are zero: no weight, no membership
            unit_members = tl.where(assignment[:, None] == centres[None, :], inverse_norms[:, None], 0.0)
            norms = _norms(tl.sum(unit_members * to_sums, axis=0))
            # an empty cluster keeps its centre
            non_empty = tl.max(unit_members, axis=0) > 0
            similarity = tl.where(non_empty[None, :], to_sums / norms[None, :], similarity)
        tl.store(assigned + rows, tl.argmax(similarity, axis=1), mask=row_valid)


def assignment(dots: torch.Tensor, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """`masking.kmeans_assignment` for (B, L, L) fp32 dot products (rows of unit stride, a padded Gram's block
    included) and (B, k) initial centres: the (B, L) int64 clusters, equal but where two centres lie within the
    products' rounding of each other for a patch."""
    b, length, _ = dots.shape
    k = initial.shape[1]
    if dots.stride(2) != 1:
        dots = dots.contiguous()
    if initial.stride(1) != 1:
        initial = initial.contiguous()
    out = torch.empty(b, length, device=dots.device, dtype=torch.int64)
    rows = max(triton.next_power_of_2(length), DOT_MIN_SIZE)
    _kmeans_kernel[(b,)](
        dots, initial, out, length, k, iters, dots.stride(0), dots.stride(1), initial.stride(0), out.stride(0),
        ROWS=rows, CENTRES=max(triton.next_power_of_2(k), DOT_MIN_SIZE), COLUMNS_PER_STEP=COLUMNS_PER_STEP,
        PRECISION="ieee" if interpreted() else DOT_PRECISION, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
