"""The ``lm`` task: K steps of causal-LM training of a local Hugging Face model under the trial's plan.

- Model: a local folder loaded with ``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)``
  in float32, once per process; each trial trains a fresh copy with the plan applied by ``apply_plan``
  (real CdkaLinear modules, default stabilisation).
- Data: a local ``.txt`` file (the whole text) or ``.jsonl`` file (one JSON object per line, its "text"
  field). Tokenised with the folder's tokenizer; a folder without tokenizer files falls back to UTF-8
  bytes as token ids (needs vocab_size >= 256; used by the tests). Documents are joined with the EOS
  token, cut into blocks of SEQ_LEN tokens; the last HELD_OUT (10 %, at least one) blocks are held out.
- Training: AdamW (weight decay 5e-4, the reference recipe), 3 % warm-up then cosine, batches of
  BATCH blocks from a seeded shuffle. The value is the mean causal-LM loss on the held-out blocks; it is
  also the intermediate value reported every few steps.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdka_search.errors import SweepError
from cdka_search.sweep.tasks import NonFiniteLoss, Report, TaskOptions

if TYPE_CHECKING:
    from cdka_search.plan import Plan
    from cdka_search.sweep.space import SearchSpace

SEQ_LEN = 128
BATCH = 8
HELD_OUT = 0.1
WARMUP = 0.03
WEIGHT_DECAY = 5e-4
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_texts(path: Path) -> list[str]:
    """The documents of a .txt (one) or .jsonl (one per line, "text" field) file."""
    if not path.is_file():
        raise SweepError(f"--data {path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"--data {path}: cannot read as UTF-8 text ({exc.__class__.__name__})") from None
    if path.suffix != ".jsonl":
        texts = [raw]
    else:
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SweepError(f"--data {path}: line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SweepError(f'--data {path}: line {number} has no string "text" field')
            texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise SweepError(f"--data {path}: no text")
    return texts


class LMTask:
    name = "lm"
    default_lr = 2e-4
    lr_range = (1e-5, 1e-2)

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

    def _encode(self, texts: list[str], vocab: int) -> list[int]:
        folder = self.options.model
        assert folder is not None
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            ids: list[int] = []
            for t in texts:
                ids.extend(tok(t, add_special_tokens=False)["input_ids"] + eos)
            return ids
        if vocab < 256:
            raise SweepError(f"{folder} has no tokenizer and its vocab_size {vocab} < 256 (needed for byte tokens)")
        ids = []
        for t in texts:
            ids.extend(t.encode("utf-8"))
        return ids

    def prepare(self, space: "SearchSpace") -> None:
        import torch

        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise SweepError("the lm task needs transformers: pip install 'cdka[hf]'") from None
        folder = self.options.model
        try:
            self.base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise SweepError(f"--model {folder}: cannot load a causal LM ({first[:200]})") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.base.eval()
        vocab = int(self.base.config.vocab_size)
        ids = self._encode(read_texts(self.options.data), vocab)  # type: ignore[arg-type]
        blocks = len(ids) // self.seq_len
        if blocks < 2:
            raise SweepError(
                f"--data {self.options.data}: {len(ids)} tokens make {blocks} block(s) of {self.seq_len}; need at least 2"
            )
        data = torch.tensor(ids[: blocks * self.seq_len], dtype=torch.long).view(blocks, self.seq_len)
        held = max(1, int(round(HELD_OUT * blocks)))
        self.train, self.held = data[:-held], data[-held:]

    def _held_out_loss(self, model: Any) -> float:
        import torch

        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.held), self.batch):
                batch = self.held[i : i + self.batch].to(self.device)
                out = model(input_ids=batch, labels=batch)
                total += float(out.loss) * len(batch)
                count += len(batch)
        model.train()
        return total / count

    def run(self, plan: "Plan", lr: float, report: Report) -> float:
        import torch

        from cdka_search.adapter import apply_plan

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
        order = torch.randperm(len(self.train), generator=gen)
        cursor = 0
        value = math.inf
        for step in range(1, steps + 1):
            if cursor + self.batch > len(order):
                order, cursor = torch.randperm(len(self.train), generator=gen), 0
            rows = order[cursor : cursor + self.batch]
            cursor += self.batch
            batch = self.train[rows].to(self.device)
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite training loss at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % self.options.every == 0 or step == steps:
                value = self._held_out_loss(model)
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"non-finite held-out loss at step {step}")
                report(step, value)
        return value
