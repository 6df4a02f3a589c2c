"""The code a submission's jobs run: a copy of the packages (clustermask/, launch/, analysis/) and of the sweep's
plugin files made when it is submitted.

A SLURM job may wait in the queue for days, and a training is requeued after a time limit. Importing the checkout
when it starts, it would run whatever the checkout holds by then (an edit made for the next experiment), and a
requeued training would go on with other code than it began with. So each submission copies the packages into
`<sweep_dir>/code/<digest>/`, named after a digest of their files: a resubmission of the same code shares the copy,
other code gets one of its own, and a copy is never changed once written. The jobs run in that folder, from which
`python -m` imports them before anything else on the path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PACKAGES = ("clustermask", "launch", "analysis")
# a sweep's plugin files (`plugins=[mine.py]`) are copied with the packages, into this folder of the copy
PLUGIN_FILES = "plugin_files"


def absolute_pythonpath(pythonpath: str, base: Path) -> str:
    """PYTHONPATH with each entry absolute against `base` (where the submission runs): the jobs run in their copy
    of the code, where a relative entry (`lab`, `.`, or an empty one, which is the working folder) would name
    another folder, and a researcher's plugin module there (`plugins=[mylab.masks]`) would not be found."""
    return os.pathsep.join(entry if os.path.isabs(entry) else str(Path(base) / entry)
                           for entry in pythonpath.split(os.pathsep))


def jobs_pythonpath() -> Optional[str]:
    """This process's PYTHONPATH made absolute for a process that runs in another folder (a job, in its code copy;
    the sweep command's helper); None when it has none or it is absolute already."""
    pythonpath = os.environ.get("PYTHONPATH")
    if not pythonpath:  # Python ignores an empty one
        return None
    absolute = absolute_pythonpath(pythonpath, Path.cwd())
    return None if absolute == pythonpath else absolute


# variables naming a folder that a job reads or writes, made absolute as PYTHONPATH's entries are: the Hugging Face
# cache (where preflight found a model's tokenizer), torch's and Triton's compile caches, torch's hub, matplotlib's
# configuration, the cache of migrated MLflow stores (XDG_CACHE_HOME) and the temporary folder
FOLDER_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME",
                    "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "TMPDIR")


def jobs_environment() -> Dict[str, str]:
    """What of this process's environment a process that runs in another folder (a job, in its code copy; the sweep
    command's helper) must be given absolute: the relative ones of FOLDER_VARIABLES, and PYTHONPATH's entries."""
    absolute = {name: str(Path.cwd() / value) for name in FOLDER_VARIABLES  # `~/hf` is the readers' to expand
                if (value := os.environ.get(name)) and not os.path.isabs(os.path.expanduser(value))}
    pythonpath = jobs_pythonpath()
    return {**absolute, **({"PYTHONPATH": pythonpath} if pythonpath is not None else {})}


def environment_elsewhere(**more: str) -> Dict[str, str]:
    """This process's environment for a child that runs in another folder: its relative folders made absolute."""
    return {**os.environ, **jobs_environment(), **more}


def copied_plugin(entry: str) -> Optional[Path]:
    """In a job: the copy of plugin file `entry` that its submission made, or None (a module, not a file; a job
    run from a checkout; a copy made before plugin files were copied)."""
    from clustermask.plugins import is_file

    if not is_file(entry):
        return None
    copy = plugin_copy(package_folders()["launch"].parent, Path(entry))  # pinned absolute, as graph.plugin_files
    return copy if copy.is_file() else None


def package_folders() -> Dict[str, Path]:
    """Where this process imports each of PACKAGES from (a checkout, or a submission's copy)."""
    folders = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        folders[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return folders


def plugin_copy(code: Path, plugin_file: Path) -> Path:
    """Where the copy of the code `code` holds a plugin file (named by its absolute path: two `mine.py` of two
    folders are two copies)."""
    from clustermask.plugins import file_id

    return Path(code) / PLUGIN_FILES / f"{file_id(plugin_file)}.py"


def _files(folders: Dict[str, Path], plugin_files: Sequence[Path] = ()) -> List[Tuple[str, Path]]:
    """(path in the copy, file) for every file of the packages but Python's byte-code caches, and for each plugin
    file."""
    packages = [(f"{name}/{path.relative_to(folder).as_posix()}", path)
                for name, folder in folders.items() for path in folder.rglob("*")
                if path.is_file() and "__pycache__" not in path.parts]
    plugins = [(plugin_copy(Path(), Path(path)).as_posix(), Path(path)) for path in plugin_files]
    return sorted(packages + plugins)


def code_folder(sweep_dir: Path, folders: Optional[Dict[str, Path]] = None, write: bool = True,
                plugin_files: Sequence[Path] = ()) -> Path:
    """The copy of the packages (`folders`, default: this process's) and of the sweep's `plugin_files` (absolute
    paths) that the jobs of a submission to `sweep_dir` run; written unless it is there already or `write` is false
    (a dry run prints where it would be)."""
    files = _files(folders or package_folders(), plugin_files)
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    target = Path(sweep_dir) / "code" / digest.hexdigest()[:12]
    if write and not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # written aside and renamed: a job never sees half a copy (mkdir, not mkdtemp's 0700: the umask decides)
        staging = target.parent / f".writing-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, path in files:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, staging / name)
            os.rename(staging, target)
        except BaseException as exc:  # a Ctrl-C too: no half copy is left behind
            shutil.rmtree(staging, ignore_errors=True)
            if not (isinstance(exc, OSError) and target.is_dir()):  # else another submission wrote it first
                raise
    return target
