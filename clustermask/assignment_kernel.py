"""k-means' steps between its GEMMs (`masking.kmeans_assignment`), one Triton kernel each, a program per image.

Compiled, inductor spreads each iteration's work on the (B, L, k) dot products with the centres over four kernels
(the argmax and the members, their count, the centres' norms as a split reduction in two), a few microseconds of
an H200 each, and picks the configuration of the smallest ones by timing them: the same code gave one of them
0.008 ms in run 12 and 0.042 ms in run 13 (bench/README.md). Here a program holds one image's (L, k) in registers
and does an iteration's all: the centres' norms and member counts, the new similarities, their argmax, and the
members scaled by their inverse norms that the next GEMM (cuBLAS, as before) reads. One launch per iteration, one
to start, in a configuration fixed here.

The arithmetic is `masking.kmeans_assignment`'s (IEEE square roots and divisions); only the order of the sums over
the patches differs, so a similarity may move by the last bit and a patch whose two nearest centres are that close
may change cluster.

Off (`USE_ON_GPU`) until a GPU measures it (`bench/gpu_check18.sh`, variant `tassign`). CUDA only, behind
`enabled()`; under TRITON_INTERPRET=1 the kernels run on CPU tensors, which is how the tests check them without a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch: masking.kmeans_assignment's torch is the path
    triton = None

# whether masking.kmeans_assignment runs its steps here on a GPU: off until measured
USE_ON_GPU = False
NUM_WARPS = 4  # a program's (L, k): 2048 values for ViT-B-16's 196 patches and 8 centres, 16 per thread


def enabled(dots: torch.Tensor) -> bool:
    """Whether `kmeans_assignment` serves these dot products in masking.kmeans_assignment."""
    return triton is not None and USE_ON_GPU and dots.is_cuda


if triton is not None:

    @triton.jit
    def _norm(squares):
        """masking.norms_from_squares."""
        return tl.maximum(tl.sqrt_rn(tl.maximum(squares, 0.0)), 1e-6)

    @triton.jit
    def _store_nearest(similarity, inverse_norms, image, length, unit_members_out, assignment_out,
                       ROWS: tl.constexpr, K: tl.constexpr, CENTRES: tl.constexpr, LAST: tl.constexpr):
        """Each patch's nearest centre, the first of equals (as torch.argmax); unless LAST, also its one-hot row
        times the patch's inverse norm, which the next GEMM reads."""
        rows = tl.arange(0, ROWS)[:, None]
        centres = tl.arange(0, CENTRES)[None, :]
        inside = (rows < length) & (centres < K)
        nearest = tl.argmax(tl.where(inside, similarity, float("-inf")), axis=1, tie_break_left=True)
        patches = tl.arange(0, ROWS)
        tl.store(assignment_out + image * length + patches, nearest.to(tl.int64), mask=patches < length)
        if not LAST:
            unit_members = tl.where(centres == nearest[:, None], inverse_norms, 0.0)
            tl.store(unit_members_out + image * length * K + rows * K + centres, unit_members, mask=inside)

    @triton.jit
    def _start_kernel(dots, initial, inverse_norms_out, similarity_out, unit_members_out, assignment_out, length,
                      stride_b, stride_row, stride_col, ROWS: tl.constexpr, K: tl.constexpr, CENTRES: tl.constexpr,
                      LAST: tl.constexpr):
        """Image `program_id(0)`: its patches' inverse norms, their cosines with the initial centres' patches, and
        the members of the first iteration (or, LAST, the assignment)."""
        image = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, ROWS)[:, None]
        centres = tl.arange(0, CENTRES)[None, :]
        row_inside, centre_inside = rows < length, centres < K
        inside = row_inside & centre_inside
        image_dots = dots + image * stride_b
        diagonal = stride_row + stride_col
        inverse_norms = tl.div_rn(1.0, _norm(tl.load(image_dots + rows * diagonal, mask=row_inside, other=1.0)))
        centre_patch = tl.load(initial + image * K + centres, mask=centre_inside, other=0)
        centre_inverse_norms = tl.div_rn(1.0, _norm(tl.load(image_dots + centre_patch * diagonal,
                                                            mask=centre_inside, other=1.0)))
        to_initial = tl.load(image_dots + rows * stride_row + centre_patch * stride_col, mask=inside, other=0.0)
        similarity = to_initial * centre_inverse_norms
        if not LAST:
            tl.store(inverse_norms_out + image * length + rows, inverse_norms, mask=row_inside)
            tl.store(similarity_out + image * length * K + rows * K + centres, similarity, mask=inside)
        _store_nearest(similarity, inverse_norms, image, length, unit_members_out, assignment_out, ROWS, K, CENTRES,
                       LAST)

    @triton.jit
    def _iteration_kernel(to_sums, inverse_norms, similarity, unit_members, assignment, similarity_out,
                          unit_members_out, assignment_out, length, ROWS: tl.constexpr, K: tl.constexpr,
                          CENTRES: tl.constexpr, LAST: tl.constexpr):
        """Image `program_id(0)`, from the GEMM's sums (L, k) of each patch's dot products with the centres' unit
        members: the centres' norms, the new similarities (an empty centre keeps its own), and the members of the
        next iteration (or, LAST, the assignment)."""
        image = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, ROWS)[:, None]
        centres = tl.arange(0, CENTRES)[None, :]
        row_inside = rows < length
        inside = row_inside & (centres < K)
        at = image * length * K + rows * K + centres
        sums = tl.load(to_sums + at, mask=inside, other=0.0)
        members = (tl.load(assignment + image * length + rows, mask=row_inside, other=0) == centres) & row_inside
        norms = _norm(tl.sum(tl.load(unit_members + at, mask=inside, other=0.0) * sums, axis=0))[None, :]
        has_members = tl.sum(members.to(tl.int32), axis=0)[None, :] > 0
        new = tl.where(has_members, tl.div_rn(sums, norms), tl.load(similarity + at, mask=inside, other=0.0))
        if not LAST:
            tl.store(similarity_out + at, new, mask=inside)
        _store_nearest(new, tl.load(inverse_norms + image * length + rows, mask=row_inside, other=0.0), image,
                       length, unit_members_out, assignment_out, ROWS, K, CENTRES, LAST)


def kmeans_assignment(dots: torch.Tensor, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """`masking.kmeans_assignment`: (B, L, L) fp32 dot products and (B, k) initial centres' patches -> (B, L)
    cluster index; each iteration's sums a bmm of cuBLAS between these kernels."""
    b, length, _ = dots.shape
    k = initial.shape[1]
    blocks = dict(ROWS=triton.next_power_of_2(length), K=k, CENTRES=triton.next_power_of_2(k),
                  num_warps=NUM_WARPS)

    def empty(*shape, dtype=torch.float32):
        return torch.empty(b, *shape, device=dots.device, dtype=dtype)

    inverse_norms, similarity, unit_members = empty(length), empty(length, k), empty(length, k)
    assignment = empty(length, dtype=torch.int64)
    _start_kernel[(b,)](dots, initial.contiguous(), inverse_norms, similarity, unit_members, assignment, length,
                        *dots.stride(), LAST=iters == 0, **blocks)
    for iteration in range(iters):
        # fresh outputs rather than updates in place, which compiled code would copy first
        outputs = empty(length, k), empty(length, k), empty(length, dtype=torch.int64)
        _iteration_kernel[(b,)](torch.bmm(dots, unit_members), inverse_norms, similarity, unit_members, assignment,
                                *outputs, length, LAST=iteration == iters - 1, **blocks)
        similarity, unit_members, assignment = outputs
    return assignment
