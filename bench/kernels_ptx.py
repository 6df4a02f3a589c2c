"""Compile clustermask's Triton kernels (gram_kernel, features_kernel, assignment_kernel) for a GPU architecture
without a GPU, and report what ptxas says of them.

    python bench/kernels_ptx.py --out bench/results/gram_kernel_sm90      # ViT-B-16's shapes, sm_90a (H100/H200)
    python bench/kernels_ptx.py --kernel features --out bench/results/features_kernel_sm90
    python bench/kernels_ptx.py --kernel assignment --out bench/results/assignment_kernel_sm90

(`--kernel kmeans` compiled clustermask/kmeans_kernel.py, removed after run 9 measured it: commit 294e73f.)

Triton compiles ahead of time for a target (triton.compiler.ASTSource, triton 3.x's signature format) and carries its
own ptxas: this catches what the interpreter the tests use cannot (Triton's compiler rejecting the kernel), and
shows the instructions the dot became (wgmma on sm90), the shared memory, the registers and any spills. A check
and a record, not a timing: only a GPU says how fast the kernel is (bench/masking.py's `tgram` variants).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clustermask import assignment_kernel, features_kernel, gram_kernel  # noqa: E402
from bench.results_files import write_results  # noqa: E402

POINTERS = ("pixels", "mean", "inverse_scale", "out")
INTEGERS = ("num_patches", "out_length", "tiles", "stride_b", "stride_c", "stride_h", "out_stride_b")


def compile_gram_kernel(tile: int, diagonal: bool, patch: int, patches_per_row: int, capability: int, stages: int):
    constants = {"stride_w": 1, "CHANNELS": 3, "PATCH": patch, "PATCHES_PER_ROW": patches_per_row, "TILE": tile,
                 "PIXELS_PER_STEP": gram_kernel.PIXELS_PER_STEP,
                 "STEPS_PER_CHANNEL": triton.cdiv(patch * patch, gram_kernel.PIXELS_PER_STEP),
                 "WHOLE_STEPS": patch * patch % gram_kernel.PIXELS_PER_STEP == 0, "DIAGONAL": diagonal,
                 "DOT_BF16": True}
    signature = {name: "*fp32" for name in POINTERS} | {name: "i32" for name in INTEGERS}
    signature |= {name: "constexpr" for name in constants}
    source = ASTSource(gram_kernel._gram_kernel, signature, constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": gram_kernel.num_warps(tile), "num_stages": stages})


def compile_features_kernel(patch: int, image: int, capability: int, stages: int, fused: bool):
    """As a launch on ViT-B-16's pixels specialises it: pointers and strides divisible by 16, unit width stride;
    `fused`: `_standardising_kernel` (the statistics too), else `_features_kernel`."""
    per_row = image // patch
    constants = {"stride_w": 1, "CHANNELS": 3, "PATCH": patch, "PATCH_BLOCK": triton.next_power_of_2(patch),
                 "PATCHES_PER_ROW": per_row, "ROW_BLOCK": triton.next_power_of_2(per_row), "ROUND_BY_HAND": False}
    pointers = {"pixels": "*fp32", "out": "*bf16"}
    strides = {"stride_b": "i32", "stride_c": "i32", "stride_h": "i32", "out_stride_b": "i32"}
    if fused:
        kernel, warps = features_kernel._standardising_kernel, 8
        arguments = pointers | {"images_channels": "i32", "programs": "i32"} | strides
        constants |= {"HEIGHT": image, "WIDTH": image, "PATCH_ROWS": per_row,
                      "ROWS_PER_STEP": features_kernel.ROWS_PER_STEP, "WIDTH_BLOCK": triton.next_power_of_2(image)}
    else:
        kernel, warps = features_kernel._features_kernel, 4
        arguments = pointers | {"mean": "*fp32", "inverse_scale": "*fp32"} | strides
    names = list(kernel.arg_names)
    counts = ("images_channels", "programs")  # the only arguments that are not pointers or strides
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in arguments if name not in counts}
    source = ASTSource(kernel, arguments | {name: "constexpr" for name in constants}, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": warps, "num_stages": stages}), warps


def compile_assignment_kernel(patches: int, k: int, capability: int, stages: int, start: bool, last: bool):
    """`_start_kernel` or `_iteration_kernel` as a launch on ViT-B-16's Gram (padded to 200, a view of 196)
    specialises it: pointers divisible by 16, the column stride 1."""
    constants = {"ROWS": triton.next_power_of_2(patches), "K": k, "CENTRES": triton.next_power_of_2(k), "LAST": last}
    if start:
        kernel = assignment_kernel._start_kernel
        arguments = {"dots": "*fp32", "initial": "*i64", "inverse_norms_out": "*fp32", "similarity_out": "*fp32",
                     "unit_members_out": "*fp32", "assignment_out": "*i64", "length": "i32", "stride_b": "i32",
                     "stride_row": "i32"}
        constants["stride_col"] = 1
    else:
        kernel = assignment_kernel._iteration_kernel
        arguments = {name: "*fp32" for name in ("to_sums", "inverse_norms", "similarity", "unit_members")}
        arguments |= {"assignment": "*i64", "similarity_out": "*fp32", "unit_members_out": "*fp32",
                      "assignment_out": "*i64", "length": "i32"}
    names = list(kernel.arg_names)
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in arguments.items() if "*" in kind}
    source = ASTSource(kernel, arguments | {name: "constexpr" for name in constants}, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": assignment_kernel.NUM_WARPS, "num_stages": stages})


def ptxas_report(ptx: str, capability: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        report = subprocess.run([str(ptxas), f"-arch={arch}", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                                capture_output=True, text=True, check=True).stderr
    return {"registers": first_number(r"Used (\d+) registers", report),
            "spill_stores_bytes": first_number(r"(\d+) bytes spill stores", report),
            "spill_loads_bytes": first_number(r"(\d+) bytes spill loads", report)}


def first_number(pattern: str, text: str):
    found = re.search(pattern, text)
    return int(found.group(1)) if found else None


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def gram_rows(args) -> list:
    rows = []
    for tile in (int(t) for t in args.tiles.split(",")):
        for diagonal in (True, False):
            kernel = compile_gram_kernel(tile, diagonal, args.patch, args.image // args.patch, args.capability,
                                         args.stages)
            rows.append({"tile": tile, "diagonal": diagonal, "num_warps": gram_kernel.num_warps(tile),
                         **kernel_report(kernel, args.capability)})
    return rows


def kernel_report(kernel, capability: int) -> dict:
    ptx = kernel.asm["ptx"]
    return {"shared_bytes": kernel.metadata.shared, "wgmma": count(r"\bwgmma\.mma_async", ptx),
            "mma_sync": count(r"\bmma\.sync", ptx), "fma": count(r"\bfma\.rn\.f32", ptx),
            "cp_async": count(r"cp\.async\.", ptx), "vector_loads": count(r"\bld\.global(\.\w+)*\.v[24]\.", ptx),
            "loads": count(r"\bld\.global\.", ptx), "vector_stores": count(r"\bst\.global(\.\w+)*\.v[24]\.", ptx),
            "stores": count(r"\bst\.global\.", ptx), **ptxas_report(ptx, capability)}


REPORTED = ["shared KB", "wgmma", "mma.sync", "fma.f32", "cp.async", "ld.global (vector)", "st.global (vector)",
            "registers", "spill stores B", "spill loads B"]


def reported(row: dict) -> list:
    return [f"{row['shared_bytes'] / 1024:.0f}", row["wgmma"], row["mma_sync"], row["fma"], row["cp_async"],
            f"{row['loads']} ({row['vector_loads']})", f"{row['stores']} ({row['vector_stores']})",
            row["registers"], row["spill_stores_bytes"], row["spill_loads_bytes"]]


def table(columns: list, cells: list) -> list:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in cells]


def features_rows(args) -> list:
    rows = []
    for fused in (False, True):
        kernel, warps = compile_features_kernel(args.patch, args.image, args.capability, args.stages, fused)
        rows.append({"kernel": "_standardising_kernel" if fused else "_features_kernel", "num_warps": warps,
                     **kernel_report(kernel, args.capability)})
    return rows


def assignment_rows(args) -> list:
    patches = (args.image // args.patch) ** 2
    rows = []
    for start in (True, False):
        for last in (False, True):
            kernel = compile_assignment_kernel(patches, args.centres, args.capability, args.stages, start, last)
            rows.append({"kernel": "_start_kernel" if start else "_iteration_kernel", "last": last,
                         "num_warps": assignment_kernel.NUM_WARPS, **kernel_report(kernel, args.capability)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=["gram", "features", "assignment"], default="gram")
    parser.add_argument("--out", default=None, help="default: bench/results/<kernel>_kernel_ptx")
    parser.add_argument("--capability", type=int, default=90, help="90: H100/H200; 80: A100")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--tiles", default="64,128", help="the Gram kernel's")
    parser.add_argument("--centres", type=int, default=8, help="the assignment kernels' k")
    parser.add_argument("--stages", type=int, default=3, help="Triton's num_stages (its default on a GPU: 3)")
    args = parser.parse_args(argv)
    header = {"kernel": args.kernel, "target": f"sm_{args.capability}", "triton": triton.__version__,
              "patch": args.patch, "image": args.image, "num_stages": args.stages, "date": time.strftime("%Y-%m-%d")}
    if args.kernel == "gram":
        rows = gram_rows(args)
        lines = table(["tile", "diagonal", "warps"] + REPORTED,
                      [[r["tile"], r["diagonal"], r["num_warps"]] + reported(r) for r in rows])
    elif args.kernel == "assignment":
        rows = assignment_rows(args)
        lines = table(["kernel", "last", "warps"] + REPORTED,
                      [[r["kernel"], r["last"], r["num_warps"]] + reported(r) for r in rows])
    else:
        rows = features_rows(args)
        lines = table(["kernel", "warps"] + REPORTED, [[r["kernel"], r["num_warps"]] + reported(r) for r in rows])
    title = (f"# {args.kernel}_kernel compiled for {header['target']} without a GPU (triton {triton.__version__}, "
             f"{args.image} px images in {args.patch} px patches, num_stages {args.stages}, {header['date']})")
    write_results(args.out or f"bench/results/{args.kernel}_kernel_ptx", header, rows,
                  "\n".join([title, ""] + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
