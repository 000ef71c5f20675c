"""The embedded offline proxy task: fit a "full fine-tuning" update through the real adapter module.

Per problem (one per distinct target shape; one per group with ``--reference``):

- W0: frozen, entries N(0, 1/d_in), held by an ``nn.Linear`` that :class:`CdkaLinear` wraps.
- dW*: the target update. Synthetic unless a reference is given: U diag(s) V^T with Haar-random U, V and
  the power-law spectrum s_j = j^-beta, beta = SPECTRUM_BETA (0.9: the fit to full fine-tuning deltas
  measured by benchmarks/validity_lm.py --spectra, docs/validity.md); finally
  ||dW*||_F = UPDATE_NORM (0.1) * ||W0||_F. Caveat (measured there): how much of a fixed target a design
  can fit does not rank real fine-tuning, so this task ranks designs by a quantity real training
  contradicts; use ``--task lm`` to settle a plan.
- Inputs x = z diag(sqrt(l_k)) Q^T with z standard normal, Q Haar-random and l_k proportional to 1/k
  (mean 1): an anisotropic covariance whose eigenvalues decay like a power law.
- Loss: ||y - x (W0 + dW*)^T||^2 / ||x dW*^T||^2 per batch, y the CdkaLinear output. The adapter (default
  stabilisation: Kaiming-uniform A, zero B, lambda = alpha / sqrt(r * r2), fp32) trains with AdamW
  (no weight decay, 5 % warm-up, cosine decay) on batches of 64 drawn (seeded) from a pool of 2048 inputs
  made once per problem; the reported error is the relative output
  error ||X (dW - dW*)^T||_F / ||X dW*^T||_F on a fixed held-out batch (1.0 at step 0).
- A trial's value: the mean of the groups' final errors weighted by their base parameters
  (count * d_out * d_in of the real shape), so it does not depend on the trial's own choices.

Scaling (large shapes are shrunk without changing any design's factor structure): a shape's candidate
designs (r1, r2, r) all stay (r1, r2, r); d_out' is the smallest multiple of every candidate's r1 that
is at least min(d_out, MAX_SIDE) (512) and keeps every min(m1, n1) = min(d_out / r1, r2); d_in'
likewise with r2 and min(m2, n2) = min(r1, d_in / r2). So only m1 = d_out / r1 and n2 = d_in / r2
shrink, each design's rank bound r * min(m1, n1) * min(m2, n2) is kept (capped by the smaller side),
and LoRA stays LoRA. LLaMA-2-7B at 0.5 %: every shape -> 512x512 in the `balanced` space; in the
default's, whose designs reach (16,64) and (8,128), 4096x4096 -> 512x512 and the MLP shapes ->
1024x1024. Caveat: a rank bound is a larger share of a small side than of the real one. With
``--reference`` the reference tensor's leading d_out' rows are used (exact: for every r1 dividing
d_out' they are the rows of B's first d_out' / r1 rows) and d_in is kept whole, since no column block
is design-independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from cdka_search.candidates import Design
from cdka_search.errors import ReferenceFileError, SweepError
from cdka_search.matching import ModuleIndex
from cdka_search.scoring import SPECTRUM_BETA
from cdka_search.sweep.tasks import NonFiniteLoss, Report, TaskOptions

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.sweep.space import SearchSpace

UPDATE_NORM = 0.1
MAX_SIDE = 512
BATCH = 64
POOL_ROWS = 2048
EVAL_ROWS = 256
WARMUP = 0.05


def scaled_side(size: int, factors: list[int], keep: list[int], max_side: int = MAX_SIDE) -> int:
    """Smallest D >= min(size, max_side) with every factor f | D and D / f >= k for each (f, k) in
    zip(factors, keep). Each f divides ``size`` and f * k <= size (a design's factor and kept side), so
    D <= size.

    Why a multiple of the factors and not a divisor of ``size``: 11008 = 2^8 * 43 has no divisor between
    256 and 5504 that 128 divides, so a divisor made (8,128,r)'s proxy 1024 x 5504 where 1024 x 1024
    keeps its structure as well, and trials took 2.8x as long."""
    step = math.lcm(*factors)  # 1 for no factors
    least = max([min(size, max_side)] + [f * k for f, k in zip(factors, keep)])
    return -(-least // step) * step


def scaled_out(d_out: int, designs: list[Design], max_side: int = MAX_SIDE) -> int:
    """d_out': every r1 divides it and m1' = d_out' / r1 keeps min(m1, n1) = min(m1, r2)."""
    return scaled_side(d_out, [d.r1 for d in designs], [min(d.m1, d.r2) for d in designs], max_side)


def scaled_shape(shape: tuple[int, int], designs: list[Design], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(d_out', d_in') keeping every design's (r1, r2, r) and its rank-bound factors (module docstring)."""
    d_out, d_in = shape
    inn = scaled_side(d_in, [d.r2 for d in designs], [min(d.r1, d.n2) for d in designs], max_side)
    return scaled_out(d_out, designs, max_side), inn


def scale_design(design: Design, shape: tuple[int, int]) -> Design:
    return Design.from_paper(shape[0], shape[1], design.r1, design.r2, design.r)


def synthetic_update(d_out: int, d_in: int, generator: Any, *, beta: float = SPECTRUM_BETA):
    """U diag(j^-beta) V^T with Haar-random U, V (module docstring), ||.||_F = 1 (float64)."""
    import torch

    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=generator, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -beta
    m = (u * s) @ v.T
    return m / m.norm()


def input_basis(d_in: int, generator: Any):
    """(Q, sqrt(l)) of the anisotropic input covariance Q diag(l) Q^T, l_k ~ 1/k with mean 1."""
    import torch

    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    lam = 1.0 / torch.arange(1, d_in + 1, dtype=torch.float64)
    lam = lam / lam.mean()
    return q, lam.sqrt()


@dataclass
class _Problem:
    """One fitting problem: frozen base layer, target update, input covariance, held-out batch."""

    shape: tuple[int, int]
    base: Any
    target: Any  # dW* (d_out', d_in') float32
    x_pool: Any  # training inputs, z diag(sqrt(l)) Q^T
    y_pool: Any  # x_pool (W0 + dW*)^T
    norm_pool: Any  # ||x dW*^T||^2 per row
    x_eval: Any
    y_eval: Any  # x_eval @ dW*^T


class ProxyTask:
    """The default sweep task (module docstring); deterministic for a given seed and trial parameters."""

    name = "proxy"
    default_lr = 5e-3
    lr_range = (1e-4, 1e-1)
    needs = frozenset()
    takes = frozenset({"reference"})

    def __init__(self, options: TaskOptions, *, max_side: int = MAX_SIDE) -> None:
        if options.steps < 1:
            raise SweepError(f"--steps must be at least 1, got {options.steps}")
        self.options = options
        self.max_side = max_side
        self.batch = options.batch_size or BATCH
        self.problems: dict[Any, _Problem] = {}
        self.key_of: dict[int, Any] = {}  # group index -> problem key
        self.weights: dict[int, float] = {}  # group index -> count * d_out * d_in
        self.shapes: dict[tuple[int, int], tuple[int, int]] = {}

    # preparation ---------------------------------------------------------------------------------------
    def prepare(self, space: "SearchSpace") -> None:
        import torch

        by_shape = space.designs_by_shape()
        references = self._references(space)
        for g in space.groups:
            self.weights[g.index] = float(g.count * g.shape[0] * g.shape[1])
            if references is None:
                key: Any = g.shape
                scaled = scaled_shape(g.shape, by_shape[g.shape], self.max_side)
            else:
                key = g.index
                scaled = (scaled_out(g.shape[0], by_shape[g.shape], self.max_side), g.shape[1])
            self.key_of[g.index] = key
            self.shapes[g.shape] = scaled
            if key in self.problems:
                continue
            target = None if references is None else references[g.index][: scaled[0]].to(torch.float64)
            self.problems[key] = make_problem(scaled, self.options.seed, target)

    def _references(self, space: "SearchSpace") -> dict[int, Any] | None:
        if self.options.reference is None:
            return None
        from cdka_search.alignment.reference import load_reference

        tensors = load_reference(self.options.reference)
        index = ModuleIndex(tensors)
        out = {}
        for g, pg in zip(space.groups, space.heuristic.groups):
            names = index.find_any(pg.modules)
            if not names:
                same = [n for n, t in tensors.items() if tuple(t.shape) == g.shape]
                names = same
            if not names:
                raise ReferenceFileError(
                    f"{self.options.reference}: no tensor for group {g.param} ({g.shape[0]}x{g.shape[1]}); "
                    f"it holds {len(tensors)} tensors, e.g. {next(iter(tensors), 'none')}"
                )
            t = tensors[sorted(names)[0]]
            if tuple(t.shape) != g.shape:
                raise ReferenceFileError(f"{self.options.reference}: {names[0]} is {tuple(t.shape)}, the group is {g.shape}")
            out[g.index] = t
        return out

    # training -----------------------------------------------------------------------------------------
    def run(self, plan: "Plan", lr: float, report: Report) -> float:
        if not self.problems:
            raise SweepError("the proxy task was not prepared")
        group_run = {i: (self.key_of[i], scale_design(g.design, self.problems[self.key_of[i]].shape))
                     for i, g in enumerate(plan.groups)}
        total = sum(self.weights.values())

        def value_of(errors: dict[tuple[Any, Design], float]) -> float:
            return sum(self.weights[i] * errors[k] for i, k in group_run.items()) / total

        def on_report(step: int, errors: dict[tuple[Any, Design], float]) -> None:
            report(step, value_of(errors))

        errors = fit(self.problems, sorted(set(group_run.values()), key=repr), plan.adapter, lr=lr,
                     steps=self.options.steps, seed=self.options.seed, batch=self.batch, every=self.options.every,
                     on_report=on_report)
        return value_of(errors)


def fit(
    problems: dict[Any, _Problem],
    runs_keys: list[tuple[Any, Design]],
    settings: Any,
    *,
    lr: float,
    steps: int,
    seed: int,
    batch: int = BATCH,
    every: int = 0,
    on_report: Callable[[int, dict[tuple[Any, Design], float]], None] | None = None,
) -> dict[tuple[Any, Design], float]:
    """Train one CdkaLinear per (problem key, scaled design) in lockstep; return each final held-out error.

    ``settings`` is a plan's AdapterSettings (alpha, scaling, dropout). Every adapter sees the same batches
    of its problem; one AdamW over all of them is the same as separate ones (their parameters are
    disjoint and AdamW is per parameter). A NaN or infinite loss raises NonFiniteLoss.
    """
    import torch

    from cdka_search.adapter import CdkaLinear

    torch.manual_seed(seed)
    runs: dict[tuple[Any, Design], Any] = {}
    for key, design in runs_keys:
        problem = problems[key]
        layer = CdkaLinear(problem.base, m1=design.m1, n1=design.n1, m2=design.m2, n2=design.n2, r=design.r,
                           alpha=settings.alpha, scaling=settings.scaling, scale=settings.scale,
                           dropout=settings.dropout, dtype="float32")
        gen = torch.Generator().manual_seed(seed * 65_537 + (design.r1 * 1_009 + design.r2 * 101 + design.r) % 65_536)
        layer.reset_parameters(generator=gen)
        runs[(key, design)] = layer
    params = [p for layer in runs.values() for p in (layer.cdka_A, layer.cdka_B)]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
    )
    data_gen = torch.Generator().manual_seed(seed + 17)
    by_problem: dict[Any, list[tuple[Any, Design]]] = {}
    for k in runs:
        by_problem.setdefault(k[0], []).append(k)
    every = every or max(1, steps // 10)
    errors: dict[tuple[Any, Design], float] = {k: 1.0 for k in runs}
    for step in range(1, steps + 1):
        optimiser.zero_grad(set_to_none=True)
        losses = []
        for key, members in by_problem.items():
            p = problems[key]
            rows = torch.randint(0, POOL_ROWS, (batch,), generator=data_gen)
            x, y_star, norm = p.x_pool[rows], p.y_pool[rows], p.norm_pool[rows].sum()
            for k in members:
                losses.append((k, (runs[k](x) - y_star).pow(2).sum() / norm))
        total = torch.stack([loss for _, loss in losses]).sum()
        if not torch.isfinite(total):
            bad = next(k for k, loss in losses if not torch.isfinite(loss))
            raise NonFiniteLoss(f"non-finite loss at step {step} (design {bad[1].label()} on {bad[0]})")
        total.backward()
        optimiser.step()
        schedule.step()
        if step % every == 0 or step == steps:
            errors = held_out_errors(problems, runs)
            if not all(math.isfinite(e) for e in errors.values()):
                raise NonFiniteLoss(f"non-finite held-out error at step {step}")
            if on_report is not None:
                on_report(step, errors)
    return errors


def held_out_errors(problems: dict[Any, _Problem], runs: dict[tuple[Any, Design], Any]) -> dict[tuple[Any, Design], float]:
    """||X (dW - dW*)^T||_F / ||X dW*^T||_F on each problem's held-out batch, through the module."""
    import torch

    out = {}
    with torch.no_grad():
        for k, layer in runs.items():
            p = problems[k[0]]
            delta = layer(p.x_eval) - p.base(p.x_eval)
            out[k] = float((delta - p.y_eval).norm() / p.y_eval.norm())
    return out


def make_problem(shape: tuple[int, int], seed: int, target: Any = None) -> _Problem:
    """The proxy problem of the module docstring for one (scaled) shape; ``target`` replaces dW*."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + shape[0] * 7919 + shape[1])
    return _build_problem(shape, gen, target)


def _build_problem(shape: tuple[int, int], gen: Any, target: Any) -> _Problem:
    import torch

    d_out, d_in = shape
    base = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        base.weight.copy_(w0)
    dw = synthetic_update(d_out, d_in, gen) if target is None else target / target.norm()
    dw = dw * (UPDATE_NORM * float(w0.norm()))
    q, root = input_basis(d_in, gen)
    mix = (root[:, None] * q.T).to(torch.float32)
    x = torch.randn(POOL_ROWS + EVAL_ROWS, d_in, generator=gen, dtype=torch.float32) @ mix
    target32 = dw.to(torch.float32)
    x_pool, x_eval = x[:POOL_ROWS].contiguous(), x[POOL_ROWS:].contiguous()
    with torch.no_grad():
        y_update = x_pool @ target32.T
        y_pool = base(x_pool) + y_update
    return _Problem(shape, base, target32, x_pool, y_pool, y_update.pow(2).sum(1), x_eval, x_eval @ target32.T)
