import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DATA = Path(__file__).parent / "data"


def test_plan_product_owner_example(cli, tmp_path):
    out = tmp_path / "plan.yaml"
    result = cli("plan", "--model", "llama", "--budget", "0.5%", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "model.layers.*.self_attn.q_proj" in result.stdout
    assert "allocation: exact optimum" in result.stdout
    assert "preset llama-2-7b" in result.stderr  # says which preset the alias chose
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["limit"] == 33_692_078
    assert 0.9 * 33_692_078 <= doc["budget"]["used"] <= 33_692_078


def test_plan_is_byte_for_byte_reproducible(cli, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    ra = cli("plan", "-m", "gpt2", "-b", "lora:8", "-o", str(a))
    rb = cli("plan", "-m", "gpt2", "-b", "lora:8", "-o", str(b))
    assert a.read_bytes() == b.read_bytes()
    assert ra.stdout.replace(str(a), "X") == rb.stdout.replace(str(b), "X")


def test_plan_json_output_and_format(cli, tmp_path):
    out = tmp_path / "plan.json"
    result = cli("plan", "-m", "roberta", "-b", "1%", "--format", "json", "-o", str(out), "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["plan"]["model"]["name"] == "roberta-base"
    assert json.loads(out.read_text()) == payload["plan"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-m", "lama-2-7"], 3, "Did you mean: llama-2-7b"),
        (["-b", "half"], 2, "budget 'half' is not understood"),
        (["-b", "0%"], 2, "above 0"),
        (["-b", "101%"], 2, "at most 100"),
        (["-b", "100"], 2, "below the cheapest adapter the candidate space allows"),
        (["-t", "q_porj"], 4, "'q_porj' matches no module"),
        (["--r1", "3"], 4, "must divide"),
        (["--objective", "fastest"], 4, "unknown objective"),
        (["-m", str(DATA / "missing" / "config.json")], 3, "no such file"),
        (["-m", "meta-llama/Llama-2-7b-hf"], 3, "cdka reads no Hugging Face Hub id (it downloads nothing)"),
    ],
)
def test_plan_bad_input_is_one_line_and_no_file(cli, tmp_path, args, code, message):
    out = tmp_path / "plan.yaml"
    result = cli("plan", *args, "-o", str(out))
    assert result.exit_code == code
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", b"{oops", "not a readable JSON config"),
        ("model.safetensors", struct.pack("<Q", 9) + b"not json!", "corrupt safetensors header"),
    ],
)
def test_corrupt_model_files(cli, tmp_path, name, content, message):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / name).write_bytes(content)
    out = tmp_path / "plan.yaml"
    result = cli("plan", "-m", str(bad / name), "-o", str(out))
    assert result.exit_code == 3 and message in result.stderr
    assert not out.exists()


def test_models_lists_presets(cli):
    result = cli("models", "--json")
    rows = json.loads(result.stdout)["rows"]
    assert {r["preset"]: r["total_params"] for r in rows}["llama-2-70b"] == 68_976_648_192
    assert "llama" in {r["preset"]: r["aliases"] for r in rows}["llama-2-7b"]


def test_inspect_shows_targets(cli):
    result = cli("inspect", "llama-2-7b", "--json")
    rows = json.loads(result.stdout)["rows"]
    assert {r["module"]: r["shape_(out_x_in)"] for r in rows}["model.layers.*.mlp.down_proj"] == "4096x11008"
    assert all(r["count"] == 32 for r in rows)
    gpt2 = cli("inspect", str(DATA / "gpt2"), "--targets", "attn")
    assert "c_attn" in gpt2.stdout and "c_fc" not in gpt2.stdout and "conv1d" in gpt2.stdout


def test_explain(cli):
    result = cli("explain", "--shape", "4096x11008", "--params", "70k", "--json")
    rows = json.loads(result.stdout)["rows"]
    assert rows and all(r["params"] <= 70_000 for r in rows)
    assert rows[0]["pareto"] is True
    assert cli("explain", "--shape", "4096by11008").exit_code == 4


def test_explain_states_the_constants_the_scores_use(cli, monkeypatch):
    """The notes under the table once spelled the knee and the spectrum out, so they could drift from scoring."""
    from cdka_search import scoring

    monkeypatch.setattr(scoring, "RANK_KNEE", 0.8)
    monkeypatch.setattr(scoring, "SPECTRUM_BETA", 1.1)
    text = " ".join(cli("explain", "--shape", "256x256", "--params", "5k").stdout.split())
    assert "sqrt(min(capacity, 0.8) * size)" in text and "k^-1.1" in text


@pytest.mark.parametrize("options", [["--device", "cuda:99"], ["--device", "cpu"], ["--all-pairs"]])
def test_reference_options_without_a_reference_are_refused(cli, tmp_path, options):
    """They were accepted and ignored: a plan made as if they had acted."""
    result = cli("plan", "-m", "gpt2", "-b", "lora:4", *options, "-o", str(tmp_path / "plan.yaml"))
    assert result.exit_code == 11
    assert result.stderr.strip() == (
        "error: --device and --all-pairs act on --reference planning only: give --reference FILE or leave them out"
    )
    assert not (tmp_path / "plan.yaml").exists()


def test_inspect_takes_the_model_as_argument_or_option(cli):
    by_argument = cli("inspect", "gpt2", "--json")
    assert by_argument.exit_code == 0
    assert cli("inspect", "--model", "gpt2", "--json").stdout == by_argument.stdout == cli("inspect", "-m", "gpt2", "--json").stdout
    for args in ((), ("gpt2", "-m", "gpt2")):
        refused = cli("inspect", *args)
        assert refused.exit_code == 11
        assert refused.stderr.strip() == "error: give the model once: cdka inspect MODEL or cdka inspect --model MODEL"


def test_validate(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    cli("plan", "-m", "llama-2-7b", "-o", str(plan))
    ok = cli("validate", str(plan), "--model", "llama-2-7b")
    assert ok.exit_code == 0 and "valid plan and matches llama-2-7b" in ok.stdout
    alone = cli("validate", str(plan))  # a preset plan is checked against the preset it names
    assert alone.exit_code == 0 and "valid plan and matches preset llama-2-7b (" in alone.stdout
    beside = tmp_path / "beside.yaml"  # a path written beside the preset is not what is read, nor named
    beside.write_text(plan.read_text().replace("  source: preset\n", f"  source: preset\n  path: {tmp_path / 'gone'}\n", 1))
    named = cli("validate", str(beside))
    assert named.exit_code == 0 and "valid plan and matches preset llama-2-7b (" in named.stdout and "gone" not in named.stdout
    other = tmp_path / "other.yaml"
    other.write_text(plan.read_text().replace("name: llama-2-7b", "name: llama-3-8b", 1))
    wrong = cli("validate", str(other))
    assert wrong.exit_code == 5 and "model.layers.0.self_attn.k_proj: the model's weight is 1024x4096" in wrong.stderr
    bad = cli("validate", str(plan), "--model", "llama-3-8b")
    assert bad.exit_code == 5
    assert "model.layers.0.self_attn.k_proj: the model's weight is 1024x4096" in bad.stderr
    assert "total_params" in bad.stderr
    plan.write_text(plan.read_text().replace("count: 32", "cuont: 32", 1))
    broken = cli("validate", str(plan))
    assert broken.exit_code == 5 and "unknown key 'cuont' (did you mean 'count'?)" in broken.stderr


def test_version_and_help(cli):
    assert cli("--version").stdout.startswith("cdka ")
    help_text = cli("plan", "--help").stdout
    assert "cdka plan --model llama --budget 0.5%" in help_text


def test_data_free_planning_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from cdka_search.cli.app import app\n"
        "try:\n"
        f"    app(['plan', '-m', 'llama-2-70b', '-o', r'{tmp_path / 'p.yaml'}'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'a preset plan reads its shipped fronts'\n"
        "assert 'optuna' not in sys.modules\n"
        "import cdka_search\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_console_script_exit_codes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cdka_search", "plan", "-b", "nope", "-o", str(tmp_path / "x.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: budget 'nope' is not understood; use a percentage (\"0.5%\"), a count (\"20M\", \"1.5B\", \"2e7\", \"20000000\") or \"lora:R\""]


@pytest.mark.parametrize(("args", "line"), [
    (["plan", "--seed", "abc"], "error: Invalid value for '--seed': 'abc' is not a valid int. (see `cdka plan --help`)"),
    (["plan", "--no-such"], "error: No such option: --no-such (see `cdka plan --help`)"),
    (["explain"], "error: Missing option '--shape'. (see `cdka explain --help`)"),
    (["explain", "--shape", "4x4", "--top", "x" * 5000], None),  # a long value is cut, not echoed whole
])
def test_usage_errors_are_one_line_with_the_argument_exit_code(tmp_path, args, line):
    result = subprocess.run([sys.executable, "-m", "cdka_search", *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 11 and result.stdout == ""
    [shown] = result.stderr.splitlines()
    assert shown == line if line else shown.startswith("error: Invalid value for '--top'") and len(shown) < 260
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["plan", "-m", "gpt2", "-o"], ["probe", "--delta", "a.safetensors", "b.safetensors", "-o"],
    ["sweep", "-m", "gpt2", "-o"], ["export", "plan.yaml", "--to", "peft", "-o"],
])
@pytest.mark.parametrize(("value", "why"), [
    ("out/", "'out/' names a folder; give a file name"), ("-", "'-' (standard output) is not written to; give a file name"),
    ("", "is empty; give a file name"),
])
def test_an_output_file_named_as_a_folder_or_stdout_is_refused_before_any_work(tmp_path, args, value, why):
    result = subprocess.run([sys.executable, "-m", "cdka_search", *args, value], capture_output=True, text=True, cwd=tmp_path)
    command = args[0]
    assert result.returncode == 11 and result.stdout == ""
    assert result.stderr == f"error: Invalid value for '--output' / '-o': {why} (see `cdka {command} --help`)\n"
    assert list(tmp_path.iterdir()) == []  # pathlib would have made a file named 'out' or '-'


@pytest.mark.parametrize(("args", "flag"), [
    (["inspect", ""], "--model"), (["inspect", "-m", " "], "--model"), (["plan", "-m", ""], "--model"),
    (["plan", "-t", ""], "--targets"), (["explain", "--shape", "4x4", "--params", ""], "--params"),
    (["report", "--study", ""], "--study"), (["validate", "plan.yaml", "--model", ""], "--model"),
])
def test_an_empty_text_argument_is_refused_by_name(cli, tmp_path, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)  # an empty model name would have read this folder
    result = cli(*args)
    assert result.exit_code == 11 and result.stderr == f"error: {flag} is empty\n" and result.stdout == ""


def test_a_plan_is_written_in_the_format_its_name_is_read_in(cli, tmp_path):
    result = cli("plan", "-m", "gpt2", "-b", "lora:8", "--format", "yaml", "-o", str(tmp_path / "c.json"))
    assert result.exit_code == 5 and list(tmp_path.iterdir()) == []
    assert result.stderr.endswith("c.json: a .json plan is read as JSON; write yaml to another name, or use --format json\n")
    upper = tmp_path / "d.JSON"  # the suffix in any case
    assert cli("plan", "-m", "gpt2", "-b", "lora:8", "-o", str(upper)).exit_code == 0
    assert json.loads(upper.read_text())["model"]["name"] == "gpt2"
    checked = cli("validate", str(upper))
    assert checked.exit_code == 0 and "valid plan" in checked.stdout


def test_a_tensor_name_with_terminal_controls_reaches_tables_and_errors_escaped(cli, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    weights, plan = tmp_path / "odd.safetensors", tmp_path / "plan.yaml"
    save_file({"\u202e\x1b[31m.weight": torch.zeros(8, 8)}, str(weights))  # a right-to-left override and a colour
    shown = cli("inspect", "-m", str(weights))
    assert shown.exit_code == 0 and "\\u202e\\x1b[31m" in shown.stdout and "\x1b" not in shown.stdout
    assert cli("plan", "-m", str(weights), "-b", "50", "--r", "2", "-o", str(plan)).exit_code == 0
    refused = cli("export", str(plan), "--to", "peft", "--out", str(tmp_path / "adapter"))
    assert refused.exit_code == 8 and "\\u202e\\x1b[31m (r = 2)" in refused.stderr
    assert "\x1b" not in refused.stderr and "\u202e" not in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_no_arguments_print_the_help_and_closed_stdout_is_one_line(tmp_path):
    bare = subprocess.run([sys.executable, "-m", "cdka_search"], capture_output=True, text=True)
    assert bare.returncode == 0 and "Usage: cdka [OPTIONS] COMMAND" in bare.stdout and bare.stderr == ""
    closed = subprocess.run([sys.executable, "-m", "cdka_search", "models"], stdout=subprocess.DEVNULL, capture_output=False,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: __import__("os").close(1))
    assert closed.returncode == 10 and closed.stderr == "error: standard output is closed\n"


def test_plan_from_a_recipe_with_a_flag_overriding_it(cli, tmp_path):
    out = tmp_path / "plan.yaml"
    result = cli("plan", "--recipe", "llama2/7B_cdka_lora8", "-o", str(out))
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["spec"] == "lora:8" and doc["budget"]["limit"] == 19_988_480
    assert doc["adapter"]["dropout"] == 0.05  # from the recipe, not the default 0.0
    overridden = cli("plan", "--recipe", "llama2/7B_cdka_lora8", "-b", "1%", "-o", str(out))
    assert overridden.exit_code == 0
    assert yaml.safe_load(out.read_text())["budget"]["spec"] == "1%"
    missing = cli("plan", "--recipe", "llama2/7B_nope", "-o", str(tmp_path / "x.yaml"))
    assert missing.exit_code == 5 and "known recipes: llama2/7B_cdka_lora8" in missing.stderr


@pytest.mark.parametrize("target", ["{tmp}", "/proc/cdka-cannot-write/plan.yaml"])
def test_unwritable_output_is_one_line(cli, tmp_path, target):
    result = cli("plan", "-m", "gpt2", "-o", target.format(tmp=tmp_path))
    assert result.exit_code == 10
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cdka_warnings_are_one_line_and_other_warnings_keep_their_form():
    """A CdkaWarning raised under a command (the lm sweep's idle adapters) is one `warning:` line;
    a warning from another library is shown as Python shows it. (A subprocess: pytest records
    warnings itself.)"""
    import subprocess
    import sys

    script = (
        "import warnings\n"
        "from cdka_search.cli.common import guarded\n"
        "from cdka_search.errors import CdkaWarning\n"
        "@guarded\n"
        "def command():\n"
        "    warnings.warn('2 adapter(s) got no gradient', CdkaWarning, stacklevel=1)\n"
        "    warnings.warn(\"a library's own warning\", FutureWarning, stacklevel=1)\n"
        "    return 7\n"
        "print(command())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout == "7\n"
    err = done.stderr.splitlines()
    assert err[0] == "warning: 2 adapter(s) got no gradient"
    assert "FutureWarning: a library's own warning" in err[1]


def test_a_link_that_leads_nowhere_is_named_as_one(cli, tmp_path):
    """A symlink loop (or a link to a missing file) used to be reported as "no such file", which its
    name in a listing belies."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "gone").symlink_to(tmp_path / "missing.yaml")
    for args, code in ((("validate", str(tmp_path / "a")), 5), (("inspect", "-m", str(tmp_path / "a")), 3),
                       (("validate", str(tmp_path / "gone")), 5)):
        result = cli(*args)
        assert result.exit_code == code and result.stderr.count("\n") == 1
        assert result.stderr.startswith("error: ") and result.stderr.endswith(": a link that leads to nothing (a missing file or a loop)\n")
    assert cli("validate", str(tmp_path / "none.yaml")).stderr == f"error: {tmp_path / 'none.yaml'}: no such plan file\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_named_in_one_line(tmp_path):
    """Writing the table to a full device said only "No space left on device"."""
    with open("/dev/full", "w") as full:
        for args in (["models"], ["models", "--json"], ["plan", "-m", "gpt2", "-b", "lora:8", "-o", str(tmp_path / "p.yaml")]):
            result = subprocess.run([sys.executable, "-m", "cdka_search", *args], stdout=full, stderr=subprocess.PIPE, text=True)
            assert result.returncode == 10 and result.stderr.endswith("error: standard output: No space left on device\n")


@pytest.mark.parametrize(("args", "line"), [
    (["--data", "notes.txt"], "error: --task proxy does not read --data; it is for --task lm"),
    (["--task", "lm", "--data", "notes.txt", "--reference", "ref.safetensors"],
     "error: --task lm does not read --reference; it is for --task proxy"),
])
def test_a_sweep_input_file_its_task_does_not_read_is_refused_not_ignored(cli, tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    result = cli("sweep", "-m", "gpt2", "--trials", "1", "--steps", "1", *args)
    assert result.exit_code == 7 and result.stderr == line + "\n"
    assert list(tmp_path.iterdir()) == []  # checked before any file is read or storage opened
