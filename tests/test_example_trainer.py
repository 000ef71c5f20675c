"""examples/train_with_trainer.py on a tiny local LLaMA: a few Trainer steps, finite loss, only adapters move."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_with_trainer.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_with_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--recipe", "llama2/7B_cdka_lora8", "--lr", "1e-2"]])
def test_trainer_trains_only_the_adapter(example, tmp_path, extra):
    from cdka_search.adapter import adapter_modules, load_adapter, save_adapter

    args = example.parse_args(["--tiny", "--steps", "4", "--batch-size", "4", "--output-dir", str(tmp_path), *extra])
    trainer, model, plan, summary = example.build_trainer(args)
    assert summary.trainable_params == plan.used_params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    adapters = {f"{name}.{f}" for name in adapter_modules(model) for f in ("cdka_A", "cdka_B")}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "the adapter did not train"
    assert changed <= adapters, f"base weights moved: {sorted(changed - adapters)[:3]}"
    assert any(n.endswith("cdka_B") for n in changed)  # B starts at zero and moves first

    saved = save_adapter(model, tmp_path / "adapter.safetensors")
    fresh, _ = example.build_model(args)  # same seed: the same base weights
    load_adapter(fresh, saved)
    ids = torch.arange(16).unsqueeze(0)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)


def test_main_runs_end_to_end(example, tmp_path, capsys):
    out = example.main(["--tiny", "--steps", "3", "--output-dir", str(tmp_path), "--family", "lora"])
    assert out["steps"] == 3 and all(math.isfinite(x) for x in out["losses"])
    assert Path(out["adapter"]).is_file()
    assert "trainable" in capsys.readouterr().out
