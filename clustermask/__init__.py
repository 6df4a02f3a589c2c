"""clustermask: CLIP pretraining whose image tower drops clusters of similar patches.

The library: every stage is a function of the sub-config it needs (no Hydra, no SLURM here).
Names are imported on first use, so `clustermask.config` (the typed configs) loads without torch.
"""
from importlib import import_module

_PUBLIC = {
    "config": ("DataConfig", "EvalConfig", "EvalTask", "MaskingConfig", "ModelConfig", "TrackingConfig",
               "TrainConfig"),
    "data": ("training_stream",),
    "evaluate": ("EVALUATORS", "evaluate_checkpoint", "register_evaluator"),
    "masking": ("STRATEGIES", "TokenMasker", "calibrate_threshold", "install_masking", "register_strategy"),
    "model": ("create_model", "load_for_eval"),
    "plugins": ("load_plugins",),
    "synthetic": ("SyntheticConfig", "generate_synthetic"),
    "train": ("Trainer",),
    "visualize": ("save_mask_grid",),
}
_RENAMED = {"create_model": "create", "generate_synthetic": "generate"}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'clustermask' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), _RENAMED.get(name, name))


def __dir__():
    return sorted(set(globals()) | set(__all__))
