from types import SimpleNamespace

import pytest
import torch

from clustermask import features_kernel, masking
from conftest import (NEEDS_CUDA, ON_GPU, TRITON_ON_CPU,
                      check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync, smooth_pixels)

DEVICES = [TRITON_ON_CPU, ON_GPU]


def nan_filled_empty(real_empty):
    """torch.empty that hands over NaN, as a reused GPU block may hold anything."""
    def empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    return empty


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width, patch, multiple", [
    (32, 32, 8, 8),  # 16 patches, no padding
    (36, 40, 4, 8),  # not square: 9 x 10 patches padded to 96
    (42, 28, 14, 1),  # a patch of 14 pixels (ViT-L-14's), not a power of 2
    (227, 230, 16, 8),  # pixels past the last whole patch (open_clip crops them); 196 patches padded to 200
])
def test_the_kernel_writes_the_kmeans_features_bit_for_bit(device, height, width, patch, multiple, monkeypatch):
    monkeypatch.setattr(torch, "empty", nan_filled_empty(torch.empty))
    pixels = smooth_pixels(2, height, width).to(device)
    _, mean, inverse_scale = masking.channel_statistics(pixels)
    expected = masking.kmeans_features(pixels, patch)
    got = features_kernel.padded_features(pixels, mean, inverse_scale, patch, multiple)
    length = expected.shape[1]
    assert got.dtype == torch.bfloat16 and got.shape == masking.pad_rows(expected, multiple).shape
    assert torch.equal(got[:, :length], expected)  # the same fp32 arithmetic, rounded to nearest even
    # whatever the padding rows hold, the Gram kept is the features' Gram, bit for bit, against the same GEMM: a
    # CPU's BLAS may sum a 6 x 6 GEMM (multiple=1) in another order than the 8 x 8 one `masking.gram` pads to
    assert torch.equal(masking.padded_gram(got, length), masking.padded_gram(masking.pad_rows(expected, multiple),
                                                                             length))


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_reads_strided_pixels(device):
    """A channels-last batch, and a view with a margin: the kernel follows the strides it is given."""
    pixels = smooth_pixels(2, 40, 40).to(device)
    for view in (pixels.contiguous(memory_format=torch.channels_last), pixels[:, :, 3:35, 5:37]):
        _, mean, inverse_scale = masking.channel_statistics(view)
        expected = masking.kmeans_features(view, 8)
        assert torch.equal(features_kernel.padded_features(view, mean, inverse_scale, 8, 1), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width, patch, programs", [
    (32, 32, 8, 0),  # one program per image channel (on a GPU, as many as PROGRAMS_PER_SM allows)
    (36, 40, 4, 4),  # 6 image channels in 4 programs: some take two in turn
    (42, 28, 14, 1),  # one program for all; a patch of 14 pixels
    (227, 230, 16, 2),  # the statistics over every pixel, the features over the whole patches
])
def test_the_fused_kernel_standardises_with_the_channels_statistics(device, height, width, patch, programs,
                                                                    monkeypatch):
    """`standardised_features` computes the statistics itself, from shifted sums: the features are
    `kmeans_features`' up to the fp32 rounding of the mean and scale (a feature may round to the neighbouring
    bf16 value, or, near zero, differ by the mean's rounding)."""
    monkeypatch.setattr(torch, "empty", nan_filled_empty(torch.empty))
    pixels = (smooth_pixels(2, height, width) + torch.tensor([3.0, -1.0, 0.5])[:, None, None]).to(device)
    expected = masking.kmeans_features(pixels, patch)
    got = features_kernel.standardised_features(pixels, patch, 8, programs=programs)
    assert got.dtype == torch.bfloat16 and got.shape == masking.pad_rows(expected, 8).shape
    got = got[:, :expected.shape[1]]
    assert (got == expected).float().mean() > 0.999
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -7, atol=1e-5)


def test_kmeans_takes_the_kernel_only_on_a_gpu_where_it_is_enabled(monkeypatch):
    """The CPU, CI and the demo keep masking.kmeans_features; the kernel serves CUDA pixels on sm80 or later while
    USE_ON_GPU says so (the library's default since run 13)."""
    assert features_kernel.USE_ON_GPU
    pixels = smooth_pixels(2, 32, 32)
    assert not features_kernel.enabled(pixels) and not features_kernel.enabled(pixels.to("meta"))
    expected = masking.gram(masking.kmeans_features(pixels, 8))
    assert torch.equal(masking.kmeans_gram(pixels, 8), expected)  # no Triton launched on CPU tensors
    monkeypatch.setattr(features_kernel, "FUSED_STATISTICS", True)
    assert torch.equal(masking.kmeans_gram(pixels, 8), expected)
    on_a_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for capability, takes_the_kernel in [((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert features_kernel.enabled(on_a_gpu) == takes_the_kernel
    monkeypatch.setattr(features_kernel, "USE_ON_GPU", False)
    assert not features_kernel.enabled(on_a_gpu)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_kmeans_with_the_kernel_assigns_as_on_cpu_without_a_host_sync(compiled, fused, monkeypatch):
    """k-means with the kernel's features (and statistics, fused), eager and compiled (fullgraph, the kernel inside
    the graph)."""
    if not features_kernel.enabled(torch.empty(1, device="cuda")):
        pytest.skip("the kernel serves sm80 or later")
    monkeypatch.setattr(features_kernel, "FUSED_STATISTICS", fused)
    check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync(compiled)
