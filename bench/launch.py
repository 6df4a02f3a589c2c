"""Benchmark: wall time and sbatch calls to submit a 64-point sweep (dry run, and real local SLURM).

    python bench/launch.py [--repeats N] [--skip-real]

The real submissions use `--hold` so nothing runs; the jobs are cancelled afterwards. A shim `sbatch` on
PATH counts the calls. The first real submission runs with an empty cache, so it also pays for building the
empty MLflow store that later sweeps copy. Prints figures and writes bench/results/launch.md. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["masking=random,cluster,cluster_embedding,kmeans", "masking.ratio=0.2,0.3,0.5,0.7",
         "train.seed=0,1,2,3"]  # 4 x 4 x 4 = 64 points


def sbatch_shim(folder: Path) -> Path:
    real = shutil.which("sbatch") or "sbatch"
    shim = folder / "sbatch"
    # one line per call: `submit`, or `test` for the preflight's `sbatch --test-only`
    shim.write_text(f"#!/usr/bin/env bash\nkind=submit\nfor arg in \"$@\"; do [ \"$arg\" = --test-only ] && kind=test; "
                    f"done\necho $kind >> {folder}/calls\nexec {real} \"$@\"\n")
    shim.chmod(0o755)
    return folder / "calls"


def submit(root: Path, data: Path, name: str, extra, env) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launch.app", "-m", f"paths.root={root}", f"paths.data={data}",
                             "launcher=slurm", f"sweep_name={name}", *SWEEP, *extra],
                            capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    return seconds


HOLD = [f"+launcher.{stage}.additional_parameters.hold=true" for stage in ("train", "eval", "report")]


def submit_held(root: Path, data: Path, name: str, env) -> dict:
    """One real submission, jobs held so nothing runs, then cancelled."""
    seconds = submit(root, data, name, HOLD, env)
    manifest = json.loads((root / "sweeps" / name / "manifest.json").read_text())
    record = manifest["submissions"][0]
    ids = [g["job_id"] for s in ("train", "eval") for g in record[s]] + [record["report"]["job_id"]]
    subprocess.run(["scancel", *ids], check=False)
    return {"seconds": round(seconds, 2), "points": len(manifest["points"]), "job_ids": ids}


def counts(calls: Path) -> dict:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return {"sbatch_calls": lines.count("submit"), "test_only": lines.count("test")}


def calls_since(calls: Path, before: dict) -> dict:
    return {key: value - before[key] for key, value in counts(calls).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-real", action="store_true", help="dry run only (no SLURM here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "launch.md"))
    args = parser.parse_args(argv)
    from clustermask.synthetic import SyntheticConfig, generate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(SyntheticConfig(root=str(tmp / "data"), train_samples=64, train_shards=2,
                                        classification_train=36, classification_test=18, retrieval_test=4,
                                        sugarcrepe_per_task=2))
        calls = sbatch_shim(tmp)
        # a fresh cache: the first real submission also builds the empty MLflow store that later ones copy
        env = {**os.environ, "PATH": f"{tmp}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp / "cache")}
        for i in range(args.repeats):
            before = counts(calls)
            seconds = submit(tmp / "out", data, f"dry{i}", ["launcher.dry_run=true"], env)
            rows.append({"mode": "dry run", "points": 64, "seconds": round(seconds, 2), **calls_since(calls, before)})
            print(json.dumps(rows[-1]), flush=True)
        if not args.skip_real:
            for i in range(args.repeats + 1):
                before = counts(calls)
                mode = "real, first on this machine (builds the MLflow template)" if i == 0 else "real"
                rows.append({"mode": f"{mode} (held, then cancelled)",
                             **submit_held(tmp / "out", data, f"real{i}", env), **calls_since(calls, before)})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"# submitting a 64-point sweep ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
             f"`python bench/launch.py`)", "",
             "| mode | points | wall s (whole command) | sbatch submissions | sbatch --test-only (preflight) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['points']} | {r['seconds']} | {r['sbatch_calls']} | {r['test_only']} |"
              for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
