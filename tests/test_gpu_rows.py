"""benchmarks/gpu_rows.py, the prepared run of the GPU rows: its CPU smoke size end to end, and its refusal
where the device it is asked for is absent."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_rows.py"


def test_the_smoke_run_reports_every_step_with_its_time_and_writes_the_report(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "gpu_rows.txt").read_text()
    assert report.startswith("# python benchmarks/gpu_rows.py --device cpu --smoke: torch ")
    for step in ("(alignment_speed.py): ", "(scale.py): ", "(adapter_speed.py): "):
        line = next(line for line in report.splitlines() if step in line)
        assert line.endswith(" s") and float(line.rsplit(": ", 1)[1].removesuffix(" s")) > 0
    assert "all 84 pairs" in report  # the energies' table, 64 x 96
    assert "plan --reference 64x96" in report and "max energy error" in report
    assert "cdka (2,8,4)" in report


def test_an_absent_cuda_device_is_one_line_and_exit_2():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: --device cuda: torch sees no CUDA device here; run it where one is, or with --smoke\n"
