"""Benchmark: the masking op's GEMMs alone in several forms, at ViT-B-16's shapes by default: k-means' Gram
(`masking.gram`: every patch's dot products with its image's other patches), the embedding similarity's dot
products with the anchors, and one k-means iteration's bmm.

    python bench/gram.py                         # batch 256, 196 patches of 768 values (bf16), 6 anchors, on the GPU
    python bench/gram.py --batch 64 --length 196 --dim 768 --out bench/results/gram_h200

On an H200 (runs 7 and 8, 2026-12-04) cuBLAS ran the Gram of 196 patches in an sm80 kernel in 0.118 ms, where its
15 GFLOP need about 0.02 ms at the card's bf16 rate, and the patches padded with zero rows to 200 in an sm90 one in
0.058 ms: `masking.gram` pads them since. The forms: the Gram unpadded (until 2026-12-04), as the library computes
it, with bf16 results, with the second operand laid out transposed, from fp32 features with TF32, padded to a
multiple of 8, 16, 32 or 64 (the Gram of the real patches is then its top-left block); the anchors' dot products
in fp32 (the eager library until 2026-12-04) and in bf16 with fp32 results, the anchors padded to 8 or not; an
iteration's bmm as the library does it, transposed, and on the padded Gram. Prints each form's milliseconds (CUDA
events, median), TFLOP/s counting the real patches only, and its costliest kernel. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.masking import Timer, kernel_ms, optional  # noqa: E402
from bench.results_files import write_results  # noqa: E402
from clustermask import masking  # noqa: E402

PAD_MULTIPLES = (8, 16, 32, 64)


def tf32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm with TF32 for this call alone: training leaves TF32 off, as the other forms do."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.bmm(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def gram_forms(feats: torch.Tensor) -> dict:
    """name -> a call computing the Gram (or a padded Gram holding it) from operands prepared in advance, so
    that each times the GEMM alone."""
    transposed = feats.transpose(1, 2).contiguous()
    full = feats.float()
    calls = {
        "unpadded (bf16 in, fp32 out; until 2026-12-04)": lambda: masking.bf16_bmm(feats, feats.transpose(1, 2)),
        "masking.gram (padded to a multiple of 8)": lambda: masking.gram(feats),
        "bf16 out": lambda: torch.bmm(feats, feats.transpose(1, 2)),
        "second operand transposed in memory": lambda: masking.bf16_bmm(feats, transposed),
        "fp32 features, TF32": lambda: tf32_bmm(full, full.transpose(1, 2)),
    }
    for multiple in PAD_MULTIPLES:
        operand = masking.pad_rows(feats, multiple)
        calls[f"padded to a multiple of {multiple} ({operand.shape[1]})"] = \
            lambda operand=operand: masking.bf16_bmm(operand, operand.transpose(1, 2))
    return calls


def anchor_dot_forms(feats: torch.Tensor, anchors: int) -> dict:
    """The embedding similarity's dot products of every patch with its image's anchors (B, L, A)."""
    anchor_feats = feats[:, :anchors]
    eight = masking.pad_rows(anchor_feats, 8)
    full, full_anchors = feats.float(), anchor_feats.float()
    return {
        f"fp32 bmm, {anchors} anchors (eager library)": lambda: torch.bmm(full, full_anchors.transpose(1, 2)),
        f"bf16 in, fp32 out, {anchors} anchors": lambda: masking.bf16_bmm(feats, anchor_feats.transpose(1, 2)),
        f"bf16 in, fp32 out, anchors padded to {eight.shape[1]}":
            lambda: masking.bf16_bmm(feats, eight.transpose(1, 2)),
        "fp32 squared norms (the reduction beside it)": lambda: full.pow(2).sum(-1),
    }


def iteration_forms(length: int, batch: int, k: int = 8) -> dict:
    """One k-means iteration's bmm: the patches' fp32 dot products (B, L, L) times the members (B, L, k)."""
    dots = torch.randn(batch, length, length, device="cuda")
    members = torch.randn(batch, length, k, device="cuda")
    members_t = members.transpose(1, 2).contiguous()
    pad = -length % 8
    dots_padded, members_padded = F.pad(dots, (0, pad, 0, pad)), F.pad(members, (0, 0, 0, pad))
    return {
        "dots @ members (library)": lambda: torch.bmm(dots, members),
        "(members^T @ dots)^T": lambda: torch.bmm(members_t, dots),
        f"patches padded to {length + pad}": lambda: torch.bmm(dots_padded, members_padded),
    }


def check_padding_keeps_the_gram(feats: torch.Tensor) -> float:
    """The largest difference between the Gram and the top-left block of the padded one (0 expected: the padded
    rows are zeros)."""
    gram = masking.bf16_bmm(feats, feats.transpose(1, 2))
    operand = masking.pad_rows(feats, 16)
    block = masking.bf16_bmm(operand, operand.transpose(1, 2))[:, : feats.shape[1], : feats.shape[1]]
    return (gram - block).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=196, help="patches per image")
    parser.add_argument("--dim", type=int, default=768, help="values per patch (C * p * p)")
    parser.add_argument("--anchors", type=int, default=6, help="anchors per image (3% of 196 patches: 6)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="bench/results/gram")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gram.py measures a GPU's GEMM kernels: no CUDA device here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    feats = torch.randn(args.batch, args.length, args.dim, device="cuda").to(torch.bfloat16)
    flops = 2 * args.batch * args.length ** 2 * args.dim
    timer = Timer("cuda")
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "length": args.length, "dim": args.dim, "padding_error": check_padding_keeps_the_gram(feats)}
    rows = []
    groups = {"gram": (gram_forms(feats), flops),
              "anchor dots": (anchor_dot_forms(feats, args.anchors), flops * args.anchors / args.length),
              "k-means iteration": (iteration_forms(args.length, args.batch), 2 * args.batch * args.length ** 2 * 8)}
    for group, (calls, group_flops) in groups.items():
        for name, call in calls.items():
            ms = timer(call, args.iters, 10)
            kernels = optional(f"{name} kernels", kernel_ms, call, 10, 1)
            top = kernels[2][0] if kernels and kernels[2] else ["-", None]
            rows.append({"group": group, "form": name, "ms": ms, "tflops": group_flops / ms / 1e9,
                         "kernel": top[0][:90], "kernel_ms": top[1]})
            write_results(args.out, header, rows)
    lines = [f"# k-means' Gram: batch {args.batch}, {args.length} patches of {args.dim} bf16 values",
             f"device: {header['device']}; torch {header['torch']}; padded Gram's block - Gram: "
             f"{header['padding_error']:g}", "", "| GEMM | form | ms | TFLOP/s (real patches) | costliest kernel |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['form']} | {r['ms']:.4f} | {r['tflops']:.1f} | {r['kernel']} |" for r in rows]
    write_results(args.out, header, rows, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
