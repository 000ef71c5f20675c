"""The accelerator rows of the scale benchmarks in one prepared run of at most 5 minutes.

A machine with a GPU is lent rarely and briefly, so its checks are this one command, ready to run:

    python benchmarks/gpu_rows.py [--device cuda] [--out DIR] [--smoke]

Each step runs as its own process under its own time limit (a step that runs over is stopped and
reported, and the next one still runs), and the tables are printed one after another, also to
DIR/gpu_rows.txt:

1. ``alignment_speed.py``: all energies (every divisor pair, r <= 16) of one 4096 x 11008 update on the
   device, bfloat16 passes and float32, with the largest error against an exact float64 SVD on a subset
   of pairs (CPU target: 10 s on 2 cores);
2. ``scale.py``'s reference row: ``plan --reference`` of a LLaMA-2-7B-shaped reference (32 layers, 224
   modules, bfloat16 synthetic updates) with its energies on the device, and their largest error (CPU
   target: 3 min on 2 cores, error <= 1e-3);
3. ``adapter_speed.py``: forward and backward of the adapter on the device against LoRA and LoKr.

cdka need not be installed: the checkout is put on the children's PYTHONPATH, so that a machine whose
``python3`` already holds a CUDA build of torch (and transformers) runs it as it is. ``--smoke`` runs
tiny sizes on the CPU: the suite's run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (label, script, arguments, seconds): the full sizes, within 5 minutes together.
STEPS = (
    ("alignment energies of one update, every pair", "alignment_speed.py", [], 70),
    ("plan --reference of a whole model", "scale.py",
     ["--layers", "--units", "--reference-layers", "32", "--reference-width", "4096x11008", "--reference-dtype", "bfloat16"], 190),
    ("adapter forward + backward", "adapter_speed.py", [], 40),
)
SMOKE = {
    "alignment_speed.py": ["--shape", "64x96"],
    "scale.py": ["--layers", "--units", "--reference-layers", "1", "--reference-width", "64x96"],
    "adapter_speed.py": ["--tokens", "64", "--shapes", "64x96", "--warmup", "0", "--repeats", "1", "--slow-repeats", "1"],
}


def run_step(script: str, arguments: list[str], device: str, seconds: float) -> tuple[bool, str, str]:
    """(whether it finished well, status, output) of one benchmark script run with ``--device device``
    under a time limit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / script), *arguments, "--device", device]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        return False, f"stopped after {seconds:.0f} s (its time limit)", output
    took = time.perf_counter() - start
    if done.returncode:
        return False, f"exit {done.returncode} after {took:.1f} s: {done.stderr.strip()[-300:]}", done.stdout
    return True, f"{took:.1f} s", done.stdout


def machine(device: str) -> str | None:
    """The machine in words, or None where ``device`` is a CUDA device this machine lacks."""
    import torch

    if not device.startswith("cuda"):
        return f"torch {torch.__version__} on the CPU, {os.cpu_count()} cores"
    if not torch.cuda.is_available():
        return None
    return f"torch {torch.__version__} on {torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device of every step (cuda, cuda:N, cpu)")
    parser.add_argument("--out", type=Path, help="also write the report to DIR/gpu_rows.txt")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the suite's run)")
    args = parser.parse_args()
    device = "cpu" if args.smoke else args.device
    where = machine(device)
    if where is None:
        print(f"error: --device {device}: torch sees no CUDA device here; run it where one is, or with --smoke", file=sys.stderr)
        return 2
    lines = [f"# python benchmarks/gpu_rows.py --device {device}{' --smoke' if args.smoke else ''}: {where}"]
    print(lines[0], flush=True)
    failed = False
    for label, script, arguments, seconds in STEPS:
        ok, status, output = run_step(script, SMOKE[script] if args.smoke else arguments, device, seconds)
        failed |= not ok
        block = [f"\n## {label} ({script}): {status}", output.rstrip()]
        print("\n".join(block), flush=True)
        lines += block
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_rows.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
