"""cdka sweep / cdka report: search space, proxy scaling, storages, an end-to-end sweep, NaN, seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdka_search.errors import SweepError

# A tiny LLaMA-shaped config: q/o 64x64, k/v 32x64 (2 kv heads), gate/up 128x64, down 64x128.
TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
    "architectures": ["LlamaForCausalLM"],
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder / "config.json"


def _config(tmp_path: Path, model: Path, **changes):
    from cdka_search.sweep.study import SweepConfig

    base = dict(model=str(model), budget="lora:4", trials=4, steps=12, storage=f"sqlite:///{tmp_path / 's.db'}",
                study="t", seed=0, output=tmp_path / "best.yaml")
    base.update(changes)
    return SweepConfig(**base)


# search space ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "budget"), [("llama-2-7b", "0.5%"), ("mixtral-8x7b", "lora:2"), ("qwen3-30b-a3b", "0.5%")])
def test_space_never_exceeds_budget_and_starts_from_the_heuristic_plan(model, budget):
    """MoE included: an expert group pays for every expert (its choices were once capped E times too
    high, and the largest choices of a gpt-oss sweep's trial went over the budget)."""
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec
    from cdka_search.sweep.space import build_space, choice_label

    spec = load_spec(model)
    space = build_space(spec, budget)
    heuristic = make_plan(spec, budget)
    assert [g.count for g in space.groups] == [hg.count * hg.experts for hg in heuristic.groups]
    largest = {g.param: max(g.labels, key=lambda label: g.design(label).design.params) for g in space.groups}
    assert space.plan_for({**largest, "alpha": 64.0}).used_params <= space.budget.limit
    assert [g.design for g in space.heuristic.groups] == [g.design for g in heuristic.groups]
    worst = sum(g.count * max(c.design.params for c in g.choices) for g in space.groups)
    assert worst <= space.budget.limit  # every combination of choices fits
    for g, hg in zip(space.groups, heuristic.groups):
        assert g.labels[0] == choice_label(hg.design)
        assert len(set(g.labels)) == len(g.labels)
        assert any(c.design.is_lora for c in g.choices)  # LoRA stays in the comparison
        assert all(c.design.m2 <= c.design.m1 and c.design.n1 <= c.design.n2 for c in g.choices[1:])
    plan = space.plan_for(space.heuristic_params(1e-3))
    assert plan.used_params == heuristic.used_params and plan.adapter.alpha == heuristic.adapter.alpha


def test_plan_for_refuses_a_plan_over_budget():
    from dataclasses import replace

    from cdka_search.budget import Budget
    from cdka_search.spec import load_spec
    from cdka_search.sweep.space import build_space

    space = build_space(load_spec("gpt2"), "0.5%")
    tight = replace(space, budget=Budget("tight", space.heuristic.used_params - 1))
    with pytest.raises(SweepError, match="over the budget"):
        tight.plan_for(space.heuristic_params(1e-3))


# proxy task -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        # docs/sweep.md's example sizes.
        ("balanced", {(4096, 4096): (512, 512), (11008, 4096): (688, 512), (4096, 11008): (512, 688)}),
        # The default's designs include r1 = 64 on 11008 x 4096 and r2 = 64 on 4096 x 11008, so those
        # sides must be multiples of 64: 2752 = 64 * 43.
        ("rank", {(4096, 4096): (512, 512), (11008, 4096): (2752, 512), (4096, 11008): (512, 2752)}),
    ],
)
def test_proxy_scaling_keeps_every_design_structure(objective, expected):
    from cdka_search.spec import load_spec
    from cdka_search.sweep.space import build_space
    from cdka_search.sweep.tasks.proxy import scale_design, scaled_shape

    space = build_space(load_spec("llama-2-7b"), "0.5%", objective=objective)
    for shape, designs in space.designs_by_shape().items():
        small = scaled_shape(shape, designs)
        assert small == expected[shape]
        for d in designs:
            s = scale_design(d, small)
            assert (s.r1, s.r2, s.r) == (d.r1, d.r2, d.r)
            assert min(s.m1, s.n1) == min(d.m1, d.n1) and min(s.m2, s.n2) == min(d.m2, d.n2)
            assert s.rank_bound == min(d.rank_bound, *small)


def test_synthetic_update_has_the_documented_spectrum():
    import torch

    from cdka_search.scoring import SPECTRUM_BETA
    from cdka_search.sweep.tasks.proxy import synthetic_update

    m = synthetic_update(96, 64, torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(m)
    assert float(m.norm()) == pytest.approx(1.0)
    assert torch.linalg.matrix_rank(m) == 64  # full rank
    expected = torch.arange(1, 65, dtype=torch.float64) ** -SPECTRUM_BETA
    assert torch.allclose(s, expected / expected.norm(), atol=1e-9)  # the measured power law


# storages -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, expected",
    [
        (None, "sqlite:///cdka-sweep.db"),
        ("sqlite:///a.db", "sqlite:///a.db"),
        ("postgresql://u:pw@h/db", "postgresql://u:pw@h/db"),
        ("runs/s.db", "sqlite:///runs/s.db"),
        ("s.journal", "journal:s.journal"),
        ("journal:/tmp/x", "journal:/tmp/x"),
    ],
)
def test_storage_strings(given, expected):
    from cdka_search.sweep.storage import normalise

    assert normalise(given) == expected


def test_storage_errors_are_one_line_and_hide_passwords():
    from cdka_search.sweep.storage import normalise, open_storage, redact

    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    with pytest.raises(SweepError, match="not understood"):
        normalise("whatever")
    with pytest.raises(SweepError, match="does not exist"):
        open_storage("sqlite:////no/such/folder/x.db")


# end to end -----------------------------------------------------------------------------------------------
def test_tiny_sweep_end_to_end_then_report(cli, tmp_path, tiny_config):
    from cdka_search.plan import load_plan

    db = f"sqlite:///{tmp_path / 'e2e.db'}"
    out = tmp_path / "best.yaml"
    res = cli("sweep", "-m", str(tiny_config), "-b", "lora:4", "--trials", "6", "--steps", "20",
              "--storage", db, "--study", "e2e", "-o", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["summary"]
    assert summary["complete"] + summary["pruned"] == 6
    assert summary["best_value"] <= summary["trial0_value"]
    assert summary["improvement"] == pytest.approx(summary["trial0_value"] - summary["best_value"])
    plan = load_plan(out)
    assert plan.sweep.study == "e2e" and plan.sweep.best_value == pytest.approx(summary["best_value"])
    assert plan.sweep.trial0_value == pytest.approx(summary["trial0_value"])
    assert plan.sweep.improvement == pytest.approx(summary["improvement"])
    assert plan.used_params <= plan.budget_limit
    assert plan.adapter.alpha == pytest.approx(summary["best_alpha"])
    assert not list(tmp_path.glob(".best.yaml.*"))  # no temporary file left behind

    res = cli("report", "--storage", db, "--study", "e2e", "--out", str(tmp_path / "plots"), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["trials"]) == 6 and report["best_value"] == pytest.approx(summary["best_value"])
    for name in ("history.png", "params.png", "choices.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_rerun_with_more_trials_resumes_and_other_settings_are_refused(tmp_path, tiny_config):
    from cdka_search.sweep.study import run_sweep

    first = run_sweep(_config(tmp_path, tiny_config, trials=3))
    again = run_sweep(_config(tmp_path, tiny_config, trials=3))
    assert again.ran_here == 0 and again.best_value == first.best_value  # already done: nothing re-run
    more = run_sweep(_config(tmp_path, tiny_config, trials=5))
    assert more.ran_here == 2 and more.best_value <= first.best_value
    with pytest.raises(SweepError, match="other settings"):
        run_sweep(_config(tmp_path, tiny_config, trials=6, budget="lora:2"))


def test_seeded_single_process_sweep_is_reproducible(tmp_path, tiny_config):
    import optuna

    from cdka_search.sweep.study import run_sweep

    histories = []
    for name in ("a", "b"):
        run_sweep(_config(tmp_path, tiny_config, trials=5, storage=f"sqlite:///{tmp_path / name}.db", seed=3, output=None))
        study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / name}.db")
        histories.append([(t.state, t.params, t.value, t.intermediate_values) for t in study.trials])
    assert histories[0] == histories[1]


def test_nan_loss_prunes_that_trial_with_its_reason_and_the_study_goes_on(tmp_path, tiny_config, monkeypatch):
    import optuna

    from cdka_search.sweep.study import run_sweep
    from cdka_search.sweep.tasks.proxy import ProxyTask

    real_run = ProxyTask.run
    calls = {"n": 0}

    def sometimes_nan(self, plan, lr, report):
        calls["n"] += 1
        if calls["n"] in (2, 4):  # poison the target: the very first loss is NaN
            key = next(iter(self.problems))
            saved = self.problems[key].y_pool.clone()
            self.problems[key].y_pool[:] = float("nan")
            try:
                return real_run(self, plan, lr, report)
            finally:
                self.problems[key].y_pool.copy_(saved)
        return real_run(self, plan, lr, report)

    monkeypatch.setattr(ProxyTask, "run", sometimes_nan)
    result = run_sweep(_config(tmp_path, tiny_config, trials=5))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 's.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == 2 and all("non-finite loss at step 1" in t.user_attrs["pruned_reason"] for t in pruned)
    assert result.complete == 3 and result.failed == 0


def test_every_trial_nan_is_one_error_line(cli, tmp_path, tiny_config, monkeypatch):
    from cdka_search.sweep.tasks import NonFiniteLoss
    from cdka_search.sweep.tasks.proxy import ProxyTask

    def always_nan(self, plan, lr, report):
        raise NonFiniteLoss("non-finite loss at step 1")

    monkeypatch.setattr(ProxyTask, "run", always_nan)
    out = tmp_path / "best.yaml"
    res = cli("sweep", "-m", str(tiny_config), "-b", "lora:4", "--trials", "2", "--storage",
              f"sqlite:///{tmp_path / 'n.db'}", "-o", str(out))
    assert res.exit_code == SweepError.exit_code
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no finished trial" in errors[0] and "non-finite loss at step 1" in errors[0]
    assert "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--task", "prxy"), "did you mean 'proxy'"),
        (("--storage", "nowhere"), "not understood"),
        (("--task", "lm"), "needs --data"),
        (("--task", "lm", "--data", "d.txt", "-m", "~no-such-user-cdka"), "needs --model to be a local Hugging Face folder"),
        (("--pruner", "asha"), "unknown pruner"),
        (("--trials", "0"), "--trials: 0 is outside [1, 100,000]"),
        (("--seed", "-1"), "--seed: -1 is outside [0, 4,294,967,295]"),
        (("--steps", "0"), "--steps: 0 is outside"),
    ],
)
def test_sweep_errors_are_one_line(cli, tmp_path, args, message):
    res = cli("sweep", "-b", "0.5%", "-o", str(tmp_path / "b.yaml"), *args)
    assert res.exit_code == SweepError.exit_code, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "b.yaml").exists()


def test_report_names_the_studies_when_none_is_chosen(cli, tmp_path, tiny_config):
    from cdka_search.sweep.study import run_sweep

    for name in ("one", "two"):
        run_sweep(_config(tmp_path, tiny_config, trials=1, study=name, output=None))
    res = cli("report", "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert res.exit_code == SweepError.exit_code and "one, two" in res.stderr
    res = cli("report", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study", "three")
    assert res.exit_code == SweepError.exit_code and "no study 'three'" in res.stderr


def test_sweep_modules_import_neither_torch_nor_optuna():
    code = (
        "import sys, cdka_search.sweep, cdka_search.cli.sweeping, cdka_search.cli.app;"
        "bad = [m for m in ('torch', 'optuna', 'matplotlib') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_reference_updates_replace_the_synthetic_target_and_hyperband_runs(tmp_path, tiny_config):
    import torch

    from cdka_search.alignment.reference import save_reference
    from cdka_search.spec import load_spec
    from cdka_search.sweep.space import build_space
    from cdka_search.sweep.study import run_sweep
    from cdka_search.sweep.tasks import TaskOptions
    from cdka_search.sweep.tasks.proxy import ProxyTask

    spec = load_spec(str(tiny_config))
    gen = torch.Generator().manual_seed(0)
    tensors = {t.name: torch.randn(t.d_out, t.d_in, generator=gen) for t in spec.targets}
    ref = save_reference(tensors, tmp_path / "ref.safetensors", "delta")
    task = ProxyTask(TaskOptions(steps=5, reference=ref))
    space = build_space(spec, "lora:4")
    task.prepare(space)
    assert len(task.problems) == len(space.groups)  # one problem per group, each from its own tensor
    first = space.heuristic.groups[0]
    name = sorted(n for n in tensors if first.matches(n))[0]
    expected = tensors[name] / tensors[name].norm()
    got = task.problems[0].target / task.problems[0].target.norm()
    assert torch.allclose(got, expected, atol=1e-6)
    result = run_sweep(_config(tmp_path, tiny_config, trials=3, reference=ref, pruner="hyperband"))
    assert result.complete >= 1


def test_sweep_from_a_recipe_uses_its_space_and_settings(cli, tmp_path):
    from cdka_search.plan import load_plan

    db = f"sqlite:///{tmp_path / 'r.db'}"
    out = tmp_path / "best.yaml"
    res = cli("sweep", "--recipe", "roberta/base_cdka_lora8", "--trials", "2", "--steps", "6",
              "--storage", db, "--study", "rec", "-o", str(out), "--json")
    assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.model_name == "roberta-base" and plan.budget_spec == "lora:8"  # from the recipe
    assert plan.sweep.steps == 6  # typed flags win over the recipe's 200
    import optuna

    study = optuna.load_study(study_name="rec", storage=db)
    alphas = [t.params["alpha"] for t in study.trials]
    assert alphas[0] == 64 and all(16 <= a <= 128 for a in alphas)  # the recipe's alpha choices span 16..128


def test_the_lora_choice_can_take_the_whole_budget_above_rank_64():
    """3% of LLaMA-2-7B buys LoRA of rank 78 on every matrix: the sweep's LoRA alternative must be able to
    reach it (under the fixed cap of 64 it stopped at rank 64, 18 % short of the budget it competes in)."""
    from cdka_search.spec import load_spec
    from cdka_search.sweep.space import build_space

    space = build_space(load_spec("llama-2-7b"), "3%")
    lora = [c.design for g in space.groups for c in g.choices if c.design.is_lora]
    assert lora and max(d.r for d in lora) > 64
    worst = sum(g.count * max(c.design.params for c in g.choices) for g in space.groups)
    assert worst <= space.budget.limit
