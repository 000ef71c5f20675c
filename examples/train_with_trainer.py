"""Train a Hugging Face causal LM with a CDKA plan and the transformers Trainer.

    # CPU, no download, a few seconds: a tiny LLaMA built from a config, planned on the fly
    python examples/train_with_trainer.py --tiny --steps 20

    # a real model: plan it, then train with a recipe's defaults (AdamW, lr 2e-4, cosine, 3 % warm-up)
    cdka plan --model ./Llama-2-7b-hf --budget lora:8 -o plan.yaml
    python examples/train_with_trainer.py --model ./Llama-2-7b-hf --plan plan.yaml \
        --data train.txt --recipe llama2/7B_cdka_lora8 --steps 1000 --output-dir run/

The script: loads (or builds) the model, reads or makes the plan, ``apply_plan`` swaps every planned
module for a CdkaLinear and freezes everything else, the Trainer trains only the adapter factors, and
``save_adapter`` writes them (with the plan) to ``OUTPUT_DIR/adapter.safetensors``. Load them later with
``cdka_search.adapter.load_adapter(fresh_model, path)``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="A tiny LlamaForCausalLM built from a config (CPU, no download).")
    source.add_argument("--model", type=Path, help="A local Hugging Face model folder (read with local_files_only).")
    p.add_argument("--plan", type=Path, help="A plan from `cdka plan`; without it the model is planned here.")
    p.add_argument("--budget", default="lora:4", help="Budget when planning here (default: lora:4).")
    p.add_argument("--family", default="cdka", help="cdka, lora or lokr, when planning here.")
    p.add_argument("--recipe", help="Take training defaults (lr, weight decay, warm-up, scheduler, batch, length) from a recipe.")
    p.add_argument("--data", type=Path, help="A UTF-8 text file, one example per line (needs --model's tokenizer).")
    p.add_argument("--steps", type=int, default=20, help="Optimiser steps (default 20).")
    p.add_argument("--batch-size", type=int, default=4, help="Per-device batch; accumulation reaches the recipe's effective batch.")
    p.add_argument("--lr", type=float, help="Learning rate (default: the recipe's, else 2e-4; --tiny: 1e-2).")
    p.add_argument("--output-dir", type=Path, default=Path("cdka-trainer-out"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    import transformers

    if args.tiny:
        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        )
        return transformers.LlamaForCausalLM(config), None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.model), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    return model, tokenizer


def get_plan(model, args: argparse.Namespace, recipe=None):
    from cdka_search import plan as plan_io
    from cdka_search.candidates import CandidateSpace
    from cdka_search.planner import make_plan
    from cdka_search.spec import spec_from_module

    if args.plan:
        return plan_io.load_plan(args.plan)
    kwargs: dict[str, Any] = recipe.plan_kwargs() if recipe else {"budget": args.budget, "space": CandidateSpace(family=args.family)}
    if recipe and args.tiny:
        kwargs["budget"] = args.budget  # a 7B recipe's budget means nothing on the tiny model
    return make_plan(spec_from_module(model), **kwargs)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of token ids; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_dataset(args: argparse.Namespace, tokenizer, vocab: int, length: int) -> TokenBlocks:
    if args.data:
        if tokenizer is None:
            raise SystemExit("--data needs --model (its tokenizer)")
        text = args.data.read_text(encoding="utf-8")
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        usable = (len(ids) // length) * length
        if usable == 0:
            raise SystemExit(f"{args.data}: fewer than {length} tokens")
        return TokenBlocks(ids[:usable].view(-1, length))
    # Synthetic and learnable: each block counts up from a random start (mod vocab).
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, vocab, (256, 1), generator=g)
    return TokenBlocks((starts + torch.arange(length)) % vocab)


def build_trainer(args: argparse.Namespace):
    """(trainer, model, plan, apply summary): everything up to trainer.train()."""
    import transformers

    from cdka_search.adapter import apply_plan
    from cdka_search.recipes import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    train = recipe.train if recipe else None
    model, tokenizer = build_model(args)
    plan = get_plan(model, args, recipe)
    summary = apply_plan(model, plan)
    length = 16 if args.tiny else (train.max_length if train else 1024)
    dataset = build_dataset(args, tokenizer, model.config.vocab_size, length)
    effective = train.batch_size if train else args.batch_size
    lr = args.lr or (1e-2 if args.tiny else train.lr if train else 2e-4)
    training = transformers.TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=max(1, math.ceil(effective / args.batch_size)),
        learning_rate=lr,
        weight_decay=train.weight_decay if train else 5e-4,
        warmup_steps=train.warmup_ratio if train else 0.03,  # a float below 1 is a ratio of the steps
        lr_scheduler_type=train.scheduler if train else "cosine",
        optim="adamw_torch",
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=args.tiny or not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset, callbacks=[idle_check()])
    return trainer, model, plan, summary


def idle_check():
    """A Trainer callback that warns, before the first optimiser step, about adapters that got no
    gradient: the model reads their weight directly or does not use them (docs/adapter.md)."""
    import transformers

    from cdka_search.adapter import idle_adapters
    from cdka_search.adapter.model import idle_warning

    class IdleAdapterCheck(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and model is not None and (idle := idle_adapters(model)):
                print(f"warning: {idle_warning(idle)}")

    return IdleAdapterCheck()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from cdka_search.adapter import save_adapter

    args = parse_args(argv)
    trainer, model, plan, summary = build_trainer(args)
    print(f"plan: {len(plan.groups)} groups, {summary.trainable_params:,} trainable of {summary.total_params:,} parameters")
    result = trainer.train()
    path = save_adapter(model, args.output_dir / "adapter.safetensors")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"trained {result.global_step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter written to {path}")
    return {"steps": result.global_step, "losses": losses, "adapter": path, "trainable": summary.trainable_params}


if __name__ == "__main__":
    main()
