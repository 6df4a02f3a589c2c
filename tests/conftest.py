import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter on CPU tensors (tests/test_gram_kernel.py): `triton.jit`
# chooses that when a kernel is made, Triton's own library included, so before anything imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from clustermask.synthetic import SyntheticConfig, generate  # noqa: E402

# a sweep without tracking.uri takes MLflow's MLFLOW_TRACKING_URI (a lab's server, set in a shell profile): the tests'
# sweeps, and the jobs they start, keep to their own stores whatever the shell running pytest has set
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parent.parent
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])  # a `device` parameter: CUDA tests run with -m gpu
# a `device` parameter for Triton kernels on the CPU
TRITON_ON_CPU = pytest.param("cpu", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton's kernels run on the CPU under TRITON_INTERPRET=1, which this file sets where there is no GPU"))

SMALL = dict(seed=0, image_size=64, train_samples=2400, train_shards=4, classification_train=360,
             classification_test=180, retrieval_test=60, sugarcrepe_per_task=30, eval_shards=2)


def free_port() -> int:
    """A local TCP port that nothing listens on (bound for a moment, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_eval_task(synthetic_root) -> str:
    """The override of a sweep evaluated on one small task (zero-shot on the synthetic shapes): a quick evaluation."""
    return ("eval.tasks=[{name: zeroshot_classification, dataset: wds/shapes, root: "
            f"{synthetic_root}/eval/shapes" + "}]")


def git_lfs_pointer(path: Path) -> None:
    """Replace `path` with what a clone made without git lfs holds in its place."""
    size = path.stat().st_size
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {size}\n")


@contextlib.contextmanager
def process_group(args, **options):
    """A command in a process group of its own, killed with all its children at the end whatever happened."""
    process = subprocess.Popen(args, cwd=REPO, start_new_session=True, **options)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def interrupt_when(command, started, what: str, group: bool = True):
    """Run `command` as in a terminal, and once `started()` Ctrl-C it: SIGINT to its process group, as a terminal
    sends it, or (`group=False`) to the command alone; its exit code and stderr."""
    with process_group(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as run:
        deadline = time.time() + 300
        while not started():
            assert time.time() < deadline and run.poll() is None, f"{what} never started"
            time.sleep(0.05)
        (os.killpg if group else os.kill)(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=90)
    return run.returncode, stderr


def distinct_patches(images: int, patches: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct patch indices per image, drawn uniformly: k-means' initial centres, or anchors."""
    return torch.rand(images, patches, generator=generator).argsort(1)[:, :count]


def smooth_pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images with regions, as CLIP-normalised pixels roughly are (so that k-means finds clusters)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=g).cumsum(-1).cumsum(-2) / 50


def check_kmeans_on_gpu_assigns_as_on_cpu_without_a_host_sync(compiled: bool) -> None:
    """k-means eager or compiled (fullgraph, any Triton kernel of the library inside the graph) gives the clusters
    the CPU gives (a patch may differ only where two centres are within rounding of each other), and never waits
    for the GPU. For the kernels' tests, with their switches set."""
    from clustermask import masking

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    pixels = smooth_pixels(16, 224, 224)
    initial = distinct_patches(16, 196, 8, g)
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


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Small synthetic data, generated once per test session (paths.data of the configs)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(SyntheticConfig(root=str(root), **SMALL))
    return root


def slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm():
    """A running SLURM controller; CI sets CLUSTERMASK_REQUIRE_SLURM=1 so that a missing one fails."""
    if not slurm_available():
        if os.environ.get("CLUSTERMASK_REQUIRE_SLURM") == "1":
            pytest.fail("CLUSTERMASK_REQUIRE_SLURM=1 but no SLURM controller answers sinfo")
        pytest.skip("no SLURM controller (run .ci/start_slurm.sh as root)")
    return True


@pytest.fixture
def restore_strategies():
    """The masking strategies registered during the test (by it, or by a plugin it imports) are unregistered after."""
    from clustermask import masking

    before = set(masking.STRATEGIES)
    yield
    for name in set(masking.STRATEGIES) - before:
        del masking.STRATEGIES[name]
        masking.STRATEGY_SETTINGS.pop(name, None)
        masking.STRATEGY_OPTIONS.pop(name, None)
        masking.PIXEL_STRATEGIES.discard(name)


@pytest.fixture
def registered_strategy(restore_strategies):
    """Registers strategies for one test: register(name, settings)(fn); unregistered afterwards."""
    from clustermask import masking

    return lambda name, settings: masking.register_strategy(name, needs_pixels=True, settings=settings)
