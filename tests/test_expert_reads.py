"""The layout of experts modules without transformers' mark, watched on their forward, and the adapter's
whole-stack read (``bmm`` over an (experts, rows, d_in) batch), checked against torch.kron."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from cdka_search.adapter import adapter_modules, apply_plan  # noqa: E402
from cdka_search.candidates import Design  # noqa: E402
from cdka_search.errors import PlanError  # noqa: E402
from cdka_search.plan import Plan, PlanGroup  # noqa: E402
from cdka_search.spec import spec_from_module  # noqa: E402
from cdka_search.spec.torch_module import expert_layout  # noqa: E402

E, D, H = 4, 8, 12  # experts, model width, expert width
F64 = torch.float64


class Stacked(nn.Module):
    """An up and a down stack read by one bmm each over all experts, in either storage."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        up, down = ((E, D, H), (E, H, D)) if transposed else ((E, H, D), (E, D, H))
        self.up = nn.Parameter(torch.randn(up, dtype=F64) * 0.3)
        self.down = nn.Parameter(torch.randn(down, dtype=F64) * 0.3)

    def forward(self, x):
        x = x.view(E, -1, D)
        if self.transposed:
            return torch.bmm(torch.tanh(torch.bmm(x, self.up)), self.down).view(-1, D)
        return torch.bmm(torch.tanh(torch.bmm(x, self.up.transpose(1, 2))), self.down.transpose(1, 2)).view(-1, D)


class PerExpert(nn.Module):
    """Reads expert e as F.linear(x, W[e]): (E, d_out, d_in)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(E, H, D, dtype=F64))

    def forward(self, x):
        return torch.cat([nn.functional.linear(x[e::E], self.up[e]) for e in range(E)])


class Elementwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(E, D, D, dtype=F64))

    def forward(self, x):
        return x * self.up.sum()


class BothWays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(E, D, D, dtype=F64))

    def forward(self, x):
        x = x.view(E, -1, D)
        return torch.bmm(torch.bmm(x, self.up), self.up.transpose(1, 2))


class TwoInputs(Stacked):
    def forward(self, x, sizes):
        return super().forward(x)


class WithBuffer(Stacked):
    def __init__(self) -> None:
        super().__init__(True)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize(("module", "layout"), [
    (Stacked(True), True), (Stacked(False), False), (PerExpert(), False),
    (Elementwise(), None),  # a stack used other than by a product
    (BothWays(), None),  # read both ways: no single layout
    (TwoInputs(True), None),  # the forward does not run on the hidden states alone
    (WithBuffer(), None),  # state a forward could change: not run
])
def test_layout_is_what_the_forward_does(module, layout):
    assert expert_layout(module) is layout


def test_the_watch_runs_no_forward_on_a_module_with_state_and_draws_no_random_numbers():
    module, stacked = WithBuffer(), Stacked(True)
    before = {name: (p, p.detach().clone()) for name, p in stacked.named_parameters()}
    state = torch.random.get_rng_state()
    assert expert_layout(module) is None and module.calls.item() == 0
    assert expert_layout(stacked) is True
    assert torch.equal(torch.random.get_rng_state(), state)
    # the forward ran on meta copies put in place for the call: the module holds its own tensors again
    for name, p in stacked.named_parameters():
        assert p is before[name][0] and p.device.type == "cpu" and torch.equal(p, before[name][1])


def test_the_watch_computes_nothing():
    """The watched forward multiplies meta copies of the stacks (a real 100B-parameter model's would cost
    seconds a layer): every product it runs is on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("bmm", "mm")):
                self.seen.append({a.device.type for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    stacked = Stacked(True)
    with Devices() as devices:
        assert expert_layout(stacked) is True
    assert devices.seen and all(d == {"meta"} for d in devices.seen)


def _kron(adapter) -> torch.Tensor:
    """(E, d_out, d_in) from torch.kron, expert by expert."""
    return torch.stack([sum(torch.kron(adapter.cdka_B[e, i], adapter.cdka_A[e, i]) for i in range(adapter.r))
                        for e in range(adapter.experts)]) * adapter.scaling


class Holder(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = Stacked(transposed)

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("transposed", [True, False])
def test_whole_stack_reads_match_materialised_kron_and_merge(transposed):
    """Both stacks planned in (d_out, d_in) orientation whatever their storage; the adapted forward and
    its gradients equal the model with W + dW (transposed back where stored so) in float64."""
    torch.manual_seed(0)
    model = Holder(transposed)
    spec = spec_from_module(model)
    assert {(t.name, t.shape, t.experts, t.transposed) for t in spec.targets} == {
        ("experts.up", (H, D), E, transposed), ("experts.down", (D, H), E, transposed)}
    plan = Plan("stacked", "test", 10**4, "test", 10**4, (
        PlanGroup(("experts.up",), (H, D), 1, Design(6, 2, 2, 4, 2), "experts", experts=E),
        PlanGroup(("experts.down",), (D, H), 1, Design(4, 3, 2, 4, 2), "experts", experts=E)))
    base = Holder(transposed)
    base.load_state_dict(model.state_dict())
    apply_plan(model, plan, dtype="float64")
    adapters = adapter_modules(model)
    with torch.no_grad():
        for a in adapters.values():
            a.cdka_B.normal_(std=0.2)
    x = torch.randn(3 * E, D, dtype=F64)
    with torch.no_grad():
        plain = base(x)
        for name, a in adapters.items():
            dw = _kron(a)
            getattr(base.experts, name.rsplit(".", 1)[-1]).add_(dw.transpose(1, 2) if transposed else dw)
    got, want = model(x), base(x)
    assert (want - plain).abs().max() > 1e-3  # the update is not negligible
    assert (got - want).abs().max() < 1e-12
    got.square().sum().backward()
    assert all(a.cdka_A.grad is not None and a.cdka_A.grad.abs().max() > 0 for a in adapters.values())
    for a in adapters.values():
        a.merge()
    with torch.no_grad():
        assert (model(x) - want).abs().max() < 1e-12


def test_a_whole_stack_product_broadcast_over_experts_is_refused_by_name():
    """One batch multiplied by every expert (matmul broadcasting (1, T, d_in) against the stack) is not
    a read the adapter can split by expert: a PlanError naming the stack, not a silently wrong update."""
    model = Holder(True)
    plan = Plan("stacked", "test", 10**4, "test", 10**4, (
        PlanGroup(("experts.up",), (H, D), 1, Design(H, 1, 1, D, 1), "experts", experts=E),))
    apply_plan(model, plan, dtype="float64")
    stacked = model.experts.base_layer
    stacked.forward = lambda x: torch.matmul(x.view(1, -1, D), stacked.up)
    with pytest.raises(PlanError, match=r"Stacked\.up: the experts forward multiplies a batch of 1 by its 4 experts"):
        model(torch.randn(2 * E, D, dtype=F64))
