"""`cdka probe`: write a reference-update file for data-aware planning (torch ring)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdka_search.cli.common import DeviceOpt, TargetsOpt, guarded, output_option
from cdka_search.documents import printable
from cdka_search.errors import ReferenceFileError
from cdka_search.fileio import check_output

app = typer.Typer()


@app.command()
@guarded
def probe(
    output: Annotated[Path, output_option("Reference file to write (.safetensors).")] = Path("reference.safetensors"),
    delta: Annotated[
        Optional[tuple[Path, Path]], typer.Option("--delta", help="BASE FINETUNED: two .safetensors files or HF folders.")
    ] = None,
    grad: Annotated[Optional[Path], typer.Option("--grad", help="A local Hugging Face causal-LM folder.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Local .txt, .jsonl or .json (text, prompt/completion or messages) for --grad.")] = None,
    targets: TargetsOpt = "all-linear",
    batches: Annotated[int, typer.Option(help="Batches of gradient to accumulate.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    device: DeviceOpt = "auto",
) -> None:
    """Measure reference updates (checkpoint deltas or gradients) for `cdka plan --reference`.

    Examples:

      cdka probe --delta base/ finetuned/ -o delta.safetensors

      cdka probe --grad ./my-llama --data train.jsonl --batches 16 -o grad.safetensors

      cdka probe --grad ./my-llama --data train.jsonl --device cuda -o grad.safetensors

      cdka plan -m ./my-llama -b 0.5% --reference grad.safetensors
    """
    check_output(output)
    if (delta is None) == (grad is None):
        raise ReferenceFileError("give exactly one of --delta BASE FINETUNED or --grad MODEL_DIR --data FILE")
    if grad is not None:  # checked before torch is imported
        from cdka_search.textdata import check_data_name, check_grad_inputs

        if data is None:
            raise ReferenceFileError("--grad needs --data FILE (a local .txt, .jsonl or .json)")
        check_data_name(data)
        check_grad_inputs(grad, batches=batches, batch_size=batch_size, seq_len=seq_len)
    from cdka_search.alignment.energy import squared_norm
    from cdka_search.alignment.probe import probe_delta, probe_gradients
    from cdka_search.alignment.reference import save_reference

    if delta is not None:
        tensors, kind = probe_delta(*delta, targets=targets), "delta"
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("gradients", total=batches)
            tensors = probe_gradients(
                grad, data, targets=targets, batches=batches, batch_size=batch_size, seq_len=seq_len, device=device,
                progress=lambda i, n: bar.update(task, completed=i, total=n or batches),
            )
        kind = "gradient"
    written = save_reference(tensors, output, kind)
    energy = sum(squared_norm(t) for t in tensors.values())
    typer.echo(f"{printable(str(written))}: {kind} reference for {len(tensors)} modules (total energy {energy:.4g})")
