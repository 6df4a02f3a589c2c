import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermask import assignment_kernel, features_kernel, masking
from clustermask.data import DataConfig, sample_batches
from clustermask.masking import MaskingConfig, MaskingInputs, TokenMasker, select_tokens
from clustermask.model import ModelConfig, create
from conftest import NEEDS_CUDA, ON_GPU, check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync, distinct_patches

PATCH = 4
BENCH = Path(__file__).resolve().parent.parent / "bench"


def make_masker(**kw) -> TokenMasker:
    masker = TokenMasker(MaskingConfig(**kw), patch_size=PATCH, num_heads=2)
    return masker.train()


def tokens_and_pixels(batch, grid_h, grid_w, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, grid_h * PATCH, grid_w * PATCH, generator=g)
    x = torch.randn(batch, 1 + grid_h * grid_w, dim, generator=g)
    return x, pixels


def run(masker, x, pixels):
    masker.pixels = pixels
    return masker(x)


STRATEGY_CONFIGS = [dict(strategy="random"), dict(strategy="cluster", features="rgb"),
                    dict(strategy="cluster", features="embedding"), dict(strategy="cluster", features="mixed"),
                    dict(strategy="kmeans", kmeans_k=3), dict(strategy="cluster", attention=True)]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), grid_h=st.integers(1, 5), grid_w=st.integers(1, 5),
       ratio=st.floats(0.0, 0.95), config=st.sampled_from(STRATEGY_CONFIGS), seed=st.integers(0, 10))
def test_exact_kept_count_and_cls_kept(batch, grid_h, grid_w, ratio, config, seed):
    x, pixels = tokens_and_pixels(batch, grid_h, grid_w, seed=seed)
    length = grid_h * grid_w
    out = run(make_masker(ratio=ratio, **config), x, pixels)
    assert out.shape == (batch, 1 + length - round(ratio * length), x.shape[-1])
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(batch):  # kept tokens are distinct input tokens
        matches = (out[b, 1:, None, :] == x[b, None, 1:, :]).all(-1)
        assert (matches.sum(1) == 1).all() and (matches.sum(0) <= 1).all()


def two_halves_and_noise(noise_seed: int):
    """Image 0: left half red, right half blue (flat). Image 1: noise. 8x8 patches of 4 px."""
    img = torch.zeros(2, 3, 32, 32)
    img[0, 0, :, :16] = 1.0
    img[0, 2, :, 16:] = 1.0
    img[1] = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(noise_seed))
    x = torch.randn(2, 65, 8, generator=torch.Generator().manual_seed(1))
    return x, img


def test_clusters_follow_the_halves_of_a_flat_image_and_ignore_other_images():
    masker = make_masker(strategy="cluster", features="rgb", ratio=0.3, anchor_fraction=0.05)
    column = torch.arange(64) % 8
    left = column < 4
    results = []
    for noise_seed in (0, 1):
        x, img = two_halves_and_noise(noise_seed)
        torch.manual_seed(123)
        run(masker, x, img)
        results.append(masker.last)
    res = results[0]
    clustered, ids = res.scores.clustered[0], res.scores.cluster_id[0]
    # every cluster lies within one half, and a half with an anchor is entirely clustered
    for cluster in ids[clustered].unique():
        members = ids == cluster
        assert left[members].all() or (~left[members]).all()
    for half in (left, ~left):
        assert clustered[half].all() or not clustered[half].any()
    assert clustered.any()
    # changing image 1 changes nothing for image 0
    assert torch.equal(results[0].keep[0], results[1].keep[0])
    assert torch.equal(results[0].scores.clustered[0], results[1].scores.clustered[0])


def test_clustered_tokens_are_dropped_first_and_quota_is_filled_randomly():
    masker = make_masker(strategy="cluster", ratio=0.75, anchor_fraction=0.02)
    x, img = two_halves_and_noise(0)
    torch.manual_seed(0)
    run(masker, x, img)
    res = masker.last
    clustered, dropped = res.scores.clustered[0], res.dropped[0]
    n_drop = round(0.75 * 64)
    assert dropped.sum() == n_drop
    if clustered.sum() <= n_drop:
        assert dropped[clustered].all()
    else:
        assert clustered[dropped].all()


def test_no_positional_bias_in_the_order_of_equals():
    torch.manual_seed(0)
    length, draws = 16, 4000
    x = torch.zeros(draws, 1 + length, 4)
    flat = torch.zeros(draws, 3, 4 * PATCH, 4 * PATCH)  # one colour: every patch clustered, ties everywhere
    for cfg in (dict(strategy="random"), dict(strategy="cluster"), dict(strategy="kmeans", kmeans_k=2)):
        masker = make_masker(ratio=0.5, **cfg)
        run(masker, x, flat)
        frequency = masker.last.dropped.float().mean(0)
        assert (frequency - 0.5).abs().max() < 0.04, (cfg, frequency)


def test_evaluation_mode_is_the_identity():
    model, *_ , masker = create(ModelConfig(), MaskingConfig(strategy="cluster", ratio=0.5))
    reference, *_ = create(ModelConfig(), None)
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    images = torch.randn(3, 3, 64, 64)
    x = torch.randn(3, 65, 128)
    assert masker.eval()(x) is x
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-6)


@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_installs_into_vit_b_16(config):
    """open_clip's ViT-B-16 (random weights, nothing downloaded): 98 of 196 patches dropped, gradients flow."""
    torch.manual_seed(0)
    model, *_, masker = create(ModelConfig(name="ViT-B-16"), MaskingConfig(ratio=0.5, **config))
    visual = model.visual.train()
    seen = []
    visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 224, 224)
    visual(images).sum().backward()
    assert seen == [1 + 196 - 98]
    assert masker.last.keep.shape == (2, 98)
    assert visual.conv1.weight.grad is not None
    if config.get("attention"):
        assert masker.attn_mask.shape == (2 * 12, 99, 99)
    visual.eval()
    with torch.no_grad():
        visual(images)
    assert seen[-1] == 197


def test_masking_leaves_the_checkpoint_format_alone(tmp_path):
    plain, *_ = create(ModelConfig(), None)
    masked, *_ = create(ModelConfig(), MaskingConfig(strategy="kmeans"))
    assert list(plain.state_dict()) == list(masked.state_dict())
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, "state_dict": masked.state_dict()}, path)
    loaded, _, _ = open_clip.create_model_and_transforms("ViT-Tiny-8-64", pretrained=str(path), weights_only=True)
    assert torch.equal(loaded.visual.conv1.weight, masked.visual.conv1.weight)


@pytest.mark.parametrize("config", [c for c in STRATEGY_CONFIGS if c["strategy"] != "random"])
def test_autocast_does_not_lower_the_precision_of_the_decision(config):
    """A training step runs under bf16 autocast, which would run the similarity's and k-means' bmm in bf16
    (errors of ~3e-3 on a cosine): the masks must be those of the fp32 computation."""
    cfg = MaskingConfig(ratio=0.5, **dict(config, threshold=0.0))
    x, img = tokens_and_pixels(64, 8, 8, dim=32)
    inputs = MaskingInputs(x[:, 1:], img, PATCH, torch.tensor(0.0), torch.tensor(0.5))
    torch.manual_seed(0)
    full = select_tokens(inputs, cfg)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = select_tokens(inputs, cfg)
    assert torch.equal(under_autocast.keep, full.keep)
    if full.scores.cluster_id is not None:
        assert torch.equal(under_autocast.scores.cluster_id, full.scores.cluster_id)


def test_seeded_and_reproducible():
    x, img = tokens_and_pixels(4, 4, 4)
    torch.manual_seed(7)
    a = make_masker(strategy="kmeans", ratio=0.5)
    run(a, x, img)
    torch.manual_seed(7)
    b = make_masker(strategy="kmeans", ratio=0.5)
    run(b, x, img)
    assert torch.equal(a.last.keep, b.last.keep)
    torch.manual_seed(8)
    run(b, x, img)
    assert not torch.equal(a.last.keep, b.last.keep)


def test_other_values_name_every_masking_setting():
    from dataclasses import fields

    assert set(masking.OTHER_VALUES) == {f.name for f in fields(MaskingConfig)} - {"strategy", "options"}


@pytest.mark.parametrize("strategy", sorted(masking.STRATEGIES))
def test_a_strategy_masks_alike_whatever_the_settings_it_does_not_declare(strategy):
    """The launcher submits once the points that differ only in settings their strategy does not declare
    (config.canonical_masking): that is right only if those settings change nothing."""
    assert masking.declaration_problems(strategy) == []
    if "ratio" in masking.STRATEGY_SETTINGS[strategy]:  # the declaration is not empty for the ones that act
        x, pixels = tokens_and_pixels(3, 4, 5)
        shapes = [run(TokenMasker(MaskingConfig(strategy=strategy, ratio=ratio), patch_size=PATCH, num_heads=2)
                      .train(), x, pixels).shape for ratio in (0.5, 0.25)]
        assert shapes[0] != shapes[1]


def test_a_strategy_that_reads_a_setting_it_does_not_declare_or_draws_its_own_noise_is_found(registered_strategy):
    """What preflight asks of a plugin's strategy (`Registries.here`): every undeclared setting whose value changes
    its masks is named, with attention masks too, and masks that a torch seed does not fix are named."""
    @registered_strategy("threshold_unsaid", settings=("ratio",))
    def threshold_unsaid(inputs, cfg):
        scores = masking.score_random(inputs, cfg)
        return scores._replace(score=scores.score * cfg.threshold)

    @registered_strategy("hides_unsaid", settings=("ratio",))
    def hides_unsaid(inputs, cfg):
        scores = masking.score_random(inputs, cfg)
        return scores._replace(clustered=scores.score > 0.8)  # hidden when masking.attention is set

    @registered_strategy("numpy_noise", settings=("ratio",))
    def numpy_noise(inputs, cfg):
        return masking.MaskScores(torch.from_numpy(np.random.rand(*inputs.tokens.shape[:2])), None, None)

    @registered_strategy("width_unsaid", settings=("ratio",))
    def width_unsaid(inputs, cfg):  # a job would always get options={}, so the default width, whatever the sweep
        scores = masking.score_random(inputs, cfg)
        return scores._replace(score=scores.score * cfg.options.get("width", 2))

    @registered_strategy("band_unsaid", settings=("ratio",))
    def band_unsaid(inputs, cfg):  # no default: fails on the options a job would be given
        return masking.score_random(inputs, cfg)._replace(score=inputs.tokens[..., 0] * cfg.options["band"])

    @registered_strategy("all_options_unsaid", settings=("ratio",))
    def all_options_unsaid(inputs, cfg):
        return masking.score_random(inputs, cfg)._replace(score=inputs.tokens[..., 0] + len(dict(cfg.options)))

    @registered_strategy("width_said", settings=("ratio", "options"))
    def width_said(inputs, cfg):
        return width_unsaid(inputs, cfg)

    @registered_strategy("rows_unsaid", settings=("ratio",))
    def rows_unsaid(inputs, cfg):  # lays the patches out as a ViT's square grid: it could not be checked on 4 x 5
        side = math.isqrt(inputs.tokens.shape[1])
        grid = inputs.tokens[..., 0].reshape(-1, side, side)
        scores = masking.score_random(inputs, cfg)
        return scores._replace(score=scores.score + cfg.anchor_fraction * grid.flatten(1))

    def read(strategy):
        return re.findall(r"reads masking\.(\w+(?: \([^)]*\))?)", " ".join(masking.declaration_problems(strategy)))

    state = torch.random.get_rng_state()
    assert read("threshold_unsaid") == ["threshold"] and read("hides_unsaid") == ["attention"]
    assert read("width_unsaid") == ["options (width)"] and read("band_unsaid") == ["options (band)"]
    assert read("all_options_unsaid") == ["options (*)"] and read("rows_unsaid") == ["anchor_fraction"]
    assert masking.declaration_problems("width_said") == []
    assert "differ between two runs from the same torch seed" in masking.declaration_problems("numpy_noise")[0]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone


def test_registering_a_strategy_with_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="kmeans_kk"):
        masking.register_strategy("blocks", settings=("ratio", "kmeans_kk"))
    assert "blocks" not in masking.STRATEGIES


def test_a_strategy_naming_its_options_must_declare_them_a_setting_and_a_job_refuses_another(restore_strategies):
    with pytest.raises(ValueError, match=r"'blocks' names its options \('width',\): it must declare 'options'"):
        masking.register_strategy("blocks", settings=("ratio",), options=("width",))
    assert "blocks" not in masking.STRATEGIES
    masking.register_strategy("blocks", settings=("ratio", "options"), options=("width",))(masking.score_random)
    masking.validate(MaskingConfig(strategy="blocks", options={"width": 2}))
    with pytest.raises(ValueError, match=r"^masking.options.widht: blocks reads no such option \(did you mean "
                                         r"width\?\); it reads width$"):
        masking.validate(MaskingConfig(strategy="blocks", options={"widht": 2}))


def test_a_strategy_declaring_a_target_coverage_must_declare_what_its_calibration_reads():
    with pytest.raises(ValueError, match=r"'blocks'.*\['anchor_fraction', 'threshold'\]"):
        masking.register_strategy("blocks", settings=("ratio", "features", "target_coverage", "calibration_batches"))
    assert "blocks" not in masking.STRATEGIES
    assert masking.calibrates_threshold(MaskingConfig(strategy="cluster", target_coverage=0.3))
    assert not masking.calibrates_threshold(MaskingConfig(strategy="cluster"))
    assert not masking.calibrates_threshold(MaskingConfig(strategy="kmeans", target_coverage=0.3))
    # the launcher's rule is the same: a strategy that reads a fixed threshold but no target coverage keeps it
    from clustermask.config import settings_in_effect

    assert "threshold" in settings_in_effect(MaskingConfig(target_coverage=0.3), ("ratio", "threshold"))
    assert "threshold" not in settings_in_effect(MaskingConfig(target_coverage=0.3), masking.CLUSTER_SETTINGS)


class SelectTokens(torch.nn.Module):
    """A patch_dropout that keeps CLS and the patch tokens `index`: physically removes the others."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return torch.cat([x[:, :1], x[:, 1:][:, self.index]], dim=1)


def flat_halves_then_noise(size: int) -> torch.Tensor:
    images = torch.zeros(2, 3, size, size)
    images[:, 0, :, : size // 2] = 1.0  # two flat halves: big clusters, more than the quota can drop
    images[1, 1] = torch.rand(size, size)
    return images


def assert_hidden_tokens_change_nothing(visual, masker, images):
    """The tower's output with the hidden tokens masked == its output with them physically removed."""
    with torch.no_grad():
        masked_out = visual.train()(images)
    result = masker.last
    assert result.hidden is not None and result.hidden.any(), "the test needs hidden tokens"
    try:
        for i in range(len(images)):
            visual.patch_dropout = SelectTokens(result.keep[i][~result.hidden[i]])
            masker.attn_mask = None
            with torch.no_grad():
                removed_out = visual(images[i:i + 1])
            torch.testing.assert_close(masked_out[i:i + 1], removed_out, atol=1e-5, rtol=1e-4)
    finally:
        visual.patch_dropout = masker


ATTENTION_MASKING = MaskingConfig(strategy="cluster", ratio=0.3, attention=True, threshold=0.2)


def test_attention_mode_hidden_tokens_change_nothing():
    """CLS output with hidden tokens masked == CLS output with those tokens physically removed."""
    torch.manual_seed(0)
    model, *_ , masker = create(ModelConfig(), ATTENTION_MASKING)
    assert_hidden_tokens_change_nothing(model.visual, masker, flat_halves_then_noise(64))


def small_tower(**options):
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=32,
                             **options)


@pytest.mark.parametrize("options", [dict(block_type="custom", qk_norm=True, scale_heads=True),
                                     dict(no_ln_pre=True, ls_init_value=0.1)])
def test_attention_mode_hides_tokens_in_other_blocks_of_open_clip(options):
    torch.manual_seed(0)
    visual = small_tower(**options)
    masker = masking.install_masking(visual, ATTENTION_MASKING)
    assert_hidden_tokens_change_nothing(visual, masker, flat_halves_then_noise(32))


def test_a_call_that_bypasses_the_towers_hooks_is_refused_rather_than_given_another_batchs_images():
    """open_clip's VisionTransformer.forward_intermediates runs the masker but not the tower's hooks: in training
    mode it clustered its tokens by the images of the tower's previous call, and in attention mode hid nothing.
    Now refused, saying why; in evaluation mode (feature extraction) it runs. A tower's call that fails leaves no
    images behind either."""
    model, *_, masker = create(ModelConfig(), MaskingConfig(strategy="cluster", ratio=0.5, attention=True))
    visual = model.visual.train()
    visual(torch.rand(4, 3, 64, 64))
    assert masker.pixels is None and not masker.in_tower
    with pytest.raises(RuntimeError, match="outside a call of the image tower.*forward_intermediates"):
        visual.forward_intermediates(torch.rand(4, 3, 64, 64), output_fmt="NLC", indices=1)
    features = visual.eval().forward_intermediates(torch.rand(4, 3, 64, 64), output_fmt="NLC", indices=1)
    assert features["image_intermediates"][0].shape == (4, 64, 128)
    with pytest.raises(RuntimeError, match="size"):
        visual.train()(torch.rand(4, 3, 56, 56))  # fails in the tower, after its first hook took the images
    assert masker.pixels is None and not masker.in_tower


@pytest.mark.parametrize("options, pooling", [(dict(pool_type="avg", final_ln_after_pool=True), "pool_type='avg'"),
                                              (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4,
                                                    output_tokens=True), "attentional pooler")])
def test_attention_mode_is_refused_for_a_tower_whose_output_reads_every_token(options, pooling):
    """Hidden from attention, a token still reaches an average or an attentional pooler (CoCa's): refused, while
    dropping tokens works on such towers as on any."""
    with pytest.raises(ValueError, match=f"masking.attention=true.*{pooling}"):
        masking.install_masking(small_tower(**options), ATTENTION_MASKING)
    visual = small_tower(**options)
    masker = masking.install_masking(visual, MaskingConfig(strategy="cluster", ratio=0.3, threshold=0.2))
    seen = []
    visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    visual.train()(flat_halves_then_noise(32))
    assert seen == [1 + 64 - 19] and masker.attn_mask is None


@pytest.mark.parametrize("strategy", ["random", "cluster", "kmeans"])
def test_a_ratio_that_would_drop_every_patch_token_is_refused_and_the_largest_that_keeps_one_works(strategy):
    """round(ratio x L) = L left the tower its CLS token alone, whatever the image: 64 patches here, 0.995 drops
    them all, 0.9921 (the error's bound) keeps one."""
    with pytest.raises(ValueError, match=r"masking.ratio=0.995 drops all 64 patch tokens of VisionTransformer .*"
                                         r"at most 0.9921 keeps one"):
        masking.install_masking(small_tower(), MaskingConfig(strategy=strategy, ratio=0.995))
    visual = small_tower()
    masking.install_masking(visual, MaskingConfig(strategy=strategy, ratio=0.9921))
    seen = []
    visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    visual.train()(flat_halves_then_noise(32))
    assert seen == [1 + 1]
    masking.install_masking(small_tower(), MaskingConfig(strategy="none", ratio=0.995))  # none reads no ratio


def test_masking_installed_again_replaces_the_earlier_masker_and_its_hooks():
    """Another strategy installed on the same model (comparing them in a notebook, say): only the new masker acts;
    the earlier one's hooks would hand the transformer its last attention mask, of the same shape at the same
    ratio, silently hiding tokens that the new strategy does not hide."""
    torch.manual_seed(0)
    visual = small_tower()
    masking.install_masking(visual, ATTENTION_MASKING)
    images = flat_halves_then_noise(32)
    visual.train()(images)
    masker = masking.install_masking(visual, MaskingConfig(strategy="random", ratio=0.3))
    given = []
    visual.transformer.register_forward_pre_hook(lambda module, args, kwargs: given.append(kwargs.get("attn_mask")),
                                                 with_kwargs=True)
    visual(images)
    assert given == [None] and visual.patch_dropout is masker
    assert len(visual._forward_pre_hooks) == 1 and len(visual.transformer._forward_pre_hooks) == 2


def test_the_picture_shows_dropped_hidden_and_clustered_patches(tmp_path):
    """Each patch of the picture is greyed if the masker dropped it, darker if it kept it hidden from attention,
    tinted if clustered, and left as it was otherwise."""
    from matplotlib.image import imread

    from clustermask import visualize

    torch.manual_seed(0)
    model, *_, masker = create(ModelConfig(), MaskingConfig(strategy="cluster", ratio=0.3, attention=True,
                                                               threshold=0.2))
    images = torch.zeros(2, 3, 64, 64)
    images[:, 0, :, :32] = 1.0
    images[1, 1] = torch.rand(64, 64)
    torch.manual_seed(1)
    dropped, hidden, cluster_id = visualize.mask_decisions(model, images)
    result = masker.last
    assert hidden.any() and not (hidden & dropped).any()
    for i in range(2):  # hidden where the masker's kept tokens are hidden, nowhere else
        assert sorted(hidden[i].nonzero().flatten().tolist()) == sorted(result.keep[i][result.hidden[i]].tolist())

    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)).numpy()
    drawn = visualize.overlay(image, dropped[0].numpy(), cluster_id[0].numpy(), 8, hidden[0].numpy())
    tile = lambda picture, index: picture[index // 8 * 8:][:8, index % 8 * 8:][:, :8].reshape(64, 3)
    for index in range(64):  # each drawn tile is an affine map of the image's: its slope and offset say which
        before, after = tile(image, index), tile(drawn, index)
        slope = after.std(0) / before.std(0)
        offset = after.mean(0) - slope * before.mean(0)
        clustered = bool(cluster_id[0, index] >= 0)
        if dropped[0, index]:  # greyed (after the tint, if clustered): a quarter of the contrast, around grey
            assert np.allclose(slope, 0.25 * (0.55 if clustered else 1), atol=1e-4), index
            assert ((offset > 0.37) & (offset < 0.49)).all(), index
        elif hidden[0, index]:  # clustered, then darkened
            assert clustered and np.allclose(slope, 0.25 * 0.55, atol=1e-4), index
            assert ((offset > 0.11) & (offset < 0.23)).all(), index
        elif clustered:  # tinted
            assert np.allclose(slope, 0.55, atol=1e-4) and ((offset >= 0) & (offset < 0.46)).all(), index
        else:
            assert (after == before).all(), index

    path = visualize.save_mask_grid(model, images, tmp_path / "masks.png", columns=2)
    assert imread(path).shape[:2] == (400, 400)  # 2 columns x (2 images + 2 overlays) rows of 2 inches at 100 dpi
    assert visualize.title(masker.cfg) == ("cluster (rgb features, threshold=0.2, attention), ratio 0.3\n"
                                           "grey = dropped, dark = hidden from attention, tint = cluster")
    assert visualize.title(MaskingConfig(strategy="kmeans", ratio=0.5, attention=True)) == \
        "kmeans, ratio 0.5\ngrey = dropped, tint = cluster"
    # what tells two points of a sweep apart: the settings the strategy reads, where not at their default
    assert visualize.title(MaskingConfig(strategy="kmeans", ratio=0.5, kmeans_k=4, threshold=0.3)).startswith(
        "kmeans (kmeans_k=4), ratio 0.5\n")
    assert visualize.title(MaskingConfig(strategy="cluster", ratio=0.5, threshold=0.25, kmeans_k=4)).startswith(
        "cluster (rgb features, threshold=0.25), ratio 0.5\n")
    assert visualize.title(MaskingConfig(strategy="cluster", ratio=0.5, threshold=0.25, target_coverage=0.3)) \
        .startswith("cluster (rgb features, target_coverage=0.3), ratio 0.5\n")  # the threshold is calibrated
    assert visualize.title(MaskingConfig(strategy="random", ratio=0.5, threshold=0.25, options={"width": 4})) \
        .startswith("random, ratio 0.5\n")


def test_attention_mask_is_batch_major_per_image():
    hidden = torch.tensor([[True, False, False], [False, False, True]])
    mask = masking.key_padding_attn_mask(hidden, num_heads=3, dtype=torch.float32)
    assert mask.shape == (6, 4, 4)
    per_image = mask.view(2, 3, 4, 4)
    assert torch.isinf(per_image[0, :, :, 1]).all() and torch.isfinite(per_image[0, :, :, 3]).all()
    assert torch.isinf(per_image[1, :, :, 3]).all() and torch.isfinite(per_image[1, :, :, 1]).all()
    assert torch.isfinite(mask[:, :, 0]).all()  # CLS never hidden


def synthetic_inputs(synthetic_root, model, count, seed):
    _, train_tf, _, tokenizer, _ = create(ModelConfig(), None)
    cfg = DataConfig(train_shards=str(synthetic_root / "train"), workers=0)
    return [masking.collect_features(model, images) for images, _ in
            sample_batches(cfg, train_tf, tokenizer, 64, count, seed=seed)]


def test_calibration_lands_on_the_target_coverage(synthetic_root):
    """Calibrated on some batches, the mean coverage on other batches is within 0.02 of the target."""
    torch.manual_seed(0)
    model, *_ , masker = create(ModelConfig(), MaskingConfig(strategy="cluster"))
    cfg = MaskingConfig(strategy="cluster", features="rgb")
    calibration = synthetic_inputs(synthetic_root, model, 8, seed=1)
    held_out = synthetic_inputs(synthetic_root, model, 8, seed=2)
    for target in (0.2, 0.4):
        threshold = masking.calibrate_threshold(calibration, cfg, target)
        achieved = [masking.mean_coverage(b, cfg, threshold, seed=100 + 4 * i + d)
                    for i, b in enumerate(held_out) for d in range(4)]
        assert abs(sum(achieved) / len(achieved) - target) <= 0.02, (target, threshold, achieved)


def mean_coverage_over_draws(batches, cfg, threshold, progress):
    achieved = [masking.mean_coverage(b._replace(progress=torch.tensor(progress)), cfg, threshold, seed=100 + 4 * i + d)
                for i, b in enumerate(batches) for d in range(4)]
    return sum(achieved) / len(achieved)


def test_mixed_features_keep_the_target_coverage_all_through_training(synthetic_root):
    """`mixed` moves the similarity from rgb to embedding: its calibrated threshold schedule gives the target
    coverage on held-out batches at its points and between them, where one threshold calibrated at step 0
    (on rgb) drifts off it."""
    torch.manual_seed(0)
    model, *_ = create(ModelConfig(), MaskingConfig(strategy="cluster"))
    cfg = MaskingConfig(strategy="cluster", features="mixed")
    calibration = synthetic_inputs(synthetic_root, model, 4, seed=1)
    held_out = synthetic_inputs(synthetic_root, model, 4, seed=2)
    target = 0.2
    schedule = torch.tensor(masking.calibrate_threshold_schedule(calibration, cfg, target))
    assert schedule.shape == (masking.MIXED_THRESHOLD_POINTS,)
    misses_of_one_threshold = []
    for progress in (0.0, 0.125, 0.5, 0.8, 1.0):
        threshold = masking.scheduled_threshold(schedule, torch.tensor(progress)).item()
        achieved = mean_coverage_over_draws(held_out, cfg, threshold, progress)
        assert abs(achieved - target) <= 0.02, (progress, threshold, achieved)
        misses_of_one_threshold.append(abs(mean_coverage_over_draws(held_out, cfg, schedule[0].item(), progress)
                                           - target))
    assert max(misses_of_one_threshold) > 0.03, misses_of_one_threshold  # else this data could not tell


def test_the_threshold_schedule_is_piecewise_linear_in_training_progress():
    schedule = torch.tensor([0.1, 0.5, 0.3])
    expected = {-0.5: 0.1, 0.0: 0.1, 0.25: 0.3, 0.5: 0.5, 0.75: 0.4, 1.0: 0.3, 1.5: 0.3}
    for progress, threshold in expected.items():
        assert masking.scheduled_threshold(schedule, torch.tensor(progress)).item() == pytest.approx(threshold)
    assert masking.scheduled_threshold(torch.tensor([0.7]), torch.tensor(0.4)).item() == pytest.approx(0.7)


def test_a_mixed_masker_follows_its_threshold_schedule_during_training():
    """The threshold of each step (and its statistic) comes from the schedule at the step's progress; a single
    value sets every point; other features hold one threshold."""
    masker = make_masker(strategy="cluster", features="mixed", ratio=0.5)
    masker.total_steps = 8
    masker.set_threshold([0.2, 0.3, 0.4, 0.5, 0.6])
    x, img = two_halves_and_noise(0)
    for step, threshold in ((0, 0.2), (1, 0.25), (4, 0.4), (8, 0.6)):
        masker.set_step(step)
        run(masker, x, img)
        assert masker.stats["mask/threshold"].item() == pytest.approx(threshold)
        assert masker.threshold.item() == pytest.approx(threshold)
    masker.set_threshold(0.45)
    assert masker.threshold_schedule.tolist() == pytest.approx([0.45] * 5)
    assert make_masker(strategy="cluster", features="embedding").threshold_schedule.shape == (1,)


def test_calibration_refuses_a_target_that_the_anchors_alone_exceed():
    """64 patches at anchor_fraction 0.01 still have one anchor (1.6%): a 1% target passes the config check
    (above 0.01) but no threshold reaches it."""
    x, pixels = tokens_and_pixels(2, 8, 8)
    inputs = MaskingInputs(x[:, 1:], pixels, PATCH, torch.tensor(0.5), torch.tensor(0.0))
    cfg = MaskingConfig(strategy="cluster", anchor_fraction=0.01, target_coverage=0.012)
    masking.validate(cfg)
    with pytest.raises(ValueError, match=r"target_coverage=0.012 is not above the anchors' own coverage \(0.0156"):
        masking.calibrate_threshold([inputs], cfg, 0.012)
    assert -1 < masking.calibrate_threshold([inputs], cfg, 0.1, iters=8, draws=1) < 1


def test_calibration_leaves_the_random_state_alone():
    """Calibration seeds its own anchor draws; the training run's random state, and so its masks, must still
    depend on train.seed."""
    x, pixels = tokens_and_pixels(2, 4, 4)
    inputs = MaskingInputs(x[:, 1:], pixels, PATCH, torch.tensor(0.5), torch.tensor(0.0))
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = torch.rand(8)
        torch.manual_seed(seed)
        masking.calibrate_threshold([inputs], MaskingConfig(strategy="cluster"), 0.5, iters=3, draws=2)
        assert torch.equal(torch.rand(8), expected)


def dropped_neighbours(dropped: torch.Tensor, grid: int) -> float:
    """Mean number of dropped 4-neighbours of a dropped patch."""
    d = dropped.view(-1, grid, grid).float()
    padded = torch.nn.functional.pad(d, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return ((neighbours * d).sum() / d.sum()).item()


@pytest.mark.parametrize("config", [dict(strategy="cluster", features="rgb"),
                                    dict(strategy="cluster", features="embedding"),
                                    dict(strategy="cluster", features="mixed"),
                                    dict(strategy="kmeans")])
def test_structured_strategies_drop_spatially_clustered_patches(synthetic_root, config):
    """Dropped patches have more dropped 4-neighbours than under random masking (about 1.9 vs 1.7 here)."""
    model, *_ = create(ModelConfig(), MaskingConfig(strategy="cluster"))
    inputs = [b._replace(progress=torch.tensor(0.5), threshold=torch.tensor(0.5))
              for b in synthetic_inputs(synthetic_root, model, 2, seed=3)]
    cfg = MaskingConfig(ratio=0.5, **config)
    torch.manual_seed(0)
    structured = [dropped_neighbours(select_tokens(b, cfg).dropped, 8) for b in inputs]
    unstructured = [dropped_neighbours(select_tokens(b, MaskingConfig(strategy="random", ratio=0.5)).dropped, 8)
                    for b in inputs]
    assert min(structured) > max(unstructured) + 0.1, (structured, unstructured)


def lloyd_assignment(pixels: torch.Tensor, patch: int, initial: torch.Tensor, iters: int) -> torch.Tensor:
    """Spherical k-means written plainly, one image and one centre at a time: the reference."""
    feats = torch.nn.functional.normalize(masking.kmeans_features(pixels, patch).float(), dim=-1, eps=1e-6)
    assignments = []
    for f, start in zip(feats, initial):
        centres = f[start]
        for _ in range(iters):
            nearest = (f @ centres.T).argmax(-1)
            for c in range(len(centres)):
                if (nearest == c).any():
                    centres[c] = torch.nn.functional.normalize(f[nearest == c].sum(0), dim=0)
        assignments.append((f @ centres.T).argmax(-1))
    return torch.stack(assignments)


def test_more_kmeans_clusters_than_patch_tokens_are_refused():
    """With k above the patch count the masker took one centre per patch (random's drops) while the point was
    recorded at the k asked for."""
    with pytest.raises(ValueError, match=r"^masking.kmeans_k=65 asks for more clusters than the 64 patch tokens of "
                                         r"VisionTransformer: give at most 64$"):
        masking.install_masking(small_tower(), MaskingConfig(strategy="kmeans", kmeans_k=65))
    masking.install_masking(small_tower(), MaskingConfig(strategy="kmeans", kmeans_k=64))
    masking.install_masking(small_tower(), MaskingConfig(strategy="cluster", kmeans_k=65))  # cluster reads no k


def kmeans_images(seed: int, size=(20, 24)) -> torch.Tensor:
    pixels = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(seed))
    pixels[0, :, :, :12] = 0.0  # a flat region: equal features, and some empty clusters
    return pixels


@pytest.mark.parametrize("patch", [4, 1])
@pytest.mark.parametrize("k, iters", [(3, 1), (4, 3), (6, 5)])
def test_kmeans_assigns_as_lloyds_iterations_do(patch, k, iters):
    pixels = kmeans_images(k)
    length = (20 // patch) * (24 // patch)
    cfg = MaskingConfig(strategy="kmeans", kmeans_k=k, kmeans_iters=iters)
    inputs = MaskingInputs(torch.randn(4, length, 8), pixels, patch, torch.tensor(0.5), torch.tensor(0.0))
    torch.manual_seed(7)
    assignment = masking.score_kmeans(inputs, cfg).cluster_id
    torch.manual_seed(7)  # the same initial centres: the strategy's first draw
    initial = masking._random_indices(4, length, k, "cpu")
    assert torch.equal(assignment, lloyd_assignment(pixels, patch, initial, iters))
    assert len(assignment.unique()) > 1


def test_per_step_statistics():
    masker = make_masker(strategy="cluster", ratio=0.5, attention=True)
    x, img = two_halves_and_noise(0)
    run(masker, x, img)
    stats = {k: v.item() for k, v in masker.stats.items()}
    assert set(stats) == {"mask/drop_ratio", "mask/coverage_mean", "mask/coverage_std", "mask/threshold"}
    assert stats["mask/threshold"] == pytest.approx(0.5)
    assert stats["mask/drop_ratio"] >= 0.5
    assert 0 < stats["mask/coverage_mean"] <= 1
    coverage = masker.last.scores.clustered.float().mean(1)
    assert stats["mask/coverage_std"] == pytest.approx(abs(coverage[0] - coverage[1]).item() / 2)
    run(masker, x[:1], img[:1])  # one image: every statistic is still a number
    assert all(torch.isfinite(v) for v in masker.stats.values()) and masker.stats["mask/coverage_std"] == 0


@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_masking_op_compiles_fullgraph(config):
    """No graph breaks (and so no host sync) in the masking op: dynamo must capture it whole."""
    torch._dynamo.reset()
    cfg = MaskingConfig(ratio=0.5, **config)
    x, img = tokens_and_pixels(2, 4, 4)
    inputs = MaskingInputs(x[:, 1:], img, PATCH, torch.tensor(0.5), torch.tensor(0.3))
    compiled = torch.compile(lambda i: select_tokens(i, cfg).keep, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    eager = select_tokens(inputs, cfg).keep
    torch.manual_seed(0)
    assert torch.equal(compiled(inputs), eager)


def test_kmeans_features_round_within_an_8_bit_level():
    """k-means clusters bf16 features: rounding one moves it by under half the step between two of the 8-bit
    levels the pixels were stored in, for pixels within half the range of their channel's mean, and by under
    one step for any pixel. Pixels as open_clip's transform hands them over, normalised with its mean and std."""
    g = torch.Generator().manual_seed(0)
    levels = (torch.randn(2, 3, 32, 32, generator=g) * 70 + 128).clamp(0, 255).round()
    levels[1, 0, :4] = 255.0  # a channel with far outliers
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    pixels = (levels / 255 - mean[:, None, None]) / std[:, None, None]
    exact = masking.standardised_patches(pixels, PATCH)
    error = (masking.kmeans_features(pixels, PATCH).float() - exact).abs()
    raw = masking.patchify(levels / 255, PATCH)  # the same layout as the features, in [0, 1]
    channel = torch.arange(3).repeat_interleave(PATCH * PATCH)
    raw_std, raw_mean = torch.std_mean(levels / 255, dim=(2, 3))  # (B, C)
    step = 1 / (255 * raw_std[:, channel])[:, None, :]  # an 8-bit level in standardised units
    near = (raw - raw_mean[:, channel][:, None, :]).abs() <= 0.5
    assert (error < step / 2)[near].all() and (error < step).all()
    assert (~near).any() and (error > step / 4).any()  # the bound is near: the test would catch a coarser format


def test_standardised_patches_are_each_channels_pixels_less_its_mean_over_its_std():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 12, 12, generator=g) * torch.tensor([0.1, 1.0, 3.0])[:, None, None] + 0.5
    x = pixels.double()
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    definition = masking.patchify((x - mean) / (std + 1e-6), PATCH)
    got = masking.standardised_patches(pixels, PATCH).double()
    torch.testing.assert_close(got, definition, rtol=1e-5, atol=1e-5)


def test_compiled_standardisation_scales_each_pixel_without_a_square_root_or_division(tmp_path):
    """Compiled for a GPU, inductor inlined each channel's 1 / (std + eps), a square root and a division, into
    every pixel of the kernel that writes k-means' features: on an H200 that kernel took 2.5x the time of its
    bytes (bench/README.md). `masking.materialised` gives the channels' scales a buffer of their own. Checked on
    the Triton code inductor writes for a CUDA device (bench/triton_code.py, which needs no GPU), as it does where
    `features_kernel` does not serve (a GPU before sm80)."""
    if torch.cuda.is_available():
        pytest.skip("triton_code.py pretends a GPU where there is none; on a GPU, bench/masking.py --kernels")
    code = tmp_path / "kmeans.py"
    subprocess.run([sys.executable, str(BENCH / "triton_code.py"), "--strategy", "kmeans", "--batch", "2",
                    "--image-size", "32", "--patch", "8", "--width", "64", "--out", str(code)],
                   check=True, capture_output=True, timeout=600)
    kernels = load_bench("triton_code").kernel_summary(code.read_text())
    features = [row for row in kernels if row["x"] == 2 * 16 * 3 * 8 * 8]  # (B, L, C * p * p)
    assert len(features) == 1 and "permute" in features[0]["kernel"], kernels
    assert features[0]["sqrt"] == 0 and features[0]["divisions"] == 0, features[0]


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("num_anchors", [3, 8])
def test_the_embedding_similarity_of_bf16_tokens_is_their_cosine(num_anchors, compiled, device):
    """bf16 tokens (a bf16 autocast step) get their dot products with the anchors from one GEMM, the anchors
    padded to a multiple of 8; the similarity must still be each patch's cosine with each of its image's anchors."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 42, 64, generator=g).to(torch.bfloat16)
    anchors = distinct_patches(4, 42, num_anchors, g)
    anchor_tokens = tokens.double().gather(1, anchors[..., None].expand(-1, -1, 64))
    definition = torch.nn.functional.cosine_similarity(tokens.double()[:, :, None], anchor_tokens[:, None], dim=-1)
    similarity = torch.compile(masking.embedding_similarity, fullgraph=True) if compiled else \
        masking.embedding_similarity
    got = similarity(tokens.to(device), anchors.to(device))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), definition, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("length", [42, 196, 200])
def test_the_gram_of_patches_padded_for_the_gemm_is_the_gram(length, device):
    """k-means' Gram is computed over the patches padded with zero rows to a multiple of 8 (a faster GEMM on a
    GPU); what it returns must be the (B, L, L) dot products of the patches themselves."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, length, 48, generator=g).to(torch.bfloat16)
    expected = torch.einsum("bld,bmd->blm", feats.double(), feats.double())
    got = masking.gram(feats.to(device))
    assert got.shape == (3, length, length) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
def test_kmeans_on_gpu_assigns_as_on_cpu(compiled):
    """The same pixels and initial centres give the same clusters on the GPU, eager and compiled (a patch may
    differ only where two centres are within rounding of each other), with the library's default kernels."""
    check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync(compiled)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("num_anchors", [3, masking.UNROLLED_DOTS_MAX + 4])
def test_compiled_rgb_similarity_is_the_cosine_of_standardised_patches_without_writing_them(num_anchors, device):
    """rgb_similarity works on the centred pixels with the channels' 1/std^2 as weights; it must give the cosine of
    the standardised patches. Compiled with few anchors, the similarity is fused into the pass over the pixels
    (no bmm, so no (B, C, L, p * p) patch buffer is written); with many, a bmm. Both agree with the definition."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(3, 3, 6 * PATCH, 7 * PATCH, generator=g) * torch.tensor([1.0, 3.0, 0.2])[:, None, None]
              + torch.tensor([0.5, -2.0, 4.0])[:, None, None]).to(device)
    anchors = torch.randperm(42, generator=g)[:num_anchors].repeat(3, 1).to(device)
    patches = masking.standardised_patches(pixels, PATCH)
    definition = torch.nn.functional.cosine_similarity(
        patches[:, :, None], patches.gather(1, anchors[..., None].expand(-1, -1, patches.shape[-1]))[:, None], dim=-1)

    def similarity(px, idx):
        return masking.rgb_similarity(px, PATCH, idx)

    compiled, (code, *_) = run_and_get_code(torch.compile(similarity, fullgraph=True), pixels, anchors)
    torch.testing.assert_close(similarity(pixels, anchors), definition, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, definition, rtol=1e-5, atol=1e-5)
    fused = num_anchors <= masking.UNROLLED_DOTS_MAX
    assert ("bmm" in code) != fused
    buffer_sizes = [math.prod(int(n) for n in shape.split(",") if n.strip())
                    for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", code)]
    assert (pixels.numel() in buffer_sizes) != fused, buffer_sizes


def test_rgb_similarity_holds_for_low_contrast_and_nearly_flat_images():
    """The similarity's one pass centres sums of products rather than pixels: where an image's mean is far from
    0 against its std (low contrast) or one pixel stands out of a flat image, unshifted sums would cancel to
    noise (errors of 2e-2 and worse). Against the definition in float64."""
    g = torch.Generator().manual_seed(0)
    low_contrast = 2.0 + 0.01 * torch.randn(3, 6 * PATCH, 7 * PATCH, generator=g)
    flat_but_one = torch.full((3, 6 * PATCH, 7 * PATCH), 1.3)
    flat_but_one[:, 0, 0] = -1.79
    pixels = torch.stack([low_contrast, flat_but_one, torch.full_like(flat_but_one, 0.7)])
    anchors = torch.randperm(42, generator=g)[:3].repeat(3, 1)
    x = pixels.double()
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    patches = masking.patchify((x - mean) / (std + 1e-6), PATCH)
    definition = torch.nn.functional.cosine_similarity(
        patches[:, :, None], patches.gather(1, anchors[..., None].expand(-1, -1, patches.shape[-1]))[:, None], dim=-1)
    torch.testing.assert_close(masking.rgb_similarity(pixels, PATCH, anchors).double(), definition, rtol=0,
                               atol=1e-4)


def load_bench(name: str):
    path = BENCH / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiled_cluster_op_moves_each_input_the_fewest_times():
    """The op's memory traffic, as inductor counts it (bench/masking_traffic.py; a floor on its GPU cost, which
    an H200 measured at about 3x that floor for rgb, bench/README.md): rgb, about twice the pixels' bytes as
    inductor's CPU backend counts them (2.2x, as before the statistics came from the similarity's own pass), and
    the kept tokens' gather; embedding reads the tokens once for the similarity, then gathers. The bmm form reads
    the features two more times and writes them once."""
    traffic = load_bench("masking_traffic")
    with traffic.counting_traffic():
        rgb, emb = (traffic.op_traffic("ViT-Tiny-8-64", 64, dict(strategy="cluster", features=f, ratio=0.5), "cpu",
                                       torch.float32) for f in ("rgb", "embedding"))
    assert rgb["pixel_bytes"] < rgb["bytes"] < 1.15 * (2 * rgb["pixel_bytes"] + rgb["token_bytes"]), rgb
    assert emb["token_bytes"] < emb["bytes"] < 2.5 * emb["token_bytes"], emb


@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_whole_clip_model_in_training_is_one_graph(config):
    """Installed through hooks, the masking must not split the compiled model's graph (a break would cost a
    host round trip every step)."""
    torch._dynamo.reset()
    model, *_ = create(ModelConfig(), MaskingConfig(ratio=0.5, **config))
    model.train()
    texts = torch.randint(0, 49407, (2, model.context_length))
    torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 64, 64), texts)


def test_compiled_tower_trains_masked_and_evaluates_unmasked():
    """The image tower under inductor, as `model.compile: true` runs it: the hooks hand the pixels and the
    attention mask to the compiled graph, the quota holds, gradients reach conv1, evaluation sees every token."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, *_, masker = create(ModelConfig(), MaskingConfig(strategy="cluster", features="mixed", ratio=0.5,
                                                            attention=True, threshold=0.0), total_steps=10)
    visual = model.visual.train()
    compiled = torch.compile(visual)
    images = torch.randn(4, 3, 64, 64)
    masker.set_step(5)
    compiled(images).square().sum().backward()
    assert masker.last.keep.shape == (4, 32) and masker.attn_mask.shape == (4 * masker.num_heads, 33, 33)
    assert masker.stats["mask/drop_ratio"] > 0.5 and masker.last.hidden.any()
    assert visual.conv1.weight.grad.abs().sum() > 0
    visual.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), visual(images))


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("kernels", ["default", "fused", "assign"])
def test_compiled_tower_trains_kmeans_on_a_gpu_with_its_kernels_in_the_graph(kernels, monkeypatch):
    """`model.compile: true` with kmeans on a GPU, under bf16 autocast: the Triton kernels of features_kernel (the
    default) and, switched on, of its fused statistics or of assignment_kernel, inside the graph that trains; the
    quota holds, the clusters are k-means' (several per image), gradients reach conv1."""
    monkeypatch.setattr(features_kernel, "FUSED_STATISTICS", kernels == "fused")
    monkeypatch.setattr(assignment_kernel, "USE_ON_GPU", kernels == "assign")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, *_, masker = create(ModelConfig(), MaskingConfig(strategy="kmeans", ratio=0.5), total_steps=10)
    visual = model.visual.cuda().train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cumsum(-1).cumsum(-2) / 30
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.compile(visual)(images.cuda()).float().square().sum().backward()
    clusters = masker.last.scores.cluster_id
    assert masker.last.keep.shape == (4, 32) and clusters.shape == (4, 64)
    assert all(2 < len(image.unique()) <= masker.cfg.kmeans_k for image in clusters)
    assert visual.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_masking_op_compiled_alone_for_an_eager_model_keeps_what_the_eager_op_keeps(device):
    """`model.compile: false` on a GPU compiles the masking op on its own (`model.compile_masking`, forced here
    on the CPU): the model around it stays eager, the op keeps the tokens the eager op keeps (with inductor
    drawing its noise as eager torch does), hides the same ones, and passes the gradient back to conv1."""
    masking_cfg = MaskingConfig(strategy="cluster", features="mixed", ratio=0.5, attention=True)
    smooth = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cumsum(-1).cumsum(-2) / 30
    images = smooth.to(device)  # clusters beyond the quota, so some kept tokens are hidden
    results = []
    for compile_masking in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, *_, masker = create(ModelConfig(compile_masking=compile_masking), masking_cfg, total_steps=10,
                                   device=device)
        assert masker.op_compiled == compile_masking
        visual = model.visual.train()
        masker.set_step(5)
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):
            visual(images).square().sum().backward()
        assert visual.conv1.weight.grad.abs().sum() > 0
        results.append(masker.last)
    eager, compiled = results
    assert eager.keep.shape == (4, 32) and eager.hidden.any()
    assert torch.equal(compiled.keep, eager.keep) and torch.equal(compiled.hidden, eager.hidden)


def test_the_masking_op_is_compiled_alone_by_default_only_for_an_eager_model_on_a_gpu():
    from clustermask.model import compiles_masking_alone

    assert compiles_masking_alone(ModelConfig(), "cuda:1") and not compiles_masking_alone(ModelConfig(), "cpu")
    assert not compiles_masking_alone(ModelConfig(compile=True), "cuda")  # it is in the model's graph
    assert not compiles_masking_alone(ModelConfig(compile=True, compile_masking=True), "cuda")
    assert not compiles_masking_alone(ModelConfig(compile_masking=False), "cuda")
    assert compiles_masking_alone(ModelConfig(compile_masking=True), "cpu")


def test_masker_module_compiles_fullgraph():
    torch._dynamo.reset()
    masker = make_masker(strategy="cluster", ratio=0.5, attention=True)
    x, img = tokens_and_pixels(2, 4, 4)
    masker.pixels = img
    out = torch.compile(masker, fullgraph=True, backend="eager")(x)
    assert out.shape == (2, 9, 8) and masker.attn_mask.shape == (4, 9, 9)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="masking.strategy='blocks'"):
        masking.validate(MaskingConfig(strategy="blocks"))
    with pytest.raises(ValueError, match="masking.ratio=1.2"):
        masking.validate(MaskingConfig(strategy="random", ratio=1.2))
    with pytest.raises(ValueError, match="masking.features='depth'"):
        masking.validate(MaskingConfig(strategy="cluster", features="depth"))


def test_anchor_count():
    assert masking.num_anchors(196, 0.03) == 6
    assert masking.num_anchors(10, 0.03) == 1
    assert masking.num_dropped(196, 0.5) == 98 and masking.num_dropped(49, 0.3) == round(14.7)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", STRATEGY_CONFIGS)
def test_no_host_sync_on_gpu(config, dtype, compiled):
    """Eager, and compiled on its own as an eager model on a GPU runs it; fp32 tokens, and bf16 ones as a bf16
    autocast step gives the masker (the embedding similarity then takes a GEMM)."""
    torch._dynamo.reset()
    masker = TokenMasker(MaskingConfig(ratio=0.5, **config), patch_size=16, num_heads=12).cuda().train()
    if compiled:
        masker.compile_op()
    x = torch.randn(8, 197, 768, device="cuda", dtype=dtype)
    masker.pixels = torch.randn(8, 3, 224, 224, device="cuda")
    masker(x)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = masker(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (8, 1 + 196 - 98, 768)
