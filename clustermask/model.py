"""open_clip models: the project's tiny configs registered next to open_clip's own, masking installed."""
from __future__ import annotations

import sys
from typing import Optional

import open_clip

from .config import MODEL_CONFIG_DIR, MaskingConfig, ModelConfig, validate_model as validate
from .masking import TokenMasker, install_masking

_registered = False


def register_model_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def compiles_masking_alone(cfg: ModelConfig, device: str) -> bool:
    """Whether the masking op is compiled on its own: not when the whole model is (it is then in the model's
    graph); by default, when the model runs eagerly on a GPU, where each of the eager op's elementwise steps
    would be a pass of its own over the pixels (on an H200 the clustering ops took 0.6-1.7 ms a step eager,
    0.24-0.53 ms compiled: bench/README.md)."""
    if cfg.compile:
        return False
    return str(device).startswith("cuda") if cfg.compile_masking is None else cfg.compile_masking


def create(cfg: ModelConfig, masking: Optional[MaskingConfig] = None, total_steps: int = 1,
           device: str = "cpu", pretrained: Optional[str] = None):
    """Returns (model, train_transform, eval_transform, tokenizer, masker-or-None). No downloads."""
    validate(cfg)
    register_model_configs()
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(
        cfg.name, pretrained=pretrained, device=device, precision="bf16" if cfg.precision == "bf16" else "fp32",
        weights_only=True)
    masker = install_masking(model, masking, total_steps) if masking is not None else None
    if masker is not None and compiles_masking_alone(cfg, device):
        masker.compile_op()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, train_tf, eval_tf, open_clip.get_tokenizer(cfg.name), masker


def load_for_eval(name: str, checkpoint: str, device: str = "cpu"):
    """An open_clip model from a checkpoint of ours, exactly as `clip_benchmark eval` would load it."""
    register_model_configs()
    model, _, eval_tf = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device,
                                                              weights_only=True)
    model.eval()
    return model, eval_tf, open_clip.get_tokenizer(name)


def clip_benchmark_main() -> None:
    """`clustermask-clip-benchmark`: clip_benchmark's own command line (eval, build) with this package's model
    configs known to open_clip, so that `eval --model ViT-Tiny-8-64 --pretrained final.pt` loads our checkpoints
    as it loads a built-in model's."""
    from clip_benchmark.cli import main

    register_model_configs()
    sys.exit(main())


__all__ = ["ModelConfig", "create", "load_for_eval", "register_model_configs", "TokenMasker"]
