"""Every causal-LM model_type of the installed transformers, planned and adapted from its default config.

Per type, in a child process of its own (a type that crashes or runs out of memory costs one row):
- plan: `make_plan` of the type's default config (built on the meta device) at ``--budget``;
  "refused" rows print cdka's one error line (mostly transformers failing to build its own default);
- used: the share of the budget the plan spends; allocation: "exact", or the certified gap to the LP bound;
- total: "yes" where the spec's total equals the built model's parameter count, else the difference
  (BERT and RoBERTa: the built-in family counts the encoder with its pooler, as fine-tuned for
  classification; the causal-LM class has an LM-head transform instead, and transformers' default
  configs differ from the family's);
- trainable: whether `apply_plan` on the meta model makes exactly ``plan.trained_params`` trainable (the adapters, and a task model's new head);
- experts (``--numerics``): for types with 3-D expert stacks, a shrunk copy (2 layers, or one of each kind in
  a hybrid; 4 experts, top-2; vocabulary 4,096) is built on CPU, its experts adapted with random factors, and the largest gap
  between the adapted forward and the merged model's forward is printed with the largest logit, then
  whether the adapter changed the output at all ("inert" when routing sends no token to an expert).

    python benchmarks/model_types.py [--types mixtral llama ...] [--budget 0.5%] [--numerics]
                                     [--max-params 2e9] [--timeout 400] [--jobs 1]

It exits 1 when a trainable count is wrong, an allocation is certified only above 1e-4, or an adapted
forward differs from the merged one by more than 1e-4 of the largest logit or fails where transformers'
own forward runs. It downloads nothing:
configs are transformers' defaults. A full run over about 200 types takes about an hour on 2 cores,
more with --numerics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHRINK_MAX = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
              "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "num_hidden_layers": 2, "num_layers": 2,
              "n_group": 1, "topk_group": 1, "zero_expert_num": 0, "first_k_dense_replace": 0, "vocab_size": 4096}


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def shrink(config) -> None:
    """Fewer layers, experts and tokens, in place; hybrid layer_types lists are cut to match."""
    for part in (config, getattr(config, "text_config", None)):
        if part is None:
            continue
        for key, most in SHRINK_MAX.items():
            value = getattr(part, key, None)
            if isinstance(value, int) and value > most or (key == "num_experts_per_tok" and hasattr(part, key) and value is None):
                setattr(part, key, most)
        if isinstance(getattr(part, "mlp_only_layers", None), list):  # dense layers first (Qwen-MoE style)
            part.mlp_only_layers = []
        # One layer of each kind (attention x MLP, from layer_types and mlp_layer_types): a hybrid stays hybrid.
        per_layer = [k for k, v in vars(part).items() if k.endswith("layer_types") and isinstance(v, list) and v]
        kinds = list(dict.fromkeys(zip(*(getattr(part, k) for k in per_layer), strict=False)))
        try:
            for i, key in enumerate(per_layer):
                setattr(part, key, [kind[i] for kind in kinds])
            if kinds:
                part.num_hidden_layers = len(kinds)
        except AttributeError:  # derived from other fields (Jamba's layer_types): left to the config
            pass
        if isinstance(getattr(part, "pad_token_id", None), int) and part.pad_token_id >= getattr(part, "vocab_size", 0):
            part.pad_token_id = None


def numerics(config, budget: str) -> dict:
    """The shrunk ``config`` built on CPU, its experts adapted with random factors: adapted forward vs merged."""
    import torch
    import transformers

    from cdka_search.adapter import adapter_modules, apply_plan, merge_adapters
    from cdka_search.planner import make_plan
    from cdka_search.spec import spec_from_module

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        try:
            base = model(input_ids=ids, use_cache=False).logits.double()
        except Exception as exc:  # noqa: BLE001 -- the unadapted model: nothing of cdka's has run yet
            return {"skipped": f"transformers' own forward fails ({type(exc).__name__}: {exc})"[:80]}
        spec = spec_from_module(model)
        if not any(t.kind == "experts" for t in spec.targets):
            return {"skipped": "the shrunk copy has no expert layer"}
        apply_plan(model, make_plan(spec, budget, targets="experts"))
        for adapter in adapter_modules(model).values():
            for p in adapter.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        adapted = model(input_ids=ids, use_cache=False).logits.double()
        merge_adapters(model)
        merged = model(input_ids=ids, use_cache=False).logits.double()
    gap, scale = float((adapted - merged).abs().max()), float(adapted.abs().max())
    return {"gap": gap, "scale": scale, "ok": gap <= 1e-4 * max(1.0, scale), "inert": bool(torch.equal(adapted, base))}


def one(kind: str, budget: str, with_numerics: bool, max_params: float) -> dict:
    """The row of one model_type (run in a child process)."""
    import transformers

    from cdka_search.adapter import apply_plan
    from cdka_search.errors import CdkaError
    from cdka_search.planner import make_plan
    from cdka_search.spec import load_spec
    from cdka_search.spec.torch_module import _build_on_meta

    transformers.logging.set_verbosity_error()
    row: dict = {"type": kind}
    config = transformers.AutoConfig.for_model(kind)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        try:
            spec = load_spec(folder)
            plan = make_plan(spec, budget)
        except CdkaError as exc:
            return {**row, "refused": str(exc).split(": ", 1)[-1][:90]}
    row["used"] = plan.used_params / plan.budget_limit
    row["gap"] = plan.gap or 0.0
    model = _build_on_meta(config)
    row["total_gap"] = spec.total_params - sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trained_params
    row["experts"] = any(t.kind == "experts" for t in spec.targets)
    if with_numerics and row["experts"]:
        try:
            shrunk = transformers.AutoConfig.for_model(kind)
            shrink(shrunk)
            size = sum(p.numel() for p in _build_on_meta(shrunk).parameters())
        except Exception as exc:  # noqa: BLE001 -- this script's shrinking, not cdka
            row["numerics"] = {"skipped": f"the shrunk copy does not build ({type(exc).__name__}: {exc})"[:80]}
            return row
        try:
            row["numerics"] = {"skipped": f"{size / 1e9:.1f}B parameters shrunk"} if size > max_params else numerics(shrunk, "lora:4")
        except Exception as exc:  # noqa: BLE001 -- any failure of an adapted foreign model is this row's finding
            row["numerics"] = {"error": f"{type(exc).__name__}: {exc}"[:80]}
    return row


def line(kind: str, row: dict) -> str:
    """The table line of ``kind``: the error of a refused type, else used, total, trainable and experts."""
    if "refused" in row or "crash" in row:
        return f"{kind:<28} {row.get('refused', row.get('crash', ''))}"
    check = row.get("numerics")
    if check is None:
        experts = "(--numerics)" if row["experts"] else "-"
    elif "skipped" in check:
        experts = check["skipped"]
    elif "error" in check:
        experts = f"ERROR {check['error']}"
    else:
        experts = f"{check['gap']:.1e} of {check['scale']:.1f} {'ok' if check['ok'] else 'MISMATCH'}{' inert' if check['inert'] else ''}"
    total = f"{row['total_gap']:+,}" if row["total_gap"] else "yes"
    allocation = "exact" if row["gap"] <= 1e-9 else f"{row['gap']:.1e}"
    return f"{kind:<28} {100 * row['used']:>7.2f}% {allocation:>10} {total:>10} {'yes' if row['trainable'] else 'NO':>10}  {experts}"


def row_of(kind: str, args: argparse.Namespace) -> dict:
    """The row of ``kind`` from a child process; a crash or a timeout is the row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", kind, "--budget", args.budget,
           "--max-params", str(args.max_params), *(["--numerics"] if args.numerics else [])]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"crash": f"over {args.timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"crash": (done.stderr.strip().splitlines() or [f"exit {done.returncode}, no output"])[-1][:90]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model_types (default: every causal-LM type transformers maps)")
    parser.add_argument("--budget", default="0.5%")
    parser.add_argument("--numerics", action="store_true", help="check expert adapters against merged weights on CPU")
    parser.add_argument("--max-params", type=float, default=2e9, help="largest shrunk model built on CPU")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per type")
    parser.add_argument("--jobs", type=int, default=1, help="types checked at once (with --numerics each may hold --max-params float32 weights)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.budget, args.numerics, args.max_params)))
        return
    kinds = args.types or causal_lm_types()
    print(f"{'model_type':<28} {'used':>8} {'allocation':>10} {'total':>10} {'trainable':>10}  experts: adapted vs merged")
    planned, refused, failed, gaps = 0, 0, [], []
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: each type runs in its own process
        rows = pool.map(lambda kind: row_of(kind, args), kinds)
        for kind, row in zip(kinds, rows, strict=True):
            print(line(kind, row), flush=True)
            if "refused" in row or "crash" in row:
                refused += 1
                continue
            planned += 1
            check = row.get("numerics", {})
            gaps.append(row["gap"])
            if not row["trainable"] or "error" in check or check.get("ok") is False or row["gap"] > 1e-4:
                failed.append(kind)
    print(f"\n{planned} types planned and adapted, {refused} refused or failed to build; "
          f"allocation exact on {sum(g <= 1e-9 for g in gaps)}, largest gap {max(gaps, default=0.0):.1e}; "
          f"cdka wrong on {len(failed)}{': ' + ', '.join(failed) if failed else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
