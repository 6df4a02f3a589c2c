"""Benchmark: wall time and sbatch calls to submit a 64-point sweep (dry run, and real local SLURM).

    python bench/launch.py [--points-spec ...] [--skip-real]

The real submission uses `--hold` so nothing runs; the jobs are cancelled afterwards. A shim `sbatch` on
PATH counts the calls. Prints figures and writes bench/results/launch.md. A measurement, not a test.
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
    shim.write_text(f"#!/usr/bin/env bash\necho call >> {folder}/calls\nexec {real} \"$@\"\n")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-real", action="store_true", help="dry run only (no SLURM here)")
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
        env = {**os.environ, "PATH": f"{tmp}:{os.environ['PATH']}"}
        seconds = submit(tmp / "out", data, "dry", ["launcher.dry_run=true"], env)
        rows.append({"mode": "dry run", "points": 64, "seconds": round(seconds, 2),
                     "sbatch_calls": len(calls.read_text().splitlines()) if calls.exists() else 0})
        print(json.dumps(rows[-1]), flush=True)
        if not args.skip_real:
            seconds = submit(tmp / "out", data, "real", ["+launcher.train.additional_parameters.hold=true",
                                                         "+launcher.eval.additional_parameters.hold=true",
                                                         "+launcher.report.additional_parameters.hold=true"], env)
            manifest = json.loads((tmp / "out" / "sweeps" / "real" / "manifest.json").read_text())
            record = manifest["submissions"][0]
            ids = [g["job_id"] for s in ("train", "eval") for g in record[s]] + [record["report"]["job_id"]]
            subprocess.run(["scancel", *ids], check=False)
            rows.append({"mode": "real local SLURM (held, then cancelled)", "points": len(manifest["points"]),
                         "seconds": round(seconds, 2), "sbatch_calls": len(calls.read_text().splitlines()),
                         "job_ids": ids})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"# submitting a 64-point sweep ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
             f"`python bench/launch.py`)", "", "| mode | points | wall s (whole command) | sbatch calls |",
             "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['points']} | {r['seconds']} | {r['sbatch_calls']} |" for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
