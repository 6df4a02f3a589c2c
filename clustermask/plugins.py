"""A researcher's own masking strategies and evaluators, kept outside the library.

A plugin is a Python file (`path/to/my_masks.py`) or an importable module (`mylab.masks`, installed or on
PYTHONPATH) that registers them when imported:

    import torch
    from clustermask.evaluate import register_evaluator
    from clustermask.masking import MaskScores, register_strategy

    @register_strategy("first_rows_first", settings=("ratio",))  # the masking.* keys its masks depend on
    def score_first_rows_first(inputs, cfg):  # MaskingInputs (tokens, pixels, ...), MaskingConfig
        b, length, _ = inputs.tokens.shape  # a score per patch token: the highest are dropped
        return MaskScores(torch.arange(length, 0, -1.0, device=inputs.tokens.device).expand(b, length), None, None)

    @register_evaluator("logit_scale", options=("log",))  # the task.options keys it reads: others are refused
    def logit_scale(model, transform, tokenizer, task, ctx):  # task: EvalTask (name, dataset, root, options)
        scale = model.logit_scale if task.options.get("log", False) else model.logit_scale.exp()
        yield "value", float(scale)  # logged as logit_scale/<task.dataset>/value

with `strategy: first_rows_first` in the researcher's `masking/mine.yaml` and a task
`{name: logit_scale, dataset: own/scale, root: ...}` in their `eval/mine.yaml`.

The sweep command imports a sweep's `plugins` before it checks its points, and every job imports them before
it reads the registries, so that a name registered there is a `masking.strategy` or an `eval.tasks[i].name`
like the built-in ones.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, List, Optional, Sequence


class PluginError(ValueError):
    """A plugin that cannot be found or fails to import; the message names it."""


def check_name_free(registry: dict, name: str, kind: str) -> None:
    """A plugin's name must not quietly replace a built-in strategy or evaluator, or another plugin's."""
    if name in registry:
        fn = registry[name]
        raise ValueError(f"{kind} {name!r} is already registered ({fn.__module__}.{fn.__qualname__})")


def is_file(entry: str) -> bool:
    return entry.endswith(".py")


def file_id(path: Path) -> str:
    """`<stem>_<hash of the path>`: one name per plugin file (two `mine.py` of two folders are two)."""
    return f"{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _module_name(path: Path) -> str:
    # one module per file, whichever way its path is spelled: a second load is the first one
    return f"clustermask_plugin_{file_id(path)}"


def _import_file(path: Path, source: Path) -> ModuleType:
    name = _module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a fixed file is imported again, not taken half-run from the cache
        raise
    return module


def load_plugin(index: int, entry: str, source: Optional[Path] = None) -> ModuleType:
    """Import `entry` (a .py file or a module name); PluginError names it and what went wrong. `source`: for a
    file, the file to import in its place (a job's copy of it, made when the job was submitted)."""
    where = f"plugins[{index}]={entry!r}"
    if is_file(entry):
        path = Path(entry).resolve()
        source = Path(source) if source is not None else path
        if not source.is_file():
            raise PluginError(f"{where}: no such file")
        load = lambda: _import_file(path, source)  # noqa: E731
    else:
        if importlib.util.find_spec(entry.split(".")[0]) is None:
            raise PluginError(f"{where}: no module named {entry.split('.')[0]!r} (a module must be installed or "
                              "on PYTHONPATH; give a file as a path ending in .py)")
        load = lambda: importlib.import_module(entry)  # noqa: E731
    try:
        return load()
    except PluginError:
        raise
    except Exception as exc:  # the plugin's own error, SyntaxError and a refused registration included
        raise PluginError(f"{where} failed to import: {type(exc).__name__}: {exc}") from exc


def load_plugins(entries: Iterable[str], sources: Optional[Sequence[Optional[Path]]] = None) -> List[ModuleType]:
    """`load_plugin` of each entry, with its `source` where `sources` gives one."""
    entries = list(entries)
    sources = list(sources) if sources is not None else [None] * len(entries)
    return [load_plugin(index, entry, source) for index, (entry, source) in enumerate(zip(entries, sources))]


def fingerprint(entries: Sequence[str], modules: Sequence[ModuleType]) -> str:
    """`entry@<sha256 of its file, 12 digits>` for each plugin: which code a job ran, as git_sha is for the
    library's (a plugin's file may change between a sweep's jobs)."""
    def digest(module: ModuleType) -> str:
        source = getattr(module, "__file__", None)
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:12] if source else "unknown"

    return " ".join(f"{entry}@{digest(module)}" for entry, module in zip(entries, modules))
