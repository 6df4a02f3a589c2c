"""Pictures of what the image tower sees: dropped patches greyed, hidden ones darker, clusters coloured."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .config import MaskingConfig, settings_in_effect  # noqa: E402
from .masking import STRATEGY_SETTINGS, run_tower, vision_tower  # noqa: E402

MEAN = np.array((0.48145466, 0.4578275, 0.40821073))  # open_clip OPENAI_DATASET_MEAN
STD = np.array((0.26862954, 0.26130258, 0.27577711))


def mask_decisions(model, images: torch.Tensor):
    """Run the masker once in training mode: (dropped (B, L) bool, hidden (B, L) bool or None: kept but hidden
    from attention, cluster_id (B, L) long or None)."""
    result = run_tower(model, images, training=True).last
    cluster_id = result.scores.cluster_id
    hidden = None
    if result.hidden is not None:
        hidden = torch.zeros_like(result.dropped).scatter_(1, result.keep, result.hidden).cpu()
    return result.dropped.cpu(), hidden, None if cluster_id is None else cluster_id.cpu()


def overlay(image: np.ndarray, dropped: np.ndarray, cluster_id, patch: int, hidden=None) -> np.ndarray:
    """image (H, W, 3) in [0, 1]; dropped/hidden/cluster_id (L,) in row-major patch order. Clusters tinted,
    dropped patches light grey, hidden ones dark grey."""
    out = image.copy()
    grid = image.shape[1] // patch
    palette = plt.get_cmap("tab10")
    for index in range(dropped.shape[0]):
        r, c = divmod(index, grid)
        tile = out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        if cluster_id is not None and cluster_id[index] >= 0:
            colour = np.array(palette(int(cluster_id[index]) % 10)[:3])
            tile[:] = 0.55 * tile + 0.45 * colour
        if dropped[index]:
            tile[:] = 0.25 * tile + 0.75 * 0.5
        elif hidden is not None and hidden[index]:
            tile[:] = 0.25 * tile + 0.75 * 0.15
    return out


# the settings a title names where its strategy reads them and they are not at their default
TITLED_SETTINGS = ("anchor_fraction", "threshold", "target_coverage", "kmeans_k", "kmeans_iters")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def title(cfg: MaskingConfig) -> str:
    """What the picture shows, on two lines: `cluster (mixed features, threshold=0.3, attention), ratio 0.5`, then
    the key. The settings the strategy reads, besides its ratio, are named where they are not at their default (its
    features always), and so are its own options: the masks.png of two points of a sweep tell them apart."""
    used = settings_in_effect(cfg, STRATEGY_SETTINGS.get(cfg.strategy, ()))
    defaults = MaskingConfig()
    details = [f"{cfg.features} features"] if "features" in used else []
    details += [f"{key}={_shown(getattr(cfg, key))}" for key in TITLED_SETTINGS
                if key in used and getattr(cfg, key) != getattr(defaults, key)]
    details += [f"{key}={_shown(value)}" for key, value in cfg.options.items()] if "options" in used else []
    details += ["attention"] if cfg.attention and "attention" in used else []
    name = f"{cfg.strategy} ({', '.join(details)})" if details else cfg.strategy
    legend = "grey = dropped" + (", dark = hidden from attention" if "attention" in details else "")
    return f"{name}, ratio {cfg.ratio:g}\n{legend}, tint = cluster"


def save_mask_grid(model, images: torch.Tensor, path: Path, columns: int = 4) -> Path:
    """Top row of each pair: the image; bottom: dropped patches greyed (hidden ones darker), clusters tinted.
    Writes a PNG."""
    dropped, hidden, cluster_id = mask_decisions(model, images)
    patch = vision_tower(model).patch_dropout.patch_size
    pixels = images.float().cpu().permute(0, 2, 3, 1).numpy() * STD + MEAN
    pixels = np.clip(pixels, 0, 1)
    n = images.shape[0]
    rows = 2 * -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // columns), i % columns
        axes[r][c].imshow(pixels[i])
        ids = None if cluster_id is None else cluster_id[i].numpy()
        hides = None if hidden is None else hidden[i].numpy()
        axes[r + 1][c].imshow(overlay(pixels[i], dropped[i].numpy(), ids, patch, hides))
    fig.suptitle(title(vision_tower(model).patch_dropout.cfg))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
