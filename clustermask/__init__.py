"""clustermask: CLIP pretraining whose image tower drops clusters of similar patches.

The library: every stage is a function of the sub-config it needs (no Hydra, no SLURM here).
"""
from .data import DataConfig, training_stream
from .evaluate import EVALUATORS, EvalConfig, EvalTask, evaluate_checkpoint, register_evaluator
from .masking import STRATEGIES, MaskingConfig, TokenMasker, calibrate_threshold, install_masking, register_strategy
from .model import ModelConfig, create as create_model, load_for_eval
from .synthetic import SyntheticConfig, generate as generate_synthetic
from .tracking import TrackingConfig
from .train import TrainConfig, Trainer
from .visualize import save_mask_grid

__all__ = [
    "DataConfig", "training_stream", "EVALUATORS", "EvalConfig", "EvalTask", "evaluate_checkpoint",
    "register_evaluator", "STRATEGIES", "MaskingConfig", "TokenMasker", "calibrate_threshold", "install_masking",
    "register_strategy", "ModelConfig", "create_model", "load_for_eval", "SyntheticConfig", "generate_synthetic",
    "TrackingConfig", "TrainConfig", "Trainer", "save_mask_grid",
]
