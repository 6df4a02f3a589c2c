"""open_clip models: the project's tiny configs registered next to open_clip's own, masking installed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip

from .masking import MaskingConfig, TokenMasker, install_masking

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


@dataclass
class ModelConfig:
    name: str = "ViT-Tiny-8-64"  # any open_clip model name, e.g. ViT-B-16
    precision: str = "fp32"  # fp32 | amp_bf16 (autocast) | bf16 (pure)
    compile: bool = False
    grad_checkpointing: bool = False


def register_model_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def validate(cfg: ModelConfig) -> None:
    register_model_configs()
    if cfg.name not in open_clip.list_models():
        raise ValueError(f"model.name={cfg.name!r} is not an open_clip model; e.g. {open_clip.list_models()[-5:]}")
    if cfg.precision not in ("fp32", "amp_bf16", "bf16"):
        raise ValueError(f"model.precision={cfg.precision!r} is not one of fp32, amp_bf16, bf16")


def create(cfg: ModelConfig, masking: Optional[MaskingConfig] = None, total_steps: int = 1,
           device: str = "cpu", pretrained: Optional[str] = None):
    """Returns (model, train_transform, eval_transform, tokenizer, masker-or-None). No downloads."""
    validate(cfg)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(
        cfg.name, pretrained=pretrained, device=device, precision="bf16" if cfg.precision == "bf16" else "fp32",
        weights_only=True)
    masker = install_masking(model, masking, total_steps) if masking is not None else None
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


__all__ = ["ModelConfig", "create", "load_for_eval", "register_model_configs", "TokenMasker"]
