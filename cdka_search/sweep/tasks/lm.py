"""The ``lm`` task: K steps of causal-LM training of a local Hugging Face model under the trial's plan.

- Model: a local folder loaded by ``cdka_search.textdata.load_causal_lm`` (safetensors, float32), once
  per process; each trial trains a fresh copy with the plan applied by ``apply_plan``
  (real CdkaLinear modules, default stabilisation).
- Data: ``cdka_search.textdata.read_examples``: a local ``.txt`` (blank-line separated documents),
  ``.jsonl`` or ``.json`` file in TRL's formats (text, prompt/completion, messages), tokenised with the
  folder's tokenizer (conversations by its chat template) or, without one, as UTF-8 bytes modulo the
  vocabulary (the tests' tiny models). Documents are joined with EOS and cut into blocks of SEQ_LEN
  tokens; the loss skips prompt tokens, blocks without a trained token are dropped, and the last
  HELD_OUT (10 %, at least one) blocks are held out.
- Training: AdamW (weight decay 5e-4, the reference recipe), 3 % warm-up then cosine, batches of
  BATCH blocks from a seeded shuffle. The value is the held-out causal-LM loss per counted token (prompt
  tokens are not counted); it is also the intermediate value reported every few steps.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any

from cdka_search.errors import CdkaWarning, DataError, SweepError
from cdka_search.sweep.tasks import NonFiniteLoss, Report, TaskOptions

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.sweep.space import SearchSpace

SEQ_LEN = 128
BATCH = 8
HELD_OUT = 0.1
WARMUP = 0.03
WEIGHT_DECAY = 5e-4


class LMTask:
    name = "lm"
    default_lr = 2e-4
    lr_range = (1e-5, 1e-2)
    needs = frozenset({"data", "model"})
    takes = frozenset()

    def __init__(self, options: TaskOptions, *, seq_len: int = SEQ_LEN) -> None:
        if options.model is None or options.data is None:
            raise SweepError("the lm task needs a local model folder (--model) and a data file (--data)")
        if options.steps < 1:
            raise SweepError(f"--steps must be at least 1, got {options.steps}")
        self.options = options
        self.seq_len = seq_len
        self.batch = options.batch_size or BATCH
        self.base: Any = None
        self.train: Any = None
        self.held: Any = None
        self.device = "cpu"

    def prepare(self, space: "SearchSpace") -> None:
        import torch

        from cdka_search.textdata import load_lm_and_tokens, token_blocks

        self.base, tokens = load_lm_and_tokens(self.options.model, self.options.data)  # type: ignore[arg-type]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.base.eval()
        inputs, labels = token_blocks(tokens, self.seq_len)
        if len(inputs) < 2:
            raise DataError(  # a data file's problem, as for the probe (exit 9)
                f"--data {self.options.data}: {len(tokens.ids)} tokens make {len(inputs)} block(s) of {self.seq_len} "
                "with a trained token; need at least 2"
            )
        held = max(1, int(round(HELD_OUT * len(inputs))))
        self.train, self.held = (inputs[:-held], labels[:-held]), (inputs[-held:], labels[-held:])

    def _held_out_loss(self, model: Any) -> float:
        import torch

        model.eval()
        inputs, labels = self.held
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(inputs), self.batch):
                batch, target = inputs[i : i + self.batch].to(self.device), labels[i : i + self.batch].to(self.device)
                counted = int((target[:, 1:] != -100).sum())  # the loss is a mean over these (labels shift by one)
                total += float(model(input_ids=batch, labels=target).loss) * counted
                count += counted
        model.train()
        return total / count

    def run(self, plan: "Plan", lr: float, report: Report) -> float:
        import torch

        from cdka_search.adapter import apply_plan, idle_adapters
        from cdka_search.adapter.model import idle_warning

        if self.base is None:
            raise SweepError("the lm task was not prepared")
        torch.manual_seed(self.options.seed)
        model = copy.deepcopy(self.base)
        apply_plan(model, plan)
        model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        steps = self.options.steps
        optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
        warm = max(1, int(WARMUP * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
        )
        gen = torch.Generator().manual_seed(self.options.seed + 29)
        inputs, labels = self.train
        order = torch.randperm(len(inputs), generator=gen)
        cursor = 0
        value = math.inf
        for step in range(1, steps + 1):
            if cursor + self.batch > len(order):
                order, cursor = torch.randperm(len(inputs), generator=gen), 0
            rows = order[cursor : cursor + self.batch]
            cursor += self.batch
            loss = model(input_ids=inputs[rows].to(self.device), labels=labels[rows].to(self.device)).loss
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite training loss at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if step == 1 and (idle := idle_adapters(model)):
                warnings.warn(idle_warning(idle), CdkaWarning, stacklevel=1)
            optimiser.step()
            schedule.step()
            if step % self.options.every == 0 or step == steps:
                value = self._held_out_loss(model)
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"non-finite held-out loss at step {step}")
                report(step, value)
        return value
