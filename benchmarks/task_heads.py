"""Every task model class of the installed transformers with a new head: is the head trained whole?

For each class of transformers' auto task tables (sequence and token classification, question answering,
multiple choice), built from its model type's default config on the meta device: the spec's
``modules_to_save`` must be non-empty, no target may lie inside it, and ``apply_plan`` of a lora:1 plan
must make exactly ``plan.trained_params`` trainable. A class transformers cannot build from its own
default config is counted as skipped; a failure prints one row.

    python benchmarks/task_heads.py                      (about 4 minutes on 2 cores)
    python benchmarks/task_heads.py --tasks question-answering --types t5 bert

Exit status 1 when a built class is wrong; a class cdka refuses in one line (I-BERT's QuantLinear has no
nn.Linear to adapt) is printed as refused.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

TABLES = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "question-answering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "multiple-choice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
}


def check(cls, kind: str) -> tuple[str, str] | None:
    """None when the class's head is trained whole and nothing else; else ("refused", cdka's one line)
    or ("wrong", what is wrong)."""
    import torch
    import transformers

    from cdka_search import make_plan, spec_from_module
    from cdka_search.adapter import apply_plan
    from cdka_search.errors import CdkaError

    with torch.device("meta"):
        model = cls(transformers.AutoConfig.for_model(kind))
    try:
        spec = spec_from_module(model)
        if not spec.modules_to_save:
            return "wrong", f"no head found (top-level modules: {', '.join(n for n, _ in model.named_children())})"
        heads = {name for name, _ in spec.modules_to_save}
        inside = [t.name for t in spec.targets if any(t.name == h or t.name.startswith(f"{h}.") for h in heads)]
        if inside:
            return "wrong", f"targets inside the head: {', '.join(inside[:3])}"
        plan = make_plan(spec, "lora:1")
        trainable = apply_plan(model, plan).trainable_params
    except CdkaError as exc:
        return "refused", str(exc)
    if trainable != plan.trained_params:
        return "wrong", f"{trainable:,} trainable, the plan trains {plan.trained_params:,}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--types", nargs="*", default=None, help="only these model types")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.utils import logging

    logging.set_verbosity_error()
    failed = 0
    for task in args.tasks:
        table = dict(getattr(modeling_auto, TABLES[task]))
        kinds = sorted(t for t in table if args.types is None or t in args.types)
        ok = skipped = refused = 0
        started = time.monotonic()
        for kind in kinds:
            cls = getattr(transformers, table[kind], None)
            try:
                problem = check(cls, kind)
            except Exception:  # noqa: BLE001 - transformers failing on its own default config
                skipped += 1
                continue
            if problem is None:
                ok += 1
                continue
            refused += problem[0] == "refused"
            failed += problem[0] == "wrong"
            print(f"{task:24} {kind:16} {problem[0]:8} {table[kind]}: {problem[1][:160]}")
        print(f"{task}: {ok} of {len(kinds) - skipped} built classes train their head whole, {refused} refused "
              f"({skipped} not built by transformers; {time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
