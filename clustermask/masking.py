"""Which patch tokens the image tower sees during training.

Every strategy is a function registered by name that scores each patch token; the tokens with the highest
scores are dropped. Scores are ``priority + uniform noise`` so that tokens of equal priority are dropped in
random order, with no bias towards low or high indices. Every image keeps exactly
``L - round(ratio * L)`` patch tokens (plus CLS), so shapes are static and nothing here synchronises with
the host: the masking path can be compiled with ``torch.compile(fullgraph=True)``.

The masking module replaces open_clip's ``patch_dropout`` slot of a ``VisionTransformer`` (it sees the tokens
after the positional embedding and before ``ln_pre``); hooks on the tower hand it the pixels for the call and,
in ``attention`` mode, give the transformer a per-image key-padding mask (so in training mode it runs only within
a call of the tower). The model's ``state_dict`` is unchanged, so checkpoints stay in open_clip's format.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import assignment_kernel, features_kernel, gram_kernel
from .config import MaskingConfig, calibrated, check_patch_count, hides_tokens, pooling_beyond_cls, validate_masking
from .plugins import check_name_free


class MaskingInputs(NamedTuple):
    tokens: torch.Tensor  # (B, L, D) patch embeddings after the positional embedding, CLS excluded
    pixels: Optional[torch.Tensor]  # (B, 3, H, W) the images the tokens came from
    patch_size: int
    threshold: torch.Tensor  # 0-dim, on the tokens' device
    progress: torch.Tensor  # 0-dim in [0, 1]: fraction of training done (for `mixed`)


class MaskScores(NamedTuple):
    score: torch.Tensor  # (B, L) higher is dropped first
    clustered: Optional[torch.Tensor]  # (B, L) bool: token belongs to a cluster
    cluster_id: Optional[torch.Tensor]  # (B, L) long, -1 for none (for pictures)


Strategy = Callable[[MaskingInputs, MaskingConfig], MaskScores]
STRATEGIES: Dict[str, Strategy] = {}
PIXEL_STRATEGIES: set = set()
# strategy -> the MaskingConfig keys it reads besides `strategy`: the launcher records the others at a fixed
# value and submits once the points of a sweep that differ only in them (config.canonical_masking)
STRATEGY_SETTINGS: Dict[str, Tuple[str, ...]] = {}
# strategy -> the `masking.options` keys it reads, where it says (a sweep giving another is refused)
STRATEGY_OPTIONS: Dict[str, Optional[Tuple[str, ...]]] = {}
CLUSTER_SETTINGS = ("ratio", "features", "anchor_fraction", "threshold", "target_coverage", "calibration_batches",
                    "attention")


# what a strategy declaring `target_coverage` reads: training calibrates the threshold of its anchors' clusters
# (`nearest_anchors`) to that coverage, as for `cluster`
CALIBRATED_SETTINGS = ("features", "anchor_fraction", "threshold", "calibration_batches")


def register_strategy(name: str, needs_pixels: bool = False, settings: Tuple[str, ...] = ("ratio",),
                      options: Optional[Tuple[str, ...]] = None):
    """settings: the MaskingConfig keys the strategy's masks depend on (tests/test_masking.py checks that no
    other key changes them). Without `ratio` the strategy drops nothing, as `none`. With `target_coverage` it
    clusters with `cluster_membership` (or `nearest_anchors`), whose threshold training calibrates to that
    coverage, and so it must declare the keys those read as well (CALIBRATED_SETTINGS). options: the keys of
    `masking.options` it reads, with `options` among its settings (None: it does not say)."""
    check_name_free(STRATEGIES, name, "masking strategy")
    unknown = set(settings) - {f.name for f in fields(MaskingConfig)}
    if unknown:
        raise ValueError(f"strategy {name!r}: {sorted(unknown)} are not MaskingConfig keys")
    if options is not None and "options" not in settings:
        raise ValueError(f"strategy {name!r} names its options {tuple(options)}: it must declare 'options' among its "
                         "settings too (its masks depend on them)")
    missing = [key for key in CALIBRATED_SETTINGS if key not in settings]
    if "target_coverage" in settings and missing:
        raise ValueError(f"strategy {name!r} declares target_coverage, so its threshold is calibrated to it: it "
                         f"must declare {missing} too (the anchors' clusters read them)")

    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        STRATEGY_SETTINGS[name] = tuple(settings)
        STRATEGY_OPTIONS[name] = None if options is None else tuple(options)
        if needs_pixels:
            PIXEL_STRATEGIES.add(name)
        return fn

    return wrap


def calibrates_threshold(cfg: MaskingConfig) -> bool:
    """Whether training calibrates `cfg`'s threshold to its target coverage before the first step."""
    return calibrated(cfg, STRATEGY_SETTINGS.get(cfg.strategy, ()))


def validate(cfg: MaskingConfig) -> None:
    """Raise ValueError naming the bad key and value."""
    validate_masking(cfg, STRATEGIES, STRATEGY_OPTIONS.get(cfg.strategy))


def num_dropped(num_patches: int, ratio: float) -> int:
    return int(round(ratio * num_patches))


# ---------------------------------------------------------------- features


def patch_groups(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, L, p * p): each channel's pixels of each patch, patches in the row-major order of
    open_clip's conv1 tokens."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    x = pixels[:, :, : gh * patch_size, : gw * patch_size]
    x = x.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(b, c, gh * gw, patch_size * patch_size)


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C * p * p)."""
    return patch_groups(pixels, patch_size).transpose(1, 2).flatten(2)


def materialised(small: torch.Tensor) -> torch.Tensor:
    """`small` itself; compiled, a buffer of its own. Inductor otherwise inlines a small tensor's pointwise
    ops into every element of the large kernel that reads it: the square root and division of each channel's
    1 / (std + eps) were computed for every pixel that the standardisation wrote (as_strided's lowering realises
    its input, and the ops then join the statistics' reduction kernel)."""
    return small.as_strided(small.shape, small.stride())


def channel_statistics(pixels: torch.Tensor):
    """(pixels in fp32, mean, inverse scale), the mean and 1 / (std + eps) of each image's channels, (B, C, 1, 1):
    what the rgb features are standardised with (`rgb_similarity` derives the same from its own sums).

    Standardising per patch (as MAE's normalised-pixel target does) would send every flat patch to the zero
    vector, so a red and a blue flat region would be indistinguishable; per-image statistics keep colour."""
    x = pixels.float()
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    return x, mean, materialised((std + 1e-6).reciprocal())


def standardised_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, C * p * p) patch pixel vectors, standardised per channel with the image's own mean and std."""
    x, mean, inverse_scale = channel_statistics(pixels)
    return patchify((x - mean) * inverse_scale, patch_size)


def _random_indices(batch: int, length: int, count: int, device) -> torch.Tensor:
    # the same indices as topk(count); compiled for a GPU, inductor sorts them in a kernel fused with the draw,
    # whereas topk would be a call into ATen
    return torch.rand(batch, length, device=device).argsort(dim=1, descending=True)[:, :count]


# the default 3% anchors up to ~1,000 patches (6 for ViT-B-16, 17 for ViT-L-14 at 336 px); each vector
# more lengthens the unrolled graph and the fused kernel
UNROLLED_DOTS_MAX = 32


def batched_dots(features: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(..., L, K) . (..., A, K) -> (..., L, A): every patch's dot product with each of its image's A vectors.

    Compiled, and for few vectors, as A multiply-sum reductions rather than a matmul: inductor fuses them with
    the producer of `features` (the centring and patchify of the pixels) and with the norms into one pass, so
    the (B, L, K) features are never written to memory; a matmul needs them there. Eager, the matmul."""
    if torch.compiler.is_compiling() and vectors.shape[-2] <= UNROLLED_DOTS_MAX:
        return torch.stack([(features * vectors[..., i : i + 1, :]).sum(-1) for i in range(vectors.shape[-2])], -1)
    return torch.matmul(features, vectors.transpose(-1, -2))


BMM_HAS_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def bf16_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bmm of bf16 operands with an fp32 result."""
    if a.is_cuda and BMM_HAS_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=torch.float32)
    # no bf16 -> fp32 bmm (CPU, torch < 2.8): bf16 values are exact in fp32 and in tf32, and so their products
    return torch.bmm(a.float(), b.float())


# cuBLAS on an H200 runs the op's batched GEMMs in its sm90 kernels when both operands' rows (patches, anchors)
# come in multiples of 8, else in sm80 ones at up to half the speed (bench/results/gram_h200_run8.md: k-means'
# Gram of ViT-B-16's 196 patches 0.118 ms, padded to 200 0.058 ms; the 6 anchors' dot products 0.061 ms, padded to
# 8 0.043 ms)
GEMM_ROW_MULTIPLE = 8


def pad_rows(x: torch.Tensor, multiple: int = GEMM_ROW_MULTIPLE) -> torch.Tensor:
    """(B, N, D) -> (B, N', D): zero rows appended up to a multiple of `multiple` (compiled, written by the kernel
    that produces x)."""
    return F.pad(x, (0, 0, 0, -x.shape[1] % multiple))


def norms_from_squares(squares: torch.Tensor) -> torch.Tensor:
    """Norms from sums of squares (or from dot products that rounding may leave just under 0), at least 1e-6 as
    in F.normalize: a zero vector then has cosine 0 with everything."""
    return squares.clamp_min(0).sqrt().clamp_min(1e-6)


def cosines(dots: torch.Tensor, squares: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, L, A) cosines from every patch's dot products with its image's anchors (B, L, A) and every patch's
    squared norm (B, L): the dot products are divided by the norms rather than the features normalised first,
    one pass less over the features."""
    norms = norms_from_squares(squares)
    return dots / (norms[..., None] * norms.gather(1, anchors)[:, None, :])


def anchor_similarity(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B, L, A) of every patch's features (B, L, D) to each image's anchor patches."""
    anchor_feats = features.gather(1, anchors[..., None].expand(-1, -1, features.shape[-1]))
    return cosines(batched_dots(features, anchor_feats), features.pow(2).sum(-1), anchors)


def rgb_similarity(pixels: torch.Tensor, patch_size: int, anchors: torch.Tensor) -> torch.Tensor:
    """`anchor_similarity` of `standardised_patches` (up to rounding), from one pass over the pixels.

    For each channel of each patch, the pass sums its pixels' products with each anchor patch's, its pixels and
    their squares; the image's channel statistics, the centring and the channels' 1 / std^2 weights are then
    applied to those (B, C, L) sums rather than to every pixel. Compiled, the pass is one kernel, each channel's
    p * p pixels summed on their own (on a GPU, 256 lanes for ViT-B-16 rather than 768 padded to 1024), and
    the statistics need no pass over the pixels of their own. The pixels are shifted by the mean of the
    anchors' pixels, near the image's mean, so that the centring cancels little (an fp32 sum of squares far
    from the mean would lose the variance of a low-contrast image). The statistics are those of the pixels
    that the patches cover (as conv1, they leave out a margin that is not a whole patch)."""
    groups = patch_groups(pixels.float(), patch_size)  # (B, C, L, P)
    channels, pixels_per_patch = groups.shape[1], groups.shape[3]
    anchor_pixels = groups.gather(2, anchors[:, None, :, None].expand(-1, channels, -1, pixels_per_patch))
    shift = anchor_pixels.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    shifted = groups - shift
    dots = batched_dots(shifted, anchor_pixels - shift)  # (B, C, L, A)
    sums, squares = shifted.sum(-1), shifted.pow(2).sum(-1)  # (B, C, L)
    count = sums.shape[-1] * pixels_per_patch
    mean = sums.sum(-1, keepdim=True) / count  # (B, C, 1): the image's, less the shift
    variance = (squares.sum(-1, keepdim=True) - count * mean.square()) / (count - 1)  # unbiased, as torch.std
    weights = (variance.clamp_min(0).sqrt() + 1e-6).pow(-2)  # as channel_statistics' std + 1e-6
    # over a patch's pixels, sum (u - mean)(v - mean) = sum u v - mean (sum u + sum v) + P mean^2
    centred_squares = squares - 2 * mean * sums + pixels_per_patch * mean.square()
    anchor_sums = sums.gather(2, anchors[:, None, :].expand(-1, channels, -1))  # (B, C, A)
    centred_dots = (dots - mean[..., None] * (sums[..., None] + anchor_sums[:, :, None, :])
                    + pixels_per_patch * mean[..., None].square())
    return cosines((centred_dots * weights[..., None]).sum(1), (centred_squares * weights).sum(1), anchors)


def num_anchors(num_patches: int, fraction: float) -> int:
    return max(1, int(round(fraction * num_patches)))


def embedding_similarity(tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """`anchor_similarity` of the patch tokens (conv1's output), in fp32.

    bf16 tokens (a bf16 autocast step) take their dot products with the anchors from one bf16 GEMM with fp32
    sums, the anchors padded to a multiple of GEMM_ROW_MULTIPLE: bf16 products are exact in fp32, so only the
    order of the sums differs from fp32 features. Compiled on an H200 the fused fp32 sums took 0.187 ms, as they
    read each image's anchors again for every patch; the GEMM and the squared norms' reduction 0.055 ms
    (bench/results/masking_op_h200_run8.md)."""
    if tokens.dtype != torch.bfloat16:
        return anchor_similarity(tokens.float(), anchors)
    count = anchors.shape[1]
    anchor_tokens = tokens.gather(1, anchors[..., None].expand(-1, -1, tokens.shape[-1]))
    dots = bf16_bmm(tokens, pad_rows(anchor_tokens).transpose(1, 2))[..., :count]
    return cosines(dots, tokens.float().pow(2).sum(-1), anchors)


def cluster_similarity(inputs: MaskingInputs, cfg: MaskingConfig, anchors: torch.Tensor) -> torch.Tensor:
    if cfg.features == "embedding":
        return embedding_similarity(inputs.tokens, anchors)
    rgb = rgb_similarity(inputs.pixels, inputs.patch_size, anchors)
    if cfg.features == "rgb":
        return rgb
    emb = embedding_similarity(inputs.tokens, anchors)
    weight = inputs.progress.clamp(0.0, 1.0)
    return torch.lerp(rgb, emb, weight)


def nearest_anchors(inputs: MaskingInputs, cfg: MaskingConfig):
    """Anchors drawn now; each patch's similarity to its most similar anchor (B, L), that anchor (B, L) and
    whether the patch is an anchor (B, L) bool. Everything about the clusters but the threshold."""
    b, length, _ = inputs.tokens.shape
    anchors = _random_indices(b, length, num_anchors(length, cfg.anchor_fraction), inputs.tokens.device)
    sim = cluster_similarity(inputs, cfg, anchors)
    is_anchor = torch.zeros(b, length, dtype=torch.bool, device=sim.device).scatter_(1, anchors, True)
    best_sim, best_anchor = sim.max(dim=-1)
    return best_sim, best_anchor, is_anchor


def cluster_membership(inputs: MaskingInputs, cfg: MaskingConfig):
    """Anchor-based clusters: (clustered (B, L) bool, cluster_id (B, L) long with -1 for none)."""
    best_sim, best_anchor, is_anchor = nearest_anchors(inputs, cfg)
    clustered = (best_sim > inputs.threshold) | is_anchor
    cluster_id = torch.where(clustered, best_anchor, torch.full_like(best_anchor, -1))
    return clustered, cluster_id


# ---------------------------------------------------------------- strategies


@register_strategy("none", settings=())
def score_none(inputs: MaskingInputs, cfg: MaskingConfig) -> MaskScores:
    b, length, _ = inputs.tokens.shape
    return MaskScores(torch.zeros(b, length, device=inputs.tokens.device), None, None)


@register_strategy("random")
def score_random(inputs: MaskingInputs, cfg: MaskingConfig) -> MaskScores:
    b, length, _ = inputs.tokens.shape
    return MaskScores(torch.rand(b, length, device=inputs.tokens.device), None, None)


@register_strategy("cluster", needs_pixels=True, settings=CLUSTER_SETTINGS)
def score_cluster(inputs: MaskingInputs, cfg: MaskingConfig) -> MaskScores:
    clustered, cluster_id = cluster_membership(inputs, cfg)
    noise = torch.rand(clustered.shape, device=clustered.device)
    return MaskScores(clustered.float() + noise, clustered, cluster_id)


def _one_hot(index: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    # a comparison rather than F.one_hot, which may check its input on the host
    return (index[..., None] == torch.arange(k, device=index.device)).to(dtype)


def kmeans_features(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, C * p * p) bf16: `standardised_patches` rounded to bf16, what k-means clusters.

    Rounding moves a value by at most 2^-8 of it. A standardised value is (x - mean) / std, and an 8-bit level
    is 1 / (255 std) in those units, so for a pixel x within half the range of its channel's mean (nearly all
    of them) the rounding is under half a level, and under one level for any pixel: k-means loses nothing the
    image held. The Gram of bf16 features is then one bf16 GEMM with exact products and fp32 sums, on tensor
    cores: on an H200 in half the time of the two GEMMs that the fp32 features' Gram needed for fp32 precision
    (bench/README.md)."""
    return standardised_patches(pixels, patch_size).to(torch.bfloat16)


def kmeans_assignment(dots: torch.Tensor, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """Spherical k-means from the patches' dot products (B, L, L) -> (B, L) cluster index, from the centres
    `initial` (B, k) patch indices.

    A centre is the normalised sum of its members' unit features u_q = f_q / |f_q|, so a patch's dot product
    with it is sum_q <f_p, f_q> / |f_q| over the members, divided by the norm of the sum, whose square is
    sum_q <u_q, sum> over the members. The nearest centre by that dot product is the nearest by cosine (they
    differ by |f_p|). The iterations read the (B, L, L) dot products (39 MB for ViT-B-16 at batch 256), never the
    (B, L, D) features (154 MB in fp32), which Lloyd's form reads twice per iteration, and the dot products
    are never normalised in a pass of their own. On a GPU where `assignment_kernel.enabled`, the steps between the
    iterations' GEMMs run in its Triton kernels."""
    if assignment_kernel.enabled(dots):
        return assignment_kernel.kmeans_assignment(dots, initial, iters)
    length, k = dots.shape[1], initial.shape[1]
    inverse_norms = norms_from_squares(dots.diagonal(dim1=1, dim2=2)).reciprocal()  # (B, L)
    to_initial = dots.gather(2, initial[:, None, :].expand(-1, length, -1))  # (B, L, k)
    similarity = to_initial * inverse_norms.gather(1, initial)[:, None, :]
    for _ in range(iters):
        members = _one_hot(similarity.argmax(-1), k, dots.dtype)  # (B, L, k)
        unit_members = members * inverse_norms[:, :, None]
        # a bmm even compiled: over the (B, L, L) matrix batched_dots' fused sums took 3x as long on an H200, and a
        # Triton kernel of 64 rows per program 1.25x (bench/README.md, run 13)
        to_sums = torch.bmm(dots, unit_members)  # (B, L, k)
        norms = norms_from_squares((unit_members * to_sums).sum(1))  # (B, k)
        # an empty cluster keeps its centre
        similarity = torch.where(members.sum(1, keepdim=True) > 0, to_sums / norms[:, None, :], similarity)
    return similarity.argmax(-1)


def gram(feats: torch.Tensor) -> torch.Tensor:
    """(B, L, D) bf16 -> (B, L, L) fp32 dot products of each image's patches with each other, from one GEMM over
    the patches padded with zero rows to a multiple of GEMM_ROW_MULTIPLE (compiled, the features' kernel writes
    the padding): the padded Gram's top-left block is the Gram, bit for bit."""
    return padded_gram(pad_rows(feats), feats.shape[1])


def padded_gram(padded: torch.Tensor, length: int) -> torch.Tensor:
    """`gram` of the first `length` rows of bf16 features padded with rows of any value (B, L', D): the top-left
    block of their Gram reads only the first `length`."""
    return bf16_bmm(padded, padded.transpose(1, 2))[:, :length, :length]


def kmeans_gram(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L, L) fp32 dot products of each image's `kmeans_features` with each other: on a GPU where
    `gram_kernel.enabled`, from one Triton kernel that reads the pixels; where `features_kernel.enabled`, from
    the features of its Triton kernel; else `gram` of the features."""
    if gram_kernel.enabled(pixels):
        _, mean, inverse_scale = channel_statistics(pixels)
        return gram_kernel.standardised_patch_gram(pixels, mean, inverse_scale, patch_size)
    if features_kernel.enabled(pixels):
        if features_kernel.FUSED_STATISTICS:
            padded = features_kernel.standardised_features(pixels, patch_size, GEMM_ROW_MULTIPLE)
        else:
            _, mean, inverse_scale = channel_statistics(pixels)
            padded = features_kernel.padded_features(pixels, mean, inverse_scale, patch_size, GEMM_ROW_MULTIPLE)
        return padded_gram(padded, (pixels.shape[-2] // patch_size) * (pixels.shape[-1] // patch_size))
    return gram(kmeans_features(pixels, patch_size))


def kmeans_clusters(pixels: torch.Tensor, patch_size: int, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """(B, L) k-means cluster index of each patch's `kmeans_features`."""
    return kmeans_assignment(kmeans_gram(pixels, patch_size), initial, iters)


@register_strategy("kmeans", needs_pixels=True, settings=("ratio", "kmeans_k", "kmeans_iters"))
def score_kmeans(inputs: MaskingInputs, cfg: MaskingConfig) -> MaskScores:
    """A few spherical k-means iterations on rgb features; whole clusters are dropped in random order."""
    b, length, _ = inputs.tokens.shape
    device = inputs.tokens.device
    k = min(cfg.kmeans_k, length)
    initial = _random_indices(b, length, k, device)
    assignment = kmeans_clusters(inputs.pixels, inputs.patch_size, initial, cfg.kmeans_iters)
    cluster_rank = torch.rand(b, k, device=device).argsort(dim=1).argsort(dim=1).float()
    score = cluster_rank.gather(1, assignment) + torch.rand(b, length, device=device)
    return MaskScores(score, None, assignment)


# ---------------------------------------------------------------- the op


class MaskResult(NamedTuple):
    keep: torch.Tensor  # (B, L - n_drop) indices of kept patch tokens
    dropped: torch.Tensor  # (B, L) bool
    hidden: Optional[torch.Tensor]  # (B, L - n_drop) bool: kept but hidden from attention
    scores: MaskScores


def full_precision(device: torch.device):
    """Autocast off: a step's bf16 autocast would run the similarity's and k-means' bmm in bf16 (cosines off
    by ~3e-3, so patches near the threshold change cluster)."""
    return torch.autocast(device.type, enabled=False)


def select_tokens(inputs: MaskingInputs, cfg: MaskingConfig) -> MaskResult:
    """Decide which patch tokens to keep. Pure function of the inputs and the random generator."""
    length = inputs.tokens.shape[1]
    n_drop = num_dropped(length, cfg.ratio)
    with full_precision(inputs.tokens.device):
        scores = STRATEGIES[cfg.strategy](inputs, cfg)
    order = scores.score.argsort(dim=1, descending=True)
    keep = order[:, n_drop:]
    dropped = torch.ones_like(scores.score, dtype=torch.bool).scatter_(1, keep, False)
    hidden = None
    if cfg.attention and scores.clustered is not None:
        hidden = scores.clustered.gather(1, keep)
    return MaskResult(keep, dropped, hidden, scores)


def key_padding_attn_mask(hidden: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B * heads, T, T), batch-major as nn.MultiheadAttention expects; CLS is never hidden."""
    b, n = hidden.shape
    with_cls = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=hidden.device), hidden], dim=1)
    additive = torch.zeros(b, 1, 1, n + 1, dtype=dtype, device=hidden.device)
    additive = additive.masked_fill(with_cls[:, None, None, :], float("-inf"))
    return additive.expand(b, num_heads, n + 1, n + 1).reshape(b * num_heads, n + 1, n + 1)


def mask_stats(result: MaskResult, threshold: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Device tensors only (no sync); read them at logging time. The coverage std is over the batch's images
    (population std, so that a batch of one image logs 0 rather than NaN)."""
    dropped = result.dropped.float().mean(1)
    if result.hidden is not None:
        dropped = dropped + result.hidden.float().sum(1) / result.dropped.shape[1]
    stats = {"mask/drop_ratio": dropped.mean()}
    clustered = result.scores.clustered
    if clustered is not None:
        coverage = clustered.float().mean(1)
        stats.update({"mask/coverage_mean": coverage.mean(), "mask/coverage_std": coverage.std(correction=0),
                      "mask/threshold": threshold.float()})
    return stats


# the calibrated threshold of `mixed` features at 0, 1/4, ... of training: between points it is interpolated, as
# the similarity is between rgb and embedding, and the coverage then stays on target all along (one threshold
# calibrated on rgb, as at step 0, was 0.05 under a target of 0.2 half-way on the synthetic data)
MIXED_THRESHOLD_POINTS = 5


def threshold_points(cfg: MaskingConfig) -> int:
    uses_features = "features" in STRATEGY_SETTINGS.get(cfg.strategy, ())
    return MIXED_THRESHOLD_POINTS if uses_features and cfg.features == "mixed" else 1


def schedule_progress(points: int):
    """The fractions of training done at `points` evenly spaced points of a threshold schedule."""
    return [i / (points - 1) for i in range(points)] if points > 1 else [0.0]


def scheduled_threshold(schedule: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
    """The threshold at `progress`, piecewise linear between the evenly spaced points of `schedule` (P,), as
    weights rather than an index into it (indexing with a tensor may read it on the host)."""
    if schedule.shape[0] == 1:
        return schedule[0]
    position = progress.clamp(0.0, 1.0) * (schedule.shape[0] - 1)
    points = torch.arange(schedule.shape[0], device=schedule.device, dtype=schedule.dtype)
    return ((1 - (position - points).abs()).clamp_min(0) * schedule).sum()


class TokenMasker(nn.Module):
    """Drop-in for open_clip's ``VisionTransformer.patch_dropout``; identity in evaluation mode."""

    def __init__(self, cfg: MaskingConfig, patch_size: int, num_heads: int, total_steps: int = 1):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.total_steps = max(1, total_steps)
        self.register_buffer("threshold_schedule", torch.full((threshold_points(cfg),), float(cfg.threshold)),
                             persistent=False)
        self.register_buffer("progress", torch.tensor(0.0), persistent=False)
        self.pixels: Optional[torch.Tensor] = None
        self.attn_mask: Optional[torch.Tensor] = None
        self.stats: Dict[str, torch.Tensor] = {}
        self.last: Optional[MaskResult] = None
        self.hooks: List = []  # the tower's hooks that feed this masker (install_masking)
        self.installed = False  # in a tower, whose hooks feed it (a bool: dynamo cannot read `hooks`' handles)
        self.in_tower = False  # within a call of that tower (its hooks set it)

    @property
    def active(self) -> bool:
        return self.training and self.cfg.strategy != "none"

    def set_step(self, step: int) -> None:
        self.progress.fill_(min(1.0, step / self.total_steps))  # in place: no recompilation

    @property
    def threshold(self) -> torch.Tensor:
        """The similarity threshold at the current step (0-dim, on device)."""
        return scheduled_threshold(self.threshold_schedule, self.progress)

    def set_threshold(self, values) -> None:
        """One threshold for all of training, or one per point of `threshold_schedule`."""
        values = torch.as_tensor(values, dtype=torch.float32, device=self.threshold_schedule.device)
        self.threshold_schedule.copy_(values.expand_as(self.threshold_schedule))  # in place: no recompilation

    def compile_op(self) -> None:
        """Compile the op on its own, for a model that runs eagerly; the hooks, the statistics and evaluation
        mode stay eager around it. One graph per batch shape (training, calibration, the picture) rather than
        dynamic shapes."""
        self.mask_tokens = torch.compile(self.mask_tokens, fullgraph=True, dynamic=False)

    @property
    def op_compiled(self) -> bool:
        return "mask_tokens" in self.__dict__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.attn_mask = None
        if not self.active:
            return x
        if self.installed and not self.in_tower:
            raise RuntimeError(
                f"masking.strategy={self.cfg.strategy!r}: the masker ran in training mode outside a call of the image "
                "tower it is installed in (open_clip's forward_intermediates?), so its hooks did not hand it the "
                "images nor the transformer its attention mask; call the tower itself, or put it in evaluation mode")
        out, self.last, self.attn_mask, self.stats = self.mask_tokens(x, self.pixels, self.threshold_schedule,
                                                                      self.progress)
        return out

    def mask_tokens(self, x: torch.Tensor, pixels: Optional[torch.Tensor], threshold_schedule: torch.Tensor,
                    progress: torch.Tensor):
        """(the kept tokens with CLS first, the MaskResult, the attention mask or None, the statistics)."""
        cls_token, tokens = x[:, :1], x[:, 1:]
        threshold = scheduled_threshold(threshold_schedule, progress)
        result = select_tokens(MaskingInputs(tokens, pixels, self.patch_size, threshold, progress), self.cfg)
        kept = tokens.gather(1, result.keep[..., None].expand(-1, -1, tokens.shape[-1]))
        attn_mask = None
        if result.hidden is not None:
            attn_mask = key_padding_attn_mask(result.hidden, self.num_heads, x.dtype)
        return torch.cat([cls_token, kept], dim=1), result, attn_mask, mask_stats(result, threshold)


def _enter_tower(masker: TokenMasker):
    def hook(module, args):
        masker.in_tower = True
        masker.pixels = args[0] if masker.active and masker.cfg.strategy in PIXEL_STRATEGIES else None

    return hook


def _leave_tower(masker: TokenMasker):
    """After the tower's call, failed or not: the images are not kept for a later call that would not go through
    the tower (they would be another batch's)."""
    def hook(module, args, output):
        masker.in_tower = False
        masker.pixels = None

    return hook


def _inject_attn_mask(masker: TokenMasker):
    def hook(module, args, kwargs):
        if masker.attn_mask is not None:
            kwargs["attn_mask"] = masker.attn_mask
        return args, kwargs

    return hook


def vision_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", model)
    for name in ("patch_dropout", "conv1", "transformer"):
        if not hasattr(visual, name):
            raise TypeError(f"{type(visual).__name__} is not an open_clip VisionTransformer (no `{name}`)")
    return visual


def check_attention_pooling(visual: nn.Module, cfg: MaskingConfig) -> None:
    """Attention mode hides tokens from the transformer's attention: only an output read off CLS alone is then
    that of the visible tokens (an average or an attentional pooler over every token would read hidden ones)."""
    if not hides_tokens(cfg, STRATEGY_SETTINGS.get(cfg.strategy, ())):
        return
    pooling = pooling_beyond_cls({"attentional_pool": getattr(visual, "attn_pool", None) is not None,
                                  "pool_type": getattr(visual, "pool_type", "tok")})
    if pooling is not None:
        raise ValueError(f"masking.attention=true: attention mode hides tokens from attention only, and this "
                         f"{type(visual).__name__}'s output reads them through {pooling}; use a tower that pools "
                         "its CLS token or masking.attention=false")


def install_masking(model: nn.Module, cfg: MaskingConfig, total_steps: int = 1) -> TokenMasker:
    """Install a TokenMasker into an open_clip CLIP model (or its VisionTransformer) in place."""
    visual = vision_tower(model)
    check_attention_pooling(visual, cfg)
    check_patch_count(cfg, STRATEGY_SETTINGS.get(cfg.strategy, ()), visual.grid_size[0] * visual.grid_size[1],
                      type(visual).__name__)
    patch = visual.conv1.kernel_size[0]
    heads = visual.transformer.resblocks[0].attn.num_heads
    masker = TokenMasker(cfg, patch, heads, total_steps).to(visual.conv1.weight.device)
    if isinstance(visual.patch_dropout, TokenMasker):
        # installed again (another strategy on the same model): the earlier masker's hooks would still hand the
        # transformer that masker's last attention mask
        for handle in visual.patch_dropout.hooks:
            handle.remove()
    visual.patch_dropout = masker
    masker.hooks = [visual.register_forward_pre_hook(_enter_tower(masker)),
                    visual.register_forward_hook(_leave_tower(masker), always_call=True),
                    visual.transformer.register_forward_pre_hook(_inject_attn_mask(masker), with_kwargs=True)]
    masker.installed = True
    return masker


# ---------------------------------------------------------------- calibration


@torch.no_grad()
def run_tower(model: nn.Module, images: torch.Tensor, training: bool) -> TokenMasker:
    """Run the image tower once on `images` in training or evaluation mode, then restore its mode."""
    visual = vision_tower(model)
    was_training = visual.training
    visual.train(training)
    try:
        visual(images)
    finally:
        visual.train(was_training)
    return visual.patch_dropout


def collect_features(model: nn.Module, images: torch.Tensor) -> MaskingInputs:
    """The tokens the masker would see for these images (runs the tower once in eval mode)."""
    masker = vision_tower(model).patch_dropout
    captured = {}
    handle = masker.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    try:
        run_tower(model, images, training=False)
    finally:
        handle.remove()
    return MaskingInputs(captured["x"][:, 1:], images, masker.patch_size, masker.threshold, masker.progress)


def anchor_draw(inputs: MaskingInputs, cfg: MaskingConfig, seed: int):
    """`nearest_anchors` with the anchors drawn from `seed`, in full precision: (best similarity, is anchor).
    The global random state is left as it was (reseeding it would give every training run after a calibration
    the same masking noise, whatever its train.seed)."""
    device = inputs.tokens.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with full_precision(device):
            best_sim, _, is_anchor = nearest_anchors(inputs, cfg)
    return best_sim, is_anchor


def coverage_at(draw, threshold: float) -> float:
    """Mean cluster coverage of an `anchor_draw` at `threshold`."""
    best_sim, is_anchor = draw
    return ((best_sim > threshold) | is_anchor).float().mean().item()


def mean_coverage(inputs: MaskingInputs, cfg: MaskingConfig, threshold: float, seed: int = 0) -> float:
    """Mean cluster coverage at `threshold`, anchors drawn from `seed`."""
    return coverage_at(anchor_draw(inputs, cfg, seed), threshold)


def calibrate_threshold_schedule(batches, cfg: MaskingConfig, target: float, seed: int = 0) -> List[float]:
    """`calibrate_threshold` at each point of the masker's threshold schedule (`threshold_points`): for `mixed`
    features the similarity, and so the threshold that gives the target coverage, moves from rgb's to the
    embedding's over training. The embeddings are those of the model at calibration."""
    return [calibrate_threshold([b._replace(progress=b.progress.new_tensor(p)) for b in batches], cfg, target,
                                seed=seed)
            for p in schedule_progress(threshold_points(cfg))]


def calibrate_threshold(batches, cfg: MaskingConfig, target: float, iters: int = 30, draws: int = 4,
                        seed: int = 0) -> float:
    """Bisect the similarity threshold so that the mean cluster coverage over `batches` is `target`, the anchors
    drawn from `seed`.

    Coverage is averaged over `draws` anchor draws per batch: which patches become anchors is the main source
    of variance, and a threshold fitted to one draw would not hold on the next batches. The similarities of
    each draw are computed once: only the comparison with the threshold changes from one bisection step to the
    next (and with the same anchors for every threshold, coverage is monotone in it).
    """
    length = batches[0].tokens.shape[1]
    anchors = num_anchors(length, cfg.anchor_fraction)
    if target <= anchors / length:
        raise ValueError(f"masking.target_coverage={target!r} is not above the anchors' own coverage "
                         f"({anchors / length:.4f}: {anchors} of {length} patches at "
                         f"masking.anchor_fraction={cfg.anchor_fraction!r}); no threshold reaches it")
    anchor_draws = [anchor_draw(b, cfg, seed=seed * 1_000_000 + i * draws + d)
                    for i, b in enumerate(batches) for d in range(draws)]

    def coverage(threshold: float) -> float:
        return sum(coverage_at(draw, threshold) for draw in anchor_draws) / len(anchor_draws)

    low, high = -1.0, 1.0  # coverage(low) = 1, coverage(high) = anchors only
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if coverage(mid) > target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ---------------------------------------------------------------- a strategy's declared settings

# a second valid value of every MaskingConfig setting (the defaults are the first) but `options`, whose keys are
# the strategy's own: what it asks of them is recorded instead (`options_asked`)
OTHER_VALUES = {"ratio": 0.25, "features": "embedding", "anchor_fraction": 0.2, "threshold": -0.3,
                "target_coverage": 0.6, "calibration_batches": 3, "kmeans_k": 3, "kmeans_iters": 1, "attention": True}
PROBE_PATCH, PROBE_GRID = 4, 5


def _probe(cfg: MaskingConfig, tokens: torch.Tensor, pixels: torch.Tensor):
    """What `cfg`'s masker does to a batch: its output tokens and attention mask, from torch's generator at 7."""
    torch.manual_seed(7)
    masker = TokenMasker(cfg, patch_size=PROBE_PATCH, num_heads=2).train()
    masker.pixels = pixels
    return masker(tokens), masker.attn_mask


class _AskedOptions(dict):
    """An empty `masking.options` that records what a strategy asks of it: the keys looked up, "*" for all of them."""

    def __init__(self):
        super().__init__()
        self.asked: List[str] = []

    def _ask(self, what: str) -> None:
        self.asked.append(what)

    def __getitem__(self, key):
        self._ask(str(key))
        raise KeyError(key)

    def get(self, key, default=None):
        self._ask(str(key))
        return default

    def __contains__(self, key):
        self._ask(str(key))
        return False

    def __iter__(self):
        self._ask("*")
        return iter(())

    def __len__(self):
        self._ask("*")
        return 0

    def keys(self):
        self._ask("*")
        return super().keys()

    def items(self):
        self._ask("*")
        return super().items()

    def values(self):
        self._ask("*")
        return super().values()


def options_asked(cfg: MaskingConfig, tokens: torch.Tensor, pixels: torch.Tensor) -> List[str]:
    """The `masking.options` keys that `cfg`'s strategy looks up on a batch ("*": all of them), whether it then
    fails for want of them or not."""
    from dataclasses import replace

    options = _AskedOptions()
    try:
        _probe(replace(cfg, options=options), tokens, pixels)
    except Exception:
        if not options.asked:
            raise
    return sorted(set(options.asked))


def _same(a, b) -> bool:
    return a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and (
        a[1] is None if b[1] is None else a[1] is not None and torch.equal(a[1], b[1]))


def declaration_problems(strategy: str) -> List[str]:
    """What in a registered strategy's declaration is wrong, on a small random batch: each MaskingConfig setting
    it does not declare but whose value changes its masks, `masking.options` looked up without being declared, or
    that its masks differ between two runs from the same torch seed; [] if nothing (a setting read only in cases
    this batch does not reach goes unseen).

    The launcher records a setting that a strategy does not declare at one fixed value and submits once the points
    that differ only in it: a strategy that reads one would be trained once for all its values."""
    from dataclasses import replace

    from .config import settings_in_effect

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        generator = torch.Generator().manual_seed(0)
        # a square grid of patches, as a ViT's: a strategy that lays the patches out as one (isqrt of their count)
        # can be checked
        pixels = torch.randn(3, 3, PROBE_GRID * PROBE_PATCH, PROBE_GRID * PROBE_PATCH, generator=generator)
        tokens = torch.randn(3, 1 + PROBE_GRID * PROBE_GRID, 8, generator=generator)
        base = MaskingConfig(strategy=strategy, ratio=0.5)
        undeclared = {f.name for f in fields(MaskingConfig)} - settings_in_effect(base, STRATEGY_SETTINGS[strategy])
        asked = options_asked(base, tokens, pixels) if "options" in undeclared else []
        if asked:  # first: without its options, the strategy may not run at all
            return [f"masking.strategy={strategy!r} reads masking.options ({', '.join(asked)}), which it does not "
                    "declare (register_strategy(..., settings=(..., 'options'))): a job would be given options={}, "
                    "whatever the sweep set"]
        named = STRATEGY_OPTIONS.get(strategy)
        unnamed = [key for key in options_asked(base, tokens, pixels) if key != "*" and key not in named] \
            if named is not None else []
        if unnamed:  # a sweep giving it that option would be refused as one it does not read
            return [f"masking.strategy={strategy!r} reads masking.options.{unnamed[0]}, which its options "
                    f"{named} do not name (register_strategy(..., options=...))"]
        masks = _probe(base, tokens, pixels)
        if not _same(_probe(base, tokens, pixels), masks):
            return [f"masking.strategy={strategy!r}: its masks differ between two runs from the same torch seed "
                    "(draw the noise with torch's generator, on the tokens' device)"]
        return [f"masking.strategy={strategy!r} reads masking.{key}, which it does not declare "
                f"(register_strategy(..., settings=...)): a sweep over it would train one run for all its values"
                for key in sorted(undeclared - {"options"})
                if not _same(_probe(replace(base, **{key: OTHER_VALUES[key]}), tokens, pixels), masks)]


__all__ = [
    "MaskingConfig", "MaskingInputs", "MaskScores", "MaskResult", "STRATEGIES", "STRATEGY_SETTINGS", "STRATEGY_OPTIONS",
    "register_strategy", "calibrates_threshold", "select_tokens", "install_masking", "TokenMasker",
    "calibrate_threshold", "calibrate_threshold_schedule", "collect_features", "run_tower", "scheduled_threshold",
    "schedule_progress", "threshold_points", "standardised_patches", "patchify", "num_dropped", "validate",
    "key_padding_attn_mask", "mean_coverage", "declaration_problems",
]
