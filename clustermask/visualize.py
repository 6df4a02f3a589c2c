"""Pictures of what the image tower sees: dropped patches greyed, clusters coloured."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .masking import run_tower, vision_tower  # noqa: E402

MEAN = np.array((0.48145466, 0.4578275, 0.40821073))  # open_clip OPENAI_DATASET_MEAN
STD = np.array((0.26862954, 0.26130258, 0.27577711))


def mask_decisions(model, images: torch.Tensor):
    """Run the masker once in training mode: (dropped (B, L) bool, cluster_id (B, L) long or None)."""
    result = run_tower(model, images, training=True).last
    cluster_id = result.scores.cluster_id
    return result.dropped.cpu(), None if cluster_id is None else cluster_id.cpu()


def overlay(image: np.ndarray, dropped: np.ndarray, cluster_id, patch: int) -> np.ndarray:
    """image (H, W, 3) in [0, 1]; dropped/cluster_id (L,) in row-major patch order."""
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
    return out


def save_mask_grid(model, images: torch.Tensor, path: Path, columns: int = 4) -> Path:
    """Top row of each pair: the image; bottom: dropped patches greyed, clusters tinted. Writes a PNG."""
    dropped, cluster_id = mask_decisions(model, images)
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
        axes[r + 1][c].imshow(overlay(pixels[i], dropped[i].numpy(), ids, patch))
    fig.suptitle(f"{vision_tower(model).patch_dropout.cfg.strategy}: grey = dropped, tint = cluster")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
