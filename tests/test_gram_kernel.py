import pytest
import torch

from clustermask import gram_kernel, masking
from conftest import (NEEDS_CUDA, ON_GPU, TRITON_ON_CPU,
                      check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync, smooth_pixels)

pytest.importorskip("triton")


@pytest.mark.parametrize("device", [TRITON_ON_CPU, ON_GPU])
@pytest.mark.parametrize("height, width, patch, tile, pad_to", [
    (64, 64, 16, 64, 1),  # 16 patches: one tile, mostly past the last patch
    (28, 28, 4, 16, 1),  # 49 patches: 4 x 4 tiles, those below the diagonal stored from the ones above
    (42, 42, 14, 64, 1),  # 196 pixels a patch channel: the last step of the K loop partly past the patch
    (32, 48, 8, 16, 8),  # not square; 24 patches padded to 24, no padding to zero
    (36, 36, 4, 32, 8),  # 81 patches padded to 88
    (224, 224, 16, 64, 8),  # ViT-B-16: 196 patches padded to 200, as masking.gram pads them
    (227, 230, 16, 128, 1),  # pixels past the last whole patch (open_clip crops them), 2 x 2 tiles of 128
])
def test_the_kernel_computes_the_gram_of_kmeans_features(device, height, width, patch, tile, pad_to):
    pixels = smooth_pixels(2, height, width).to(device)
    expected = masking.pad_rows(masking.kmeans_features(pixels, patch), pad_to).double()
    expected = expected @ expected.transpose(1, 2)
    _, mean, inverse_scale = masking.channel_statistics(pixels)
    got = gram_kernel.standardised_patch_gram(pixels, mean, inverse_scale, patch, tile=tile, pad_to=pad_to)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # the same bf16 features, their products summed in fp32 in another order: ~1e-7 of the largest norm; an index
    # wrong by one patch or pixel is off by more than 1e-2
    tolerance = 1e-4 * expected.diagonal(dim1=1, dim2=2).max().item()
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=0, atol=tolerance)


def test_a_padding_the_tiles_cannot_cover_is_refused():
    pixels = smooth_pixels(1, 12, 12)
    _, mean, inverse_scale = masking.channel_statistics(pixels)
    with pytest.raises(ValueError, match="pad_to=24"):  # 9 patches, in tiles up to 16
        gram_kernel.standardised_patch_gram(pixels, mean, inverse_scale, 4, tile=8, pad_to=24)


def test_kmeans_takes_the_kernel_only_on_a_gpu_where_it_is_enabled(monkeypatch):
    """The CPU, CI and the demo keep `masking.gram`; the kernel serves CUDA pixels (sm80 or later) once USE_ON_GPU
    says so."""
    monkeypatch.setattr(gram_kernel, "USE_ON_GPU", True)
    pixels = smooth_pixels(2, 32, 32)
    assert not gram_kernel.enabled(pixels) and not gram_kernel.enabled(pixels.to("meta"))
    expected = masking.gram(masking.kmeans_features(pixels, 8))
    assert torch.equal(masking.kmeans_gram(pixels, 8), expected)  # no Triton launched on CPU tensors
    if torch.cuda.is_available():
        assert gram_kernel.enabled(pixels.cuda()) == (torch.cuda.get_device_capability() >= (8, 0))
        monkeypatch.setattr(gram_kernel, "USE_ON_GPU", False)
        assert not gram_kernel.enabled(pixels.cuda())


@pytest.mark.parametrize("capability, takes_the_kernel", [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                          ((9, 0), True)])
def test_only_gpus_with_bf16_tensor_cores_take_the_kernel(capability, takes_the_kernel, monkeypatch):
    """A V100 (sm70) or T4 (sm75) has no bf16 tl.dot: masking.gram stays its path."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert gram_kernel.has_bf16_tensor_cores(0) == takes_the_kernel


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
def test_kmeans_with_the_kernel_assigns_as_on_cpu_without_a_host_sync(compiled, monkeypatch):
    """k-means with the kernel's Gram, eager and compiled (fullgraph, the kernel inside the graph)."""
    monkeypatch.setattr(gram_kernel, "USE_ON_GPU", True)
    check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync(compiled)
