"""Data-aware planning over 3-D MoE expert parameters on tiny Mixtral, Qwen3-MoE and DeepSeek-V3 models: delta and
gradient references of (experts, d_out, d_in), their stacked energies, and `cdka probe` then
`cdka plan --reference` with the experts planned."""

from __future__ import annotations

import copy

import pytest
import yaml

from cdka_search.alignment.energy import topr_energies
from cdka_search.alignment.planning import ReferenceScores, stacked_curve
from cdka_search.alignment.probe import probe_delta
from cdka_search.alignment.reference import delta_reference, gradient_reference, load_reference
from cdka_search.candidates import CandidateSpace
from cdka_search.errors import ReferenceFileError
from cdka_search.planner import make_plan, plan_problems
from cdka_search.spec import load_spec, spec_from_module
from tiny_moe import EXPERTS, HIDDEN, LAYERS, MOE_INTERMEDIATE, tiny_moe

torch = pytest.importorskip("torch")

GATE_UP, DOWN = "model.layers.{}.mlp.experts.gate_up_proj", "model.layers.{}.mlp.experts.down_proj"


def expert_names() -> list[str]:
    return [name.format(i) for i in range(LAYERS) for name in (GATE_UP, DOWN)]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "deepseek_v3"])
def checkpoints(request, tmp_path_factory):
    """A tiny MoE saved by save_pretrained (which writes the experts one by one: Mixtral's
    ``block_sparse_moe.experts.0.w1.weight``, Qwen3-MoE's ``mlp.experts.0.gate_proj.weight``), and a
    tuned copy whose layer-1 experts moved; the two models in memory."""
    root = tmp_path_factory.mktemp(request.param)
    base = tiny_moe(request.param)
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts = tuned.model.layers[1].mlp.experts
        experts.gate_up_proj.add_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.1)
        experts.down_proj[2].add_(torch.ones(HIDDEN, MOE_INTERMEDIATE))  # one expert, a rank-1 update
        tuned.model.layers[0].self_attn.o_proj.weight.add_(0.01)
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    (root / "train.txt").write_text("the cat sat on the mat.\n\n" * 40)
    return request.param, root, base, tuned


def test_delta_of_expert_parameters_is_exact(checkpoints):
    """Assembled from the per-expert tensors of the checkpoint, the delta equals the difference of the
    fused (experts, d_out, d_in) parameters transformers loads, exactly."""
    _, root, base, tuned = checkpoints
    deltas = probe_delta(root / "base", root / "tuned")
    spec = load_spec(str(root / "base"))
    assert sorted(deltas) == sorted(t.name for t in spec.targets)
    for name in expert_names():
        want = tuned.get_parameter(name) - base.get_parameter(name)
        assert deltas[name].shape == (EXPERTS, *want.shape[1:]) and deltas[name].dim() == 3
        assert torch.equal(deltas[name], want.detach())
    assert float(deltas[GATE_UP.format(0)].abs().max()) == 0.0  # layer 0's experts did not move
    assert float(deltas[DOWN.format(1)][2].abs().min()) > 0.99  # expert 2 of layer 1 got the all-ones update


def test_delta_refuses_an_unknown_expert_layout(checkpoints, tmp_path):
    _, root, _, _ = checkpoints
    with pytest.raises(ReferenceFileError, match="expert parameter model.layers.0.mlp.experts.up_proj: .* holds neither"):
        delta_reference(root / "base", root / "tuned", ["model.layers.0.mlp.experts.up_proj"],
                        expert_names=["model.layers.0.mlp.experts.up_proj"])


def test_a_fused_expert_tensor_is_read_as_it_is(tmp_path):
    """A checkpoint that stores the fused parameter itself (a state_dict saved as is) gives the same delta."""
    from safetensors.torch import save_file

    base, tuned = tiny_moe("mixtral"), tiny_moe("mixtral", seed=1)
    for model, name in ((base, "a.safetensors"), (tuned, "b.safetensors")):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / name)
    name = GATE_UP.format(1)
    got = delta_reference(tmp_path / "a.safetensors", tmp_path / "b.safetensors", [name], expert_names=[name])[name]
    assert torch.equal(got, (tuned.get_parameter(name) - base.get_parameter(name)).detach())


def test_gradient_reference_of_expert_parameters_matches_autograd():
    model = tiny_moe("mixtral")
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    names = [*expert_names(), "model.layers.0.self_attn.q_proj"]
    grads = gradient_reference(model, [batch, batch], names)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # flags and grads restored
    twin = copy.deepcopy(model).eval()
    (2 * twin(**batch).loss).backward()
    for name in expert_names():
        want = twin.get_parameter(name).grad
        assert grads[name].shape == want.shape == (EXPERTS, *want.shape[1:])
        assert (want.abs().flatten(1).amax(1) > 0).all()  # every expert got tokens and a gradient
        assert torch.allclose(grads[name], want, rtol=1e-4, atol=1e-7)
    q = twin.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(grads["model.layers.0.self_attn.q_proj"], q, rtol=1e-4, atol=1e-7)


def test_stacked_energy_is_the_energy_weighted_mean_of_the_experts():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(3, 24, 16, generator=gen, dtype=torch.float64)
    M[1] *= 3.0
    M[2] = 0.0  # an expert that did not move weighs nothing
    curve = stacked_curve(M, seed=0, device="cpu")(4, 2, 5)
    norms = [float(m.pow(2).sum()) for m in M]
    parts = [topr_energies(m, 6, 2, 4, 8, 5, dtype=torch.float64).tolist() for m in M[:2]]
    want = [(norms[0] * a + norms[1] * b) / sum(norms) for a, b in zip(*parts)]
    assert curve == pytest.approx(want, abs=1e-6)  # the curves run in float32
    assert curve[-1] < 1.0  # a random 24x16 stack is not kept whole by five 6x2 (x) 4x8 components
    # every expert an exact one-component Kronecker product: the stack is kept whole at r = 1
    kron = torch.stack([torch.kron(torch.randn(6, 2, generator=gen), torch.randn(4, 8, generator=gen)) for _ in range(3)])
    assert stacked_curve(kron, seed=0, device="cpu")(4, 2, 2) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_reference_weights_count_the_whole_stack_and_plans_pay_for_every_expert():
    """An expert stack whose experts are exact Kronecker products, carrying most of the energy: the plan
    gives it a design keeping it whole, charges every expert, and checks clean against the model."""
    model = tiny_moe("mixtral")
    spec = spec_from_module(model, "tiny-mixtral")
    gen = torch.Generator().manual_seed(1)
    reference = {t.name: torch.randn((t.experts, *t.shape) if t.kind == "experts" else t.shape, generator=gen) * 1e-3
                 for t in spec.targets}
    name = DOWN.format(1)
    reference[name] = torch.stack([torch.kron(torch.randn(4, 3, generator=gen), torch.randn(4, 4, generator=gen))
                                   for _ in range(EXPERTS)])
    scores = ReferenceScores(spec, reference, CandidateSpace(), "alignment")
    energy = {n: float(t.double().pow(2).sum()) for n, t in reference.items()}
    target = next(t for t in spec.targets if t.name == name)
    same = [t.name for t in spec.targets if t.shape == target.shape]
    mean = sum(energy[n] for n in same) / len(same)  # the stack's whole energy, against its own shape's mean
    assert scores.weights[name] == pytest.approx((target.d_out + target.d_in) * energy[name] / mean)
    # (r1, r2) = (4, 3) keeps it whole: outside the default family's guideline, so every divisor pair
    plan = make_plan(spec, 3000, objective="alignment", reference=reference, space=CandidateSpace(family="every"))
    assert not plan_problems(plan, spec)
    assert plan.used_params <= 3000
    group = next(g for g in plan.groups if g.modules == (name,))
    assert group.experts == EXPERTS and group.params == EXPERTS * group.design.params
    assert group.scores["alignment"] == pytest.approx(1.0, abs=1e-5)


def test_reference_with_a_wrong_expert_shape_is_refused():
    spec = spec_from_module(tiny_moe("mixtral"), "tiny-mixtral")
    reference = {t.name: torch.ones((t.experts, *t.shape) if t.kind == "experts" else t.shape) for t in spec.targets}
    reference[GATE_UP.format(0)] = torch.ones(2 * MOE_INTERMEDIATE, HIDDEN)
    with pytest.raises(ReferenceFileError, match=r"reference model.layers.0.mlp.experts.gate_up_proj is \(24, 16\), "
                                                 r"but the model's expert parameter is 4x24x16"):
        make_plan(spec, 3000, reference=reference)


def test_probe_then_plan_with_experts_from_the_cli(cli, checkpoints, tmp_path):
    _, root, _, _ = checkpoints
    delta, grad = tmp_path / "delta.safetensors", tmp_path / "grad.safetensors"
    targets = len(load_spec(str(root / "base")).targets)
    result = cli("probe", "--delta", str(root / "base"), str(root / "tuned"), "-o", str(delta))
    assert result.exit_code == 0, result.output
    assert f"delta reference for {targets} modules" in result.stdout
    result = cli("probe", "--grad", str(root / "base"), "--data", str(root / "train.txt"), "--batches", "2",
                 "--seq-len", "16", "-o", str(grad))
    assert result.exit_code == 0, result.output
    grads = load_reference(grad)
    assert grads[GATE_UP.format(0)].shape == (EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN)
    assert all(float(grads[n].abs().sum()) > 0 for n in expert_names())
    for ref in (delta, grad):
        plan_file = tmp_path / f"plan-{ref.stem}.yaml"
        planned = cli("plan", "-m", str(root / "base"), "-b", "4000", "--reference", str(ref), "--objective", "alignment",
                      "-o", str(plan_file))
        assert planned.exit_code == 0, planned.output
        groups = yaml.safe_load(plan_file.read_text())["groups"]
        experts = {g["modules"]: g for g in groups if g.get("experts")}
        assert sorted(experts) == sorted(expert_names())  # every expert tensor got its own design
        for g in experts.values():  # one design per tensor, every expert paid for
            design = g["r"] * (g["left"][0] * g["left"][1] + g["right"][0] * g["right"][1])
            assert g["experts"] == EXPERTS and g["count"] == 1 and g["params_each"] == EXPERTS * design
        assert sum(g["count"] * g["params_each"] for g in groups) == yaml.safe_load(plan_file.read_text())["budget"]["used"] <= 4000


def test_probed_expert_gradients_start_a_gradient_aligned_plan():
    """The README's route: a gradient reference (experts included) feeds apply_plan's gradient-aligned init;
    every expert of every adapted expert tensor starts with a non-zero update against the gradient."""
    from cdka_search.adapter import adapter_modules, apply_plan
    from cdka_search.adapter.experts import ExpertAdapter

    model = tiny_moe("mixtral")
    spec = spec_from_module(model, "tiny-mixtral")
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    grads = gradient_reference(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
                               [t.name for t in spec.targets])
    plan = make_plan(spec, "20%", reference=grads, objective="alignment").with_adapter(init="gradient-aligned")
    apply_plan(model, plan, gradients=grads)
    experts = {n: a for n, a in adapter_modules(model).items() if isinstance(a, ExpertAdapter)}
    assert sorted(experts) == sorted(expert_names())
    for name, adapter in experts.items():
        with torch.no_grad():
            dw = torch.stack([sum(torch.kron(adapter.cdka_B[e, i], adapter.cdka_A[e, i]) for i in range(adapter.r))
                              for e in range(EXPERTS)])
        assert (dw.flatten(1).abs().amax(1) > 0).all(), name
        assert float((dw * grads[name]).sum()) < 0, name  # the start points down the probed gradient


def test_transposed_expert_stacks_give_references_in_d_out_d_in_orientation(tmp_path):
    """gpt-oss stores its experts (E, d_in, d_out): a probed delta and gradient come out (E, d_out, d_in),
    as the plan's shapes are, so a square down_proj is never read the wrong way round."""
    base = tiny_moe("gpt_oss")
    tuned = copy.deepcopy(base)
    name = DOWN.format(1)
    with torch.no_grad():
        tuned.get_parameter(name).add_(torch.randn(tuned.get_parameter(name).shape, generator=torch.Generator().manual_seed(4)))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    stored = (tuned.get_parameter(name) - base.get_parameter(name)).detach()
    assert stored.shape == (EXPERTS, MOE_INTERMEDIATE, HIDDEN)
    deltas = probe_delta(tmp_path / "base", tmp_path / "tuned")
    assert torch.equal(deltas[name], stored.transpose(1, 2))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = gradient_reference(base, [batch], [name], transposed_names=[name])
    twin = copy.deepcopy(base).eval()
    twin(**batch).loss.backward()
    want = twin.get_parameter(name).grad.transpose(1, 2)
    assert grads[name].shape == (EXPERTS, HIDDEN, MOE_INTERMEDIATE)
    assert torch.allclose(grads[name], want, rtol=1e-4, atol=1e-7)
