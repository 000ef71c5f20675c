"""Every task model class of the installed transformers with a new head: is the head trained whole?

For each class of transformers' auto task tables (sequence, token, image, audio, audio-frame and video
classification, question answering, multiple choice), built from its model type's default config on the meta device: the spec's
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
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "audio-frame-classification": "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES",
    "video-classification": "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
}


def check(cls, kind: str) -> tuple[str, str] | None:
    """None when the class's head is trained whole and nothing else; else ("refused", cdka's one line),
    ("no new head", why) for a class whose parameters are all its base model's, or ("wrong", what is wrong)."""
    import torch
    import transformers

    from cdka_search import make_plan, spec_from_module
    from cdka_search.adapter import apply_plan
    from cdka_search.errors import CdkaError

    with torch.device("meta"):
        model = cls(transformers.AutoConfig.for_model(kind))
    try:
        spec = spec_from_module(model)
        if not spec.modules_to_save and _scores_with_its_base(model, kind):
            return "no new head", "every parameter is its base model's (it scores with the base's own head)"
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


def _scores_with_its_base(model, kind: str) -> bool:
    """Whether every parameter of ``model`` is its base model's, and that base is no smaller than the model
    type's own base model (Perceiver's classifier keeps its new decoder inside its base: not this)."""
    import torch
    import transformers

    base = model.base_model
    if base is model or model.num_parameters() != base.num_parameters():
        return False
    try:
        with torch.device("meta"):
            own = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(kind))
    except ValueError:  # no base model class for this type (ShieldGemma 2 scores with its Gemma 3's LM head)
        return True
    return own.num_parameters() == base.num_parameters()


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
        # a type may list several classes (image classification: a plain head and one with a teacher)
        classes = [(kind, name) for kind, names in sorted(table.items()) if args.types is None or kind in args.types
                   for name in ((names,) if isinstance(names, str) else names)]
        ok = skipped = refused = headless = 0
        started = time.monotonic()
        for kind, name in classes:
            cls = getattr(transformers, name, None)
            try:
                problem = check(cls, kind)
            except Exception:  # noqa: BLE001 - transformers failing on its own default config
                skipped += 1
                continue
            if problem is None:
                ok += 1
                continue
            refused += problem[0] == "refused"
            headless += problem[0] == "no new head"
            failed += problem[0] == "wrong"
            print(f"{task:24} {kind:16} {problem[0]:8} {name}: {problem[1][:160]}")
        print(f"{task}: {ok} of {len(classes) - skipped} built classes train their head whole, {refused} refused, "
              f"{headless} add no head ({skipped} not built by transformers; {time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
