"""DDP and FSDP2 on 2 CPU processes (gloo, localhost) over dense and expert adapters of a tiny Mixtral.

Each rank trains the same plan on its own batch, first under DDP, then under FSDP2 (fully_shard); both
ranks must end with identical factors, DDP and FSDP2 must agree with each other, and neither may warn
about gradient strides (DDP copies every gradient whose layout differs from its bucket's).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cdka_search.candidates import Design
from cdka_search.plan import PlanGroup

DEADLINE_S = 300
STEPS = 3
WORLD = 2


def _plan():
    from tiny_moe import HIDDEN, LAYERS, expert_plan

    # r = 1 and a LoRA-shaped design: factors with size-1 dimensions, where gradient strides can go astray
    q_proj = PlanGroup(("model.layers.*.self_attn.q_proj",), (HIDDEN, HIDDEN), LAYERS, Design(4, 2, 4, 8, 1))
    o_proj = PlanGroup(("model.layers.*.self_attn.o_proj",), (HIDDEN, HIDDEN), LAYERS, Design(16, 1, 1, 16, 2))
    return expert_plan(q_proj, o_proj, gate_up=Design(6, 4, 4, 4, 1))


def _model():
    from tiny_moe import tiny_moe

    from cdka_search.adapter import apply_plan

    model = tiny_moe("mixtral", seed=0, experts_implementation="grouped_mm")
    apply_plan(model, _plan())
    with torch.no_grad():  # B = 0 at init: start from non-zero updates so every factor gets a gradient
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("cdka_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _train(model, rank: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(100 + rank))
    for _ in range(STEPS):
        optimiser.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimiser.step()


def _factors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("cdka_A", "cdka_B")):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("module.", "", 1)] = full.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    log = Path(out_dir) / f"stderr{rank}.txt"
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)  # C++ warnings bypass Python's
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = DistributedDataParallel(_model())
            _train(ddp, rank)
            ddp_factors = _factors(ddp)

            mesh = init_device_mesh("cpu", (WORLD,))
            sharded = _model()
            for layer in sharded.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
            _train(sharded, rank)
            fsdp_factors = _factors(sharded)
        torch.save({"ddp": ddp_factors, "fsdp": fsdp_factors, "warnings": [str(w.message) for w in caught]},
                   Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears down its gloo pairs while the other still reads from them
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP/FSDP2 workers still running after {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_ddp_and_fsdp2_on_two_cpu_processes_end_with_identical_factors(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))  # the spawned processes import this module and tiny_moe
    try:
        _run_workers(tmp_path)
    except mp.ProcessExitedException as first:
        # Once, a rank of this test died by SIGABRT inside gloo on a busy CI machine (not reproduced in
        # 5 quiet runs): run once more on a new port, and show what the ranks printed if it fails again.
        crashed = "".join((tmp_path / f"stderr{r}.txt").read_text()[-2000:] for r in range(WORLD)
                          if (tmp_path / f"stderr{r}.txt").exists())
        try:
            _run_workers(tmp_path)
        except mp.ProcessExitedException as second:
            raise AssertionError(f"{first}; then {second}; the ranks printed:\n{crashed}") from None
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    stderr = "".join((tmp_path / f"stderr{r}.txt").read_text() for r in range(WORLD))
    initial = _factors(_model())
    names = set(initial)
    assert any(".experts.adapters." in n for n in names) and any("self_attn" in n for n in names)
    for strategy in ("ddp", "fsdp"):
        rank0, rank1 = (r[strategy] for r in results)
        assert set(rank0) == set(rank1) == names, strategy
        for name in names:
            assert torch.equal(rank0[name], rank1[name]), (strategy, name)
            assert not torch.equal(rank0[name], initial[name]), (strategy, name)  # it trained
    for name in names:
        assert torch.allclose(results[0]["ddp"][name], results[0]["fsdp"][name], rtol=1e-4, atol=1e-6), name
    messages = [m for r in results for m in r["warnings"]] + stderr.splitlines()
    assert not [m for m in messages if "stride" in m.lower()], messages
