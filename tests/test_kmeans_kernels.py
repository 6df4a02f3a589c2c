import pytest
import torch

from clustermask import kmeans_kernels, masking
from conftest import NEEDS_CUDA, ON_GPU, TRITON_ON_CPU, smooth_pixels

DEVICES = [TRITON_ON_CPU, ON_GPU]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("store_by_patch", [True, False])
@pytest.mark.parametrize("height, width, patch, multiple", [
    (32, 32, 8, 8),  # 16 patches, no padding
    (36, 40, 4, 8),  # not square: 9 x 10 patches padded to 96
    (42, 28, 14, 1),  # a patch of 14 pixels (ViT-L-14's), not a power of 2
    (227, 230, 16, 8),  # pixels past the last whole patch (open_clip crops them); 196 patches padded to 200
])
def test_the_kernel_writes_the_padded_kmeans_features_bit_for_bit(device, store_by_patch, height, width, patch,
                                                                   multiple, monkeypatch):
    monkeypatch.setattr(kmeans_kernels, "STORE_BY_PATCH", store_by_patch)
    pixels = smooth_pixels(2, height, width).to(device)
    _, mean, inverse_scale = masking.channel_statistics(pixels)
    expected = masking.pad_rows(masking.kmeans_features(pixels, patch), multiple)
    got = kmeans_kernels.padded_features(pixels, mean, inverse_scale, patch, multiple)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.equal(got, expected)  # the same fp32 arithmetic, rounded to nearest even


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_reads_strided_pixels(device):
    """A channels-last batch, and a view with a margin: the kernel follows the strides it is given."""
    pixels = smooth_pixels(2, 40, 40).to(device)
    for view in (pixels.contiguous(memory_format=torch.channels_last), pixels[:, :, 3:35, 5:37]):
        _, mean, inverse_scale = masking.channel_statistics(view)
        expected = masking.kmeans_features(view, 8)
        assert torch.equal(kmeans_kernels.padded_features(view, mean, inverse_scale, 8, 1), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length, centres", [(16, 3), (81, 20), (196, 8), (200, 8)])
def test_the_member_sums_are_the_bmm(device, length, centres):
    """The dot products as k-means has them: a view of a Gram padded for the GEMM (rows of unit stride, longer
    than the length; NaN in the padding here, which the kernel must not read); products and sums in fp32, in
    another order than the bmm's."""
    g = torch.Generator().manual_seed(0)
    padded = torch.full((2, length + 4, length + 4), float("nan"))
    padded[:, :length, :length] = torch.randn(2, length, length, generator=g) * 10
    dots = padded[:, :length, :length].to(device)
    members = (torch.rand(2, length, centres, generator=g) < 0.2).float() * torch.rand(2, length, 1, generator=g)
    members = members.to(device)
    expected = torch.bmm(dots.double(), members.double())
    got = kmeans_kernels.member_sums(dots, members)
    assert got.dtype == torch.float32 and got.shape == (2, length, centres)
    scale = (dots.abs().double() @ members.abs().double()).max()  # each sum's terms' magnitude, at most
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * scale.item())


def test_the_member_sums_refuse_rows_of_other_strides():
    dots = torch.randn(2, 16, 16).transpose(1, 2)
    with pytest.raises(ValueError, match=r"unit stride, not dots \(256, 1, 16\)"):
        kmeans_kernels.member_sums(dots, torch.rand(2, 16, 3))


def test_kmeans_takes_the_kernels_only_on_a_gpu_where_they_are_enabled(monkeypatch):
    """The CPU, CI and the demo keep the torch code; the kernels serve CUDA tensors once switched on."""
    monkeypatch.setattr(kmeans_kernels, "FEATURES_ON_GPU", True)
    monkeypatch.setattr(kmeans_kernels, "SUMS_ON_GPU", True)
    pixels = smooth_pixels(2, 32, 32)
    assert not kmeans_kernels.features_enabled(pixels) and not kmeans_kernels.sums_enabled(pixels)
    initial = torch.tensor([[0, 5, 9], [1, 2, 15]])
    expected = masking.kmeans_assignment(masking.gram(masking.kmeans_features(pixels, 8)), initial, 3)
    assert torch.equal(masking.kmeans_clusters(pixels, 8, initial, 3), expected)
    if torch.cuda.is_available():
        assert kmeans_kernels.features_enabled(pixels.cuda()) and kmeans_kernels.sums_enabled(pixels.cuda())
        monkeypatch.setattr(kmeans_kernels, "FEATURES_ON_GPU", False)
        monkeypatch.setattr(kmeans_kernels, "SUMS_ON_GPU", False)
        assert not kmeans_kernels.features_enabled(pixels.cuda()) and not kmeans_kernels.sums_enabled(pixels.cuda())


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("features, sums", [(True, False), (False, True), (True, True)])
def test_kmeans_with_the_kernels_assigns_as_on_cpu_without_a_host_sync(compiled, features, sums, monkeypatch):
    """k-means with either kernel or both, eager and compiled (fullgraph, the kernels inside the graph), gives the
    clusters the CPU gives (a patch may differ only where two centres are within rounding of each other), and
    never waits for the GPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(kmeans_kernels, "FEATURES_ON_GPU", features)
    monkeypatch.setattr(kmeans_kernels, "SUMS_ON_GPU", sums)
    g = torch.Generator().manual_seed(0)
    pixels = smooth_pixels(16, 224, 224)
    initial = torch.rand(16, 196, generator=g).argsort(1)[:, :8]
    on_cpu = masking.kmeans_clusters(pixels, 16, initial, 3)
    clusters = torch.compile(masking.kmeans_clusters, fullgraph=True) if compiled else masking.kmeans_clusters
    pixels, initial = pixels.cuda(), initial.cuda()
    clusters(pixels, 16, initial, 3)  # warm-up: compilation and Triton's first launch may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = clusters(pixels, 16, initial, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (on_gpu.cpu() == on_cpu).float().mean() > 0.995
    assert all(len(a.unique()) > 2 for a in on_cpu)
