"""The Triton kernels inductor generates for the compiled masking op on a CUDA GPU, written on a machine without one.

    python bench/triton_code.py --strategy cluster --features rgb          # ViT-B-16 shapes, batch 256
    python bench/triton_code.py --strategy kmeans --out bench/results/triton_kmeans.py

Inductor's code generation needs no GPU, only the device's properties (SM count, compute capability, warp
size), which are read through a few functions; this script answers them with an H100's and stops before
Triton compiles the kernels (which needs the driver). What comes out is the op's generated module, and a
summary per kernel: its iteration sizes and the loads, divisions and square roots in its body (each done once
per element it iterates over, or per row for what depends on the row alone): what tells a memory-bound kernel
from one bound by its arithmetic.

A development tool that patches inductor internals (written against torch 2.14): a measurement of the
kernels needs a GPU (`bench/masking.py --kernels`).
"""
from __future__ import annotations

import argparse
import re
import sys
import types
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clustermask import features_kernel, masking  # noqa: E402
from clustermask.config import MaskingConfig  # noqa: E402

H100 = dict(multi_processor_count=132, major=9, minor=0, regs_per_multiprocessor=65536,
            max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32)


def pretend_cuda_device() -> None:
    """Answer inductor's questions about the CUDA device with an H100's properties."""
    import torch._dynamo.device_interface as device_interface
    import torch._inductor.compile_fx as compile_fx
    import torch.utils._triton as triton_utils
    from torch._inductor.runtime import hints

    props = types.SimpleNamespace(**H100, name="NVIDIA H100 (assumed)", total_memory=80 * 2**30,
                                  L2_cache_size=50 * 2**20, gcnArchName="")
    device = hints.DeviceProperties(type="cuda", index=0, cc=90, **{k: v for k, v in H100.items() if k != "minor"})
    hints.DeviceProperties.create = classmethod(lambda cls, _device: device)
    cuda = device_interface.CudaInterface
    cuda.get_compute_capability = staticmethod(lambda _device=None: 90)
    cuda.get_device_properties = staticmethod(lambda _device=None: props)
    cuda.is_available = staticmethod(lambda: True)
    torch.cuda.get_device_properties = lambda _device=None: props
    torch.cuda.get_device_capability = lambda _device=None: (9, 0)
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    triton_utils.triton_hash_with_backend = lambda: "codegen-only"
    triton_utils.triton_backend = lambda: None
    compile_fx._check_triton_bf16_support = lambda _graph: None
    torch._inductor.config.shape_padding = False  # it benchmarks padded matmuls on the device
    torch._inductor.config.joint_graph_constant_folding = False  # it runs ops on the device


def generated_code(cfg: MaskingConfig, batch: int, image_size: int, patch: int, width: int) -> str:
    """Inductor's module for one compiled call of the masking op on fake CUDA tensors."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.graph import GraphLowering
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    masker = masking.TokenMasker(cfg, patch, max(1, width // 64), total_steps=1000).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        masker = masker.to("cuda")
        pixels = torch.empty(batch, 3, image_size, image_size, device="cuda")
        tokens = torch.empty(batch, 1 + (image_size // patch) ** 2, width, device="cuda", dtype=torch.bfloat16)

    def op(pixels, tokens):
        masker.pixels = pixels
        return (masker(tokens), *masker.stats.values())

    compiling = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True  # make_fx traces the code path torch.compile would
    try:
        graph = make_fx(op, tracing_mode="fake")(pixels, tokens)
    finally:
        torch.compiler.is_compiling = compiling
    written = []
    with mock.patch.object(GraphLowering, "save_output_code", written.append):
        try:
            compile_fx(graph, [pixels, tokens])
        except Exception:  # loading the module compiles its kernels, which needs a driver: it is written by then
            if not written:
                raise
    return written[-1]


def kernel_summary(code: str) -> list:
    """Per Triton kernel: name, element counts, and the loads, divisions and square roots in its body."""
    rows = []
    for name, body in re.findall(r"@triton\.jit\ndef (\w+)\(.*?\n(.*?)\n'''", code, flags=re.S):
        sizes = dict(re.findall(r"(xnumel|r0_numel) = (\d+)", body))
        block = re.search(r"R0_BLOCK: tl\.constexpr = (\d+)", body)
        rows.append({"kernel": name, "x": int(sizes.get("xnumel", 0)), "r": int(sizes.get("r0_numel", 0)),
                     "persistent_r_block": int(block.group(1)) if block else None,
                     "loads": body.count("tl.load("), "divisions": len(re.findall(r"\(tmp\d+ / tmp\d+\)", body)),
                     "sqrt": body.count("sqrt"), "externs": 0})
    for call in sorted(set(re.findall(r"extern_kernels\.(\w+)|aten\.(\w+)\.default\(", code))):
        rows.append({"kernel": "".join(call), "x": 0, "r": 0, "persistent_r_block": None, "loads": 0,
                     "divisions": 0, "sqrt": 0, "externs": code.count("".join(call) + "(")})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="cluster")
    parser.add_argument("--features", default="rgb")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--out", default=None, help="write the generated module here")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        parser.error("a GPU is present: measure with bench/masking.py --kernels, or read TORCH_LOGS=output_code")
    pretend_cuda_device()
    # on an sm80+ GPU the library writes k-means' features with a Triton kernel of its own, which needs the driver
    # to trace: inductor's code for them, as on the CPU and older GPUs, is what this shows
    features_kernel.USE_ON_GPU = False
    cfg = MaskingConfig(strategy=args.strategy, features=args.features, ratio=args.ratio)
    masking.validate(cfg)
    code = generated_code(cfg, args.batch, args.image_size, args.patch, args.width)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(code)
    print(f"# Triton kernels of the compiled masking op ({args.strategy}, {args.features}, ratio {args.ratio}), "
          f"batch {args.batch}, {args.image_size} px, patch {args.patch}, width {args.width}; "
          f"torch {torch.__version__}")
    print("| kernel | x | r | persistent r block | loads | divisions | sqrt | library calls |")
    print("|---|---|---|---|---|---|---|---|")
    for row in kernel_summary(code):
        print(f"| {row['kernel'][:90]} | {row['x']} | {row['r']} | {row['persistent_r_block'] or '-'} | "
              f"{row['loads']} | {row['divisions']} | {row['sqrt']} | {row['externs'] or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
