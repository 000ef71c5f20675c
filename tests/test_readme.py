"""Every `cdka` command and script in README.md's code blocks runs, in order, in a scratch folder.

Placeholders in the README (./my-llama, base/, finetuned/, train.jsonl) are made here as tiny local
models and files; sweeps get `--trials 2 --steps 5` appended (the last flag wins) to stay quick;
benchmarks run with small sizes. The PostgreSQL example uses CDKA_TEST_POSTGRES_URL (.ci/run).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SWEEP_SMOKE = ["--trials", "2", "--steps", "5"]
SCRIPT_SMOKE = {
    "benchmarks/plan_speed.py": ["--repeats", "1"],
    "benchmarks/adapter_speed.py": ["--tokens", "64", "--shapes", "64x96", "--warmup", "0", "--repeats", "1", "--slow-repeats", "1"],
    "benchmarks/alignment_speed.py": ["--shape", "64x96", "--accuracy-shapes", "48x64", "--rounding-shape", "48x64"],
    "benchmarks/scale.py": ["--layers", "2", "4", "--units", "32", "224", "--reference-layers", "1", "--reference-width", "64x96"],
    "benchmarks/gpu_rows.py": ["--smoke"],
    "benchmarks/validity.py": ["--steps", "5", "--seeds", "1", "--shapes", "128x128"],
    "benchmarks/validity_lm.py": ["--smoke"],
    "benchmarks/model_types.py": ["--types", "olmoe"],
    "benchmarks/task_heads.py": ["--tasks", "multiple-choice", "--types", "bert"],
    "examples/train_with_trainer.py": [],
}


def readme_commands() -> list[str]:
    """Commands of README.md: lines of indented blocks and ```bash blocks, and `$ ` lines of output blocks,
    that start with `cdka` or `python <script>`."""
    out, fence = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence is not None and fence not in ("bash", "sh") and not line.startswith("$ "):
            continue
        if fence is None and not line.startswith("    "):
            continue
        text = re.sub(r"\s{2,}#.*$", "", line.strip()).removeprefix("$ ").strip()
        if re.match(r"cdka [a-z][a-z-]*(\s|$)", text) or re.match(r"python (benchmarks|examples)/", text):
            out.append(text)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len([c for c in COMMANDS if c.startswith("cdka ")]) >= 10
    assert any(c.startswith("python benchmarks/") for c in COMMANDS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding what the README's commands refer to, made offline."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128
    )
    model = transformers.LlamaForCausalLM(config)
    for name in ("my-llama", "base"):
        model.save_pretrained(root / name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "finetuned")
    (root / "train.jsonl").write_text("".join(f'{{"text": "example number {i} of a tiny corpus."}}\n' for i in range(200)))
    return root


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("cdka ")])
def test_readme_cdka_command(command, workspace, cli, monkeypatch):
    monkeypatch.chdir(workspace)
    args = shlex.split(command)[1:]
    if "postgresql://" in command:
        url = os.environ.get("CDKA_TEST_POSTGRES_URL")
        if not url:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("CI=true but CDKA_TEST_POSTGRES_URL is not set")
            pytest.skip("set CDKA_TEST_POSTGRES_URL to run the PostgreSQL example")
        args = [url if a.startswith("postgresql://") else a for a in args]
    if args[0] == "sweep":
        args += SWEEP_SMOKE
    result = cli(*args)
    assert result.exit_code == 0, f"{command}\n{result.output}"


def smoke_arguments(args: list[str], smoke: list[str]) -> list[str]:
    """``smoke`` without the options ``args`` switches off (given with no value, as `--layers --units`
    skip scale.py's module and allocation rows): a README command that skips a row keeps skipping it."""
    off = {a for i, a in enumerate(args) if a.startswith("--") and (i + 1 == len(args) or args[i + 1].startswith("--"))}
    out, keep = [], True
    for a in smoke:
        if a.startswith("--"):
            keep = a not in off
        if keep:
            out.append(a)
    return out


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python ")])
def test_readme_script_command(command, workspace):
    args = shlex.split(command)[1:]
    script = args[0]
    assert script in SCRIPT_SMOKE, f"add smoke arguments for {script}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / script), *args[1:], *smoke_arguments(args[1:], SCRIPT_SMOKE[script])],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
