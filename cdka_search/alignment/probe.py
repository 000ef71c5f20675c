"""Reference updates from local checkpoints: checkpoint deltas and accumulated gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cdka_search.alignment.device import resolve_device
from cdka_search.alignment.reference import delta_reference, gradient_reference
from cdka_search.spec import load_spec
from cdka_search.targets import select_targets
from cdka_search.textdata import check_grad_inputs, counted_blocks, load_lm_and_tokens, token_batches

Progress = Callable[[int, "int | None"], None]


def probe_delta(base: str | Path, finetuned: str | Path, *, targets: str = "all-linear") -> dict[str, torch.Tensor]:
    """W_finetuned - W_base for every selected target of ``base``, read tensor by tensor."""
    spec = select_targets(load_spec(str(base)), targets)
    conv1d = [t.name for t in spec.targets if t.kind == "conv1d"]
    experts = [t.name for t in spec.targets if t.kind == "experts"]
    transposed = [t.name for t in spec.targets if t.transposed]
    return delta_reference(base, finetuned, [t.name for t in spec.targets], conv1d_names=conv1d, expert_names=experts,
                           transposed_names=transposed)


def probe_gradients(
    model_dir: str | Path,
    data: str | Path,
    *,
    targets: str = "all-linear",
    batches: int = 8,
    batch_size: int = 4,
    seq_len: int = 128,
    progress: Progress | None = None,
    device: str | torch.device | None = "auto",
) -> dict[str, torch.Tensor]:
    """Gradients of the selected target weights, summed over ``batches`` batches of ``data``; the model
    runs on ``device`` (cdka_search.alignment.device) and the sums stay on the CPU."""
    check_grad_inputs(model_dir, batches=batches, batch_size=batch_size, seq_len=seq_len)
    where = resolve_device(device)
    wanted = batches * batch_size  # blocks: the data past them is neither rendered nor tokenised
    model, tokens = load_lm_and_tokens(model_dir, data, enough=lambda t: counted_blocks(t, seq_len) >= wanted)
    model = model.to(where)
    from cdka_search.spec import spec_from_module

    spec = select_targets(spec_from_module(model, Path(model_dir).name), targets)
    loader = token_batches(tokens, seq_len=seq_len, batch_size=batch_size, limit=batches)
    conv1d = [t.name for t in spec.targets if t.kind == "conv1d"]
    transposed = [t.name for t in spec.targets if t.transposed]
    return gradient_reference(model, loader, [t.name for t in spec.targets], conv1d_names=conv1d,
                              transposed_names=transposed, progress=progress)
