import pytest
import torch

from clustermask import gram_kernel, kmeans_kernel, masking
from conftest import NEEDS_CUDA, ON_GPU, TRITON_ON_CPU, smooth_pixels

pytest.importorskip("triton")


def gram_and_centres(batch: int, side: int, patch: int, k: int, seed: int = 0):
    """k-means' dot products of smooth images (the (B, L, L) block of the padded Gram, as masking.gram returns
    it) and k distinct random initial centres per image."""
    dots = masking.gram(masking.kmeans_features(smooth_pixels(batch, side, side, seed), patch))
    g = torch.Generator().manual_seed(seed)
    initial = torch.rand(batch, dots.shape[1], generator=g).argsort(1)[:, :k]
    return dots, initial


def assert_assigns_as(got: torch.Tensor, expected: torch.Tensor):
    """Under the interpreter the products are fp32 and only the sums' order differs from the bmm's: the same
    clusters. On a GPU, three TF32 products: a patch may change where two centres lie within that rounding."""
    got = got.cpu()
    assert got.dtype == torch.int64 and got.shape == expected.shape
    if kmeans_kernel.interpreted():
        assert torch.equal(got, expected)
    else:
        assert (got == expected).float().mean() > 0.995


@pytest.mark.parametrize("device", [TRITON_ON_CPU, ON_GPU])
@pytest.mark.parametrize("side, patch, k, iters", [
    (64, 16, 3, 2),  # 16 patches: one step of columns, no padding
    (28, 4, 8, 3),  # 49 patches: rows padded to 64, the last step of columns mostly past them
    (36, 4, 5, 0),  # no iteration: the initial centres' argmax
    (224, 16, 8, 3),  # ViT-B-16: 196 patches, rows of the padded 200-wide Gram
    (40, 4, 20, 4),  # more centres than tl.dot's 16: padded to 32
])
def test_the_kernel_assigns_as_kmeans_assignment(device, side, patch, k, iters):
    dots, initial = gram_and_centres(3, side, patch, k)
    expected = masking.kmeans_assignment(dots, initial, iters)
    assert_assigns_as(kmeans_kernel.assignment(dots.to(device), initial.to(device), iters), expected)
    assert all(len(clusters.unique()) > 2 for clusters in expected)


@pytest.mark.parametrize("device", [TRITON_ON_CPU, ON_GPU])
def test_an_empty_cluster_keeps_its_centre_and_zero_patches_stay_in_the_first(device):
    """Image 0's centres 1 and 2 start on the same patch, so the first iteration gives centre 2 no patch (the first
    of equals wins) and it keeps its initial centre, which wins patches later; image 1 is flat, so every feature
    is zero and every cosine 0."""
    dots, initial = gram_and_centres(2, 28, 4, 4, seed=1)
    dots[1] = 0
    initial[0, 2] = initial[0, 1]
    assert not (masking.kmeans_assignment(dots, initial, 0)[0] == 2).any()
    expected = masking.kmeans_assignment(dots, initial, 3)
    assert (expected[0] == 2).any() and (expected[1] == 0).all()
    assert_assigns_as(kmeans_kernel.assignment(dots.to(device), initial.to(device), 3), expected)


@pytest.mark.parametrize("device", [TRITON_ON_CPU, ON_GPU])
def test_the_kernel_reads_nothing_outside_each_images_dot_products(device):
    """Rows and columns are padded up to the kernel's blocks (49 patches: 64 rows, 4 steps of 16 columns); the
    dot products given are a block of a larger buffer of NaNs, so any read past them would spread a NaN."""
    dots, initial = gram_and_centres(3, 28, 4, 5)
    surrounded = torch.full((4, 49 + 20, 49 + 40), float("nan"))
    surrounded[:3, :49, :49] = dots
    got = kmeans_kernel.assignment(surrounded.to(device)[:3, :49, :49], initial.to(device), 2)
    assert_assigns_as(got, masking.kmeans_assignment(dots, initial, 2))


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "tf32"])
def test_each_precision_agrees_with_fp32_on_a_gpu(precision, monkeypatch):
    """Each of the products' precisions gives ViT-B-16's clusters as fp32 sums on the CPU do, but for patches
    where two centres lie within its rounding (bench/masking.py's `titer`, `titerieee` and `titertf32`)."""
    monkeypatch.setattr(kmeans_kernel, "DOT_PRECISION", precision)
    dots, initial = gram_and_centres(16, 224, 16, 8, seed=2)
    got = kmeans_kernel.assignment(dots.cuda(), initial.cuda(), 3).cpu()
    assert (got == masking.kmeans_assignment(dots, initial, 3)).float().mean() > 0.995


def test_kmeans_takes_the_kernel_only_on_a_gpu_where_it_is_enabled(monkeypatch):
    monkeypatch.setattr(kmeans_kernel, "USE_ON_GPU", True)
    pixels = smooth_pixels(2, 32, 32)
    initial = torch.tensor([[0, 5, 9], [3, 4, 15]])
    assert not kmeans_kernel.enabled(pixels) and not kmeans_kernel.enabled(pixels.to("meta"))
    expected = masking.kmeans_assignment(masking.gram(masking.kmeans_features(pixels, 8)), initial, 2)
    assert torch.equal(masking.kmeans_clusters(pixels, 8, initial, 2), expected)
    if torch.cuda.is_available():
        assert kmeans_kernel.enabled(pixels.cuda())
        monkeypatch.setattr(kmeans_kernel, "USE_ON_GPU", False)
        assert not kmeans_kernel.enabled(pixels.cuda())


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("with_gram_kernel", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_kmeans_with_the_kernel_assigns_as_on_cpu_without_a_host_sync(compiled, with_gram_kernel, monkeypatch):
    """k-means with its iterations here (and its Gram from gram_kernel, or not), eager and compiled (fullgraph,
    the kernels inside the graph), gives the clusters the CPU gives and never waits for the GPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(kmeans_kernel, "USE_ON_GPU", True)
    monkeypatch.setattr(gram_kernel, "USE_ON_GPU", with_gram_kernel)
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
