from types import SimpleNamespace

import pytest
import torch

from clustermask import assignment_kernel, masking
from conftest import (NEEDS_CUDA, ON_GPU, TRITON_ON_CPU,
                      check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync, distinct_patches, smooth_pixels)

DEVICES = [TRITON_ON_CPU, ON_GPU]


def gram_and_centres(pixels, patch, k, seed=0):
    """k-means' dot products as the library gives them (a view of the padded Gram where it pads) and k distinct
    initial patches per image."""
    dots = masking.kmeans_gram(pixels, patch)
    g = torch.Generator().manual_seed(seed)
    initial = distinct_patches(dots.shape[0], dots.shape[1], k, g)
    return dots, initial.to(pixels.device)


def assert_same_clusters(got, expected):
    """The same clusters: bit for bit under the interpreter; on a GPU, where torch's sums over the patches and
    Triton's may differ in the last bit, all but a patch or two whose nearest centres are within rounding."""
    assert got.dtype == torch.int64 and got.shape == expected.shape
    if got.is_cuda:
        assert (got == expected).float().mean() > 0.99
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, patch, k, iters", [
    (224, 16, 8, 3),  # ViT-B-16's 196 patches, a view of the Gram padded to 200; the library's k and iterations
    (40, 8, 5, 2),  # 25 patches and 5 centres: neither a power of 2
    (36, 4, 3, 0),  # no iteration: the initial centres' nearest
    (64, 8, 8, 1),
])
def test_the_kernels_assign_as_kmeans_assignment(device, size, patch, k, iters):
    """The same IEEE arithmetic as masking.kmeans_assignment; only the sums over the patches are in another order."""
    dots, initial = gram_and_centres(smooth_pixels(3, size, size).to(device), patch, k)
    expected = masking.kmeans_assignment(dots, initial, iters)
    assert_same_clusters(assignment_kernel.kmeans_assignment(dots, initial, iters), expected)
    assert all(len(a.unique()) > 2 for a in expected)


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_centre_keeps_its_similarities_and_equal_ones_go_to_the_first(device):
    """Image 0 starts from one patch twice: the second copy gets no members (argmax takes the first of equals)
    and keeps its similarities, which later win patches back from the first; image 1 is flat, every patch's
    features are zero, every similarity is 0 and all go to centre 0 (which Triton's interpreter, whose argmax
    takes the first of equals whatever it is told, checks only on a GPU)."""
    pixels = smooth_pixels(2, 64, 64)
    pixels[1] = 0.5
    dots, initial = gram_and_centres(pixels.to(device), 8, 6, seed=1)
    initial[0, 1] = initial[0, 0]
    for iters in (1, 2, 3):
        expected = masking.kmeans_assignment(dots, initial, iters)
        got = assignment_kernel.kmeans_assignment(dots, initial, iters)
        assert_same_clusters(got, expected)
        assert (got[1] == 0).all()
    assert (expected[1] == 0).all()
    start = masking.kmeans_assignment(dots, initial, 0)
    assert torch.equal(assignment_kernel.kmeans_assignment(dots, initial, 0), start)  # no sum: bit for bit
    assert (start[0] != 1).all() and (expected[0] == 1).any()  # empty after the start, not at the end


def test_kmeans_takes_the_kernels_only_on_a_gpu_where_they_are_enabled(monkeypatch):
    """Off by default until a GPU measures them; never on CPU tensors (the CPU, CI and the demo keep torch)."""
    assert not assignment_kernel.USE_ON_GPU
    on_a_gpu = SimpleNamespace(is_cuda=True)
    assert not assignment_kernel.enabled(on_a_gpu)
    monkeypatch.setattr(assignment_kernel, "USE_ON_GPU", True)
    assert assignment_kernel.enabled(on_a_gpu)
    dots, initial = gram_and_centres(smooth_pixels(2, 32, 32), 8, 4)
    assert not assignment_kernel.enabled(dots)
    monkeypatch.setattr(assignment_kernel, "kmeans_assignment", None)  # called, it would raise
    assert masking.kmeans_assignment(dots, initial, 2).shape == (2, 16)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("compiled", [False, True])
def test_kmeans_with_the_kernels_assigns_as_on_cpu_without_a_host_sync(compiled, monkeypatch):
    """k-means with these kernels between its GEMMs, eager and compiled (fullgraph, the kernels inside the
    graph)."""
    monkeypatch.setattr(assignment_kernel, "USE_ON_GPU", True)
    check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync(compiled)
