"""How fast, and in how little memory, does `cdka` reject each class of hostile input (issue 11)?

Every case runs `cdka ...` as its own process on a file made here and prints one row: the class,
the case, the exit code, the wall time and the process's peak resident memory (ru_maxrss, which
includes the Python interpreter and cdka's imports), and whether it stayed within the targets of
2 s and 200 MB. Exit status 1 if any case exits 0, shows a traceback, or misses a target.

Run:  python benchmarks/hostile_inputs.py
      python benchmarks/hostile_inputs.py --only 1 6     (some classes)
      python benchmarks/hostile_inputs.py --only 1 3 6 9 19 --ignore-targets    (the suite's smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CDKA = [sys.executable, "-c", "from cdka_search.cli.app import main; main()"]
SECONDS, MEGABYTES = 2.0, 200.0
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}


def header(path: Path, body: bytes, data_bytes: int = 0) -> Path:
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        fh.truncate(8 + len(body) + data_bytes)
    return path


def entry(shape, dtype="F32", begin=0) -> dict:
    size = {"F32": 4, "F16": 2}[dtype]
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n * size]}


def laughs() -> str:
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(12):
        text += f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n"
    return text


WIDE = """
import struct, sys
def wide(size):
    return b"{" + b",".join(b'"%d":{}' % i for i in range(size // 6))[: size - 64].rsplit(b",", 1)[0] + b"}"
body = wide(8 * 1024 * 1024)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(body)) + body)
open(sys.argv[2], "wb").write(wide(4 * 1024 * 1024))
"""


def make_slow_inputs(root: Path, storage: str, remote: Path, broken_tok: Path) -> None:
    """A finished one-trial study; a saved tiny model asking for remote code; one with a broken tokenizer."""
    subprocess.run([*CDKA, "sweep", "-m", str(root / "config.json"), "-b", "lora:4", "--trials", "1", "--steps", "5",
                    "--storage", storage, "--study", "s", "-o", str(root / "best.yaml"), "--json"], capture_output=True, check=True)
    subprocess.run([sys.executable, "-c", (
        "import json, sys, transformers; c = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, "
        "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64); "
        "transformers.LlamaForCausalLM(c).save_pretrained(sys.argv[1])"), str(remote)], capture_output=True, check=True)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    subprocess.run(["cp", "-r", str(remote), str(broken_tok)], check=True)
    (broken_tok / "config.json").write_text(json.dumps(config))
    (broken_tok / "tokenizer.json").write_text("{not json")


def cases(root: Path, slow: bool = True) -> list[tuple[str, str, list[str]]]:
    """(class, case, cdka arguments), the files they name made under ``root``; ``slow`` also makes the
    inputs that take seconds to prepare (a finished study, saved models) for classes 12, 14 and 20."""
    (root / "config.json").write_text(json.dumps(TINY))
    valid = subprocess.run([*CDKA, "plan", "-m", str(root / "config.json"), "-b", "lora:4", "-o", str(root / "plan.yaml")],
                           capture_output=True, text=True, check=True)
    del valid
    plan = (root / "plan.yaml").read_text()

    def write(name: str, text: str | bytes) -> str:
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    deep_header = header(root / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    model = root / "index-model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "../../../../etc/passwd"}}))
    listmap = root / "listmap"
    listmap.mkdir()
    (listmap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    huge = header(root / "huge.safetensors", json.dumps({"a.weight": entry([2**21, 2], "F16")}).encode(), 2**23)
    liar = header(root / "liar.safetensors", json.dumps({"a.weight": entry([4096, 4096])}).encode(), 16)
    nan_shape = header(root / "nan.safetensors", b'{"a.weight": {"dtype": "F32", "shape": [NaN, 8], "data_offsets": [0, 256]}}', 256)
    big_dim = header(root / "bigdim.safetensors", json.dumps({"a.weight": entry([2**40, 2**40])}).encode(), 256)
    report_file = root / "taken"
    report_file.write_text("x")
    storage = f"sqlite:///{root / 'study.db'}"
    remote, broken_tok = root / "remote-model", root / "broken-tokenizer"
    (root / "text.txt").write_text("some text\n\nmore text\n")
    if slow:
        make_slow_inputs(root, storage, remote, broken_tok)
    for name, body in (("no-type", {"hidden_size": 8}), ("unknown-type", {"model_type": "no-such-model", "hidden_size": 8})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(body))
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("precious")
    subprocess.run([*CDKA, "plan", "-m", str(root / "config.json"), "-b", "3000", "--family", "lokr", "-o", str(root / "lokr.yaml")],
                   capture_output=True, check=True)
    (root / "r.yaml").write_text("cdka_recipe: 1\nmodel: gpt2\nadapter: {alpha: .nan}\n")
    (root / "dup-recipe.yaml").write_text("cdka_recipe: 1\nmodel: gpt2\nmodel: llama\n")
    # Large files are made by a child process: a child's peak memory (ru_maxrss) counts what it
    # inherits from this process, so this one stays small.
    wide_header, wide_config = root / "wide.safetensors", root / "wide" / "config.json"
    wide_config.parent.mkdir()
    subprocess.run([sys.executable, "-c", WIDE, str(wide_header), str(wide_config)], check=True)
    return [
        ("2 bad values", "8 MB header of empty entries", ["inspect", str(wide_header)]),
        ("2 bad values", "4 MB config.json of {}", ["inspect", str(wide_config)]),
        ("1 deep nesting", "safetensors header [ x 100k", ["inspect", str(deep_header)]),
        ("1 deep nesting", "config.json { x 50k", ["inspect", write("deep-config.json", '{"a":' * 50_000 + "1" + "}" * 50_000)]),
        ("1 deep nesting", "plan YAML [ x 100k", ["validate", write("deep.yaml", "[" * 100_000 + "]" * 100_000)]),
        ("1 deep nesting", "plan JSON { x 50k", ["validate", write("deep.json", '{"a":' * 50_000 + "1" + "}" * 50_000)]),
        ("2 bad values", "header shape NaN", ["inspect", str(nan_shape)]),
        ("2 bad values", "index weight_map a list", ["inspect", str(listmap)]),
        ("2 bad values", "--r 10^12", ["plan", "-m", "gpt2", "--r", "1000000000000", "-o", str(root / "o.yaml")]),
        ("2 bad values", "--seed -1", ["plan", "-m", "gpt2", "--seed", "-1", "-o", str(root / "o.yaml")]),
        ("3 shard paths", "../../../../etc/passwd", ["inspect", str(model)]),
        ("4 huge dimensions", "explain 99999999999999999999x2", ["explain", "--shape", "99999999999999999999x2"]),
        ("4 huge dimensions", "header 2^21 x 2 weight", ["inspect", str(huge)]),
        ("4 huge dimensions", "header 2^40 x 2^40", ["inspect", str(big_dim)]),
        ("6 YAML aliases", "billion laughs plan (1 KB)", ["validate", write("laughs.yaml", laughs())]),
        ("6 YAML aliases", "billion laughs recipe", ["plan", "--recipe", write("laughs-recipe.yaml", laughs()), "-o", str(root / "o.yaml")]),
        ("7 adapter settings", "alpha .nan", ["validate", write("nan.yaml", plan.replace("alpha: 64.0", "alpha: .nan"))]),
        ("7 adapter settings", "recipe alpha .nan", ["plan", "--recipe", str(root / "r.yaml"), "-o", str(root / "o.yaml")]),
        ("8 plan fields", "gap abc, objective foo", ["validate", write("fields.yaml", plan.replace("gap: 0.0", "gap: abc").replace("objective: balanced", "objective: foo"))]),
        ("8 plan fields", "r: 10^30", ["validate", write("r.yaml", plan.replace("  r: 4\n", "  r: 1000000000000000000000000000000\n", 1))]),
        ("9 duplicate keys", "plan", ["validate", write("dup.yaml", "cdka_plan: 1\ncdka_plan: 1\n")]),
        ("9 duplicate keys", "recipe", ["plan", "--recipe", str(root / "dup-recipe.yaml"), "-o", str(root / "o.yaml")]),
        ("11 export", "onto a folder of other files", ["export", str(root / "lokr.yaml"), "--to", "peft", "--out", str(foreign)]),
        ("12 report --out", "onto a file", ["report", "--storage", storage, "--study", "s", "--out", str(report_file)]),
        ("14 probe --grad", "model asks for remote code", ["probe", "--grad", str(remote), "--data", str(root / "text.txt"), "-o", str(root / "r.safetensors")]),
        ("14 probe --grad", "corrupt tokenizer.json", ["probe", "--grad", str(broken_tok), "--data", str(root / "text.txt"), "-o", str(root / "r.safetensors")]),
        ("20 small things", "config.json without model_type", ["inspect", str(root / "no-type")]),
        ("20 small things", "unknown model_type", ["inspect", str(root / "unknown-type")]),
        ("20 small things", "probe --batches -1", ["probe", "--grad", str(remote), "--data", str(root / "text.txt"), "--batches", "-1", "-o", str(root / "r.safetensors")]),
        ("19 header vs file size", "4096x4096 F32 over 16 bytes", ["inspect", str(liar)]),
        ("20 small things", "-b lora:99999999999999999999", ["plan", "-m", "gpt2", "-b", "lora:99999999999999999999", "-o", str(root / "o.yaml")]),
        ("20 small things", "-b 1e400", ["plan", "-m", "gpt2", "-b", "1e400", "-o", str(root / "o.yaml")]),
        ("20 small things", "explain --top 0", ["explain", "--shape", "64x64", "--top", "0"]),
        ("20 small things", "huge plan file (2 MB+)", ["validate", write("big.yaml", "a: " + "x" * (3 * 1024 * 1024))]),
    ]


def run_case(args: list[str]) -> tuple[int, float, float, str]:
    """Exit code, seconds, peak RSS in MB and stderr of one `cdka` process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([*CDKA, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return proc.returncode, seconds, usage.ru_maxrss / 1024, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="Class numbers to run (default: all).")
    parser.add_argument("--ignore-targets", action="store_true",
                        help="Fail only on an exit code 0 or an error that is not one line, not on time or memory (the test suite's smoke run).")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slow = not args.only or bool({"12", "14", "20"} & set(args.only))
        rows = [c for c in cases(root, slow) if not args.only or c[0].split()[0] in args.only]
        print(f"{'class':<24} {'case':<34} {'exit':>4} {'seconds':>8} {'peak MB':>8}  ok")
        for klass, case, cmd in rows:
            code, seconds, mb, err = run_case(cmd)
            one_line = err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
            ok = code != 0 and one_line and (args.ignore_targets or (seconds <= SECONDS and mb <= MEGABYTES))
            failures += not ok
            print(f"{klass:<24} {case:<34} {code:>4} {seconds:>8.2f} {mb:>8.0f}  {'yes' if ok else 'NO: ' + err.strip()[-120:]}")
    if args.ignore_targets:
        print(f"time and memory not checked; every case rejected with one error line: {'yes' if not failures else f'no ({failures})'}")
    else:
        print(f"targets: every case rejected with one error line within {SECONDS:g} s and {MEGABYTES:g} MB; "
              f"{'all met' if not failures else f'{failures} missed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
