"""Work of the sweep command that needs heavy imports, done in child processes started with the command.

Importing torch (for the strategy and evaluator registries) and MLflow takes seconds; the children do it
while the command composes the sweep, so submitting 64 points stays a matter of seconds. Neither child
writes anything until the command has checked every point and asks it to:

- `RegistriesInChild`: the names registered with the model code and the sweep's plugins (strategies and the
  settings each uses, evaluators), for preflight. It imports the model code at once, the plugins when asked.
- `TrackingInChild`: imports MLflow and readies the empty sqlite store, then, only when asked, creates the
  sweep's parent run and a run per point, and answers their ids. Closing it unasked writes nothing.

    python -m launch.helpers registries|tracking     # what the children run
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import snapshot

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Registries:
    """Names registered with the model code: masking strategies (with the settings each uses) and evaluators."""
    strategies: Dict[str, List[str]]
    evaluators: Dict[str, Optional[List[str]]]  # each with the options it reads (None: it does not say)
    # what is wrong in a plugin strategy's declaration (masking.declaration_problems); the built-ins' is tested
    declaration_problems: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    # a plugin strategy that failed on the check's small CPU batch (one for a GPU only?): its error
    unchecked: Dict[str, str] = dataclasses.field(default_factory=dict)
    # the masking.options keys each strategy reads, where it says
    strategy_options: Dict[str, Optional[List[str]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def here(cls, plugins: Sequence[str] = ()) -> "Registries":
        """What is registered once `plugins` are imported (PluginError names one that fails)."""
        from clustermask import evaluate, masking
        from clustermask.plugins import load_plugins

        load_plugins(plugins)
        problems, unchecked = {}, {}
        for name, fn in masking.STRATEGIES.items():
            if fn.__module__.startswith("clustermask."):
                continue
            try:
                problems[name] = masking.declaration_problems(name)
            except Exception as exc:  # the plugin's own error
                unchecked[name] = f"{type(exc).__name__}: {exc}"
        evaluators = {name: None if options is None else list(options)
                      for name, options in sorted(evaluate.EVALUATOR_OPTIONS.items())}
        strategy_options = {name: None if options is None else list(options)
                            for name, options in sorted(masking.STRATEGY_OPTIONS.items())}
        return cls({name: list(masking.STRATEGY_SETTINGS[name]) for name in sorted(masking.STRATEGIES)}, evaluators,
                   {name: found for name, found in problems.items() if found}, unchecked, strategy_options)


class _Child:
    role = ""

    def __init__(self):
        # in the repository, which `-m` imports; a plugin module on a relative PYTHONPATH is found as it is here
        self.process = subprocess.Popen([sys.executable, "-m", "launch.helpers", self.role], cwd=REPO, text=True,
                                        env=snapshot.environment_elsewhere(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:  # never asked (a dry run, or the sweep failed its checks)
            self.process.kill()
            self.process.communicate()

    def _answer(self, request: str = "") -> dict:
        out, err = self.process.communicate(request)
        if self.process.returncode != 0:
            raise SystemExit(f"error: the {self.role} helper process failed:\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])


class RegistriesInChild(_Child):
    role = "registries"

    def result(self, plugins: Sequence[str] = ()) -> Registries:
        """Registries.here(plugins), from the child; a plugin that fails to import raises PluginError."""
        from clustermask.plugins import PluginError

        answer = self._answer(json.dumps(list(plugins)))
        if "plugin_error" in answer:
            raise PluginError(answer["plugin_error"])
        return Registries(**answer)


class TrackingInChild(_Child):
    role = "tracking"

    def create_sweep_runs(self, tracking: dict, uri: str, sweep_id: str, params: dict, points: list,
                          artifacts) -> Tuple[str, List[str]]:
        """clustermask.tracking.create_sweep_runs, in the child (points: PointRun)."""
        request = {"tracking": tracking, "uri": uri, "sweep_id": sweep_id, "params": params,
                   "points": [dataclasses.asdict(p) for p in points], "artifacts": artifacts}
        answer = self._answer(json.dumps(request))
        if "tracking_error" in answer:
            raise SystemExit(f"error: MLflow at {uri} did not record the sweep's runs, nothing was submitted: "
                             f"{answer['tracking_error']}")
        return answer["parent"], answer["runs"]


def _serve_tracking() -> dict:
    from clustermask.config import TrackingConfig
    from clustermask.tracking import PointRun, create_sweep_runs, empty_sqlite_store

    empty_sqlite_store()  # imports MLflow, and builds the template on a machine's first sweep
    request = sys.stdin.read()
    if not request.strip():
        return {}
    req = json.loads(request)
    try:
        parent, runs = create_sweep_runs(TrackingConfig(**req["tracking"]), req["uri"], req["sweep_id"],
                                         req["params"], [PointRun(**p) for p in req["points"]], req["artifacts"])
    except Exception as exc:  # MlflowException: a server that went away, a store that refuses
        return {"tracking_error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:3000]}
    return {"parent": parent, "runs": runs}


def _serve_registries() -> dict:
    from clustermask.plugins import PluginError

    for module in ("clustermask.masking", "clustermask.evaluate"):  # torch, while the command composes the sweep
        importlib.import_module(module)

    try:
        return dataclasses.asdict(Registries.here(json.loads(sys.stdin.read() or "[]")))
    except PluginError as exc:
        return {"plugin_error": str(exc)}


def main(role: str) -> None:
    answer = _serve_registries() if role == "registries" else _serve_tracking()
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
