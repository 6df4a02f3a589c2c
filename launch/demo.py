"""`clustermask-demo`: synthetic data -> a 4-point sweep trained, evaluated, tracked and reported, here.

    clustermask-demo [--root outputs] [extra Hydra overrides, e.g. train.steps=100]
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

from clustermask.files import read_manifest_file
from clustermask.synthetic import SyntheticConfig, ensure


INTERRUPTED = 130  # the sweep command's exit after a Ctrl-C


def run_sweep(command) -> int:
    """The sweep command's exit code. A Ctrl-C reaches it too (one process group): it ends its running task, marks
    what never ran and says how to resume, within its own grace period. Waiting for it, instead of killing it a
    quarter second later as `subprocess.call` does, lets it finish that."""
    sweep = subprocess.Popen(command)
    try:
        return sweep.wait()
    except KeyboardInterrupt:
        return sweep.wait()


def script(name: str) -> str:
    """`name` as it runs from anywhere: the script beside this interpreter (the venv's, not on PATH unless it is
    activated), else the name."""
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else name


def sweep_run_elsewhere(sweep_dir: Path) -> int:
    """The demo's end where its overrides sent the sweep elsewhere: a dry run (`launcher.dry_run=true`: nothing
    written) or SLURM (`launcher=slurm`: the command returns once the jobs are queued). Nothing to print yet."""
    if not (sweep_dir / "manifest.json").exists():
        print("[demo] a dry run: nothing was trained, so there is no table to show")
        return 0
    executor = read_manifest_file(sweep_dir)["executor"]
    if executor != "slurm":
        print(f"[demo] error: the sweep finished without its report in {sweep_dir / 'report'}; "
              f"{script('clustermask-status')} {sweep_dir} says why", file=sys.stderr)
        return 1
    print(f"[demo] the sweep was submitted to SLURM and runs on: follow it with {script('clustermask-status')} "
          f"{sweep_dir}; its report job writes the tables and plots to {sweep_dir / 'report'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="outputs", help="where data, sweeps and MLflow go")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the sweep")
    args = parser.parse_args(argv)
    started = time.time()
    root = Path(args.root).resolve()
    data_root = root / "data" / "synthetic"
    try:
        data = ensure(SyntheticConfig(root=str(data_root)))
    except KeyboardInterrupt:
        print("[demo] interrupted while writing the synthetic data (none of it kept)", file=sys.stderr)
        return INTERRUPTED
    except FileExistsError:
        print(f"[demo] error: {data_root} holds something other than the demo's data; pick another --root or remove "
              "it", file=sys.stderr)
        return 2
    except OSError as exc:  # a --root that cannot be written
        print(f"[demo] error: --root {args.root}: cannot write there ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"[demo] synthetic data in {data} ({time.time() - started:.0f}s)", flush=True)
    sweep_name = f"demo_{dt.datetime.now():%Y%m%d_%H%M%S}"
    command = [sys.executable, "-m", "launch.app", "-m", "experiment=demo", f"paths.root={root}",
               f"sweep_name={sweep_name}", *args.overrides]
    code = run_sweep(command)
    if code == INTERRUPTED:
        print("[demo] interrupted", file=sys.stderr)
        return code
    if code != 0:
        print(f"[demo] the sweep failed (exit {code})", file=sys.stderr)
        return code
    sweep_dir = root / "sweeps" / sweep_name
    report = sweep_dir / "report"
    if not (report / "results.md").exists():
        return sweep_run_elsewhere(sweep_dir)
    print_summary(sweep_dir, time.time() - started)
    return 0


def print_summary(sweep_dir: Path, seconds: float) -> None:
    """The table, and where everything the demo made is."""
    report = sweep_dir / "report"
    print("\n" + (report / "results.md").read_text())
    print(f"[demo] finished in {seconds:.0f}s")
    print(f"  sweep directory : {sweep_dir}")
    print(f"  tables          : {report}/results.md, results.tex, results_all_metrics.csv;")
    print("                    results_mean.md, results_mean.tex: mean ± std over seeds; results_retrieval*.md, .tex: "
          "recall@k both ways")
    print(f"  plots           : {', '.join(sorted(p.name for p in report.glob('*.png') if not p.name.startswith('masks_')))}")
    print(f"  mask pictures   : {report}/masks_*.png")
    manifest = read_manifest_file(sweep_dir)
    uri = manifest["tracking_uri"]
    if uri.startswith("sqlite:///"):
        print(f"  MLflow UI       : {script('mlflow')} ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    else:  # tracking.uri or MLFLOW_TRACKING_URI: a tracking server
        print(f"  MLflow          : {uri}, experiment {manifest['experiment']}")
    print(f"  status          : {script('clustermask-status')} {sweep_dir}")


if __name__ == "__main__":
    sys.exit(main())
