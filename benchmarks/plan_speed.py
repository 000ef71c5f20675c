"""Whole-process time of `cdka plan` (data-free, llama-2-70b) next to `cdka --help`, in one run.

Target (design.md): planning a 70B preset costs at most 1.5x starting the CLI. Default settings read
the presets' shipped Pareto fronts; ``--seed 1`` forces the scoring path (numpy, Monte Carlo spectra).

    python benchmarks/plan_speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], repeats: int) -> float:
    """Median wall time of ``cmd`` over ``repeats`` runs, after one warm-up run."""
    subprocess.run(cmd, check=True, capture_output=True)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cdka = shutil.which("cdka") or sys.exit("cdka is not on PATH: pip install -e . first")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "plan.yaml")
        cases = {
            "cdka --help": [cdka, "--help"],
            "cdka models (a command doing no work)": [cdka, "models"],
            "cdka plan -m llama-2-7b": [cdka, "plan", "-m", "llama-2-7b", "-o", out],
            "cdka plan -m llama-2-70b": [cdka, "plan", "-m", "llama-2-70b", "-o", out],
            "cdka plan -m llama-2-70b -b lora:8": [cdka, "plan", "-m", "llama-2-70b", "-b", "lora:8", "-o", out],
            "cdka plan -m llama-2-70b --seed 1 (scored)": [cdka, "plan", "-m", "llama-2-70b", "--seed", "1", "-o", out],
        }
        times = {name: timed(cmd, args.repeats) for name, cmd in cases.items()}
    base = times["cdka --help"]
    print(f"{'command':<42} {'median s':>9} {'x --help':>9}")
    for name, seconds in times.items():
        print(f"{name:<42} {seconds:>9.3f} {seconds / base:>9.2f}")
    ratio = times["cdka plan -m llama-2-70b"] / base
    print(f"\nplan llama-2-70b / --help = {ratio:.2f} (target <= 1.5): {'met' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
