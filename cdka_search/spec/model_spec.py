"""ModelSpec: what the planner needs to know about a model, whatever it was read from."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Literal

Kind = Literal["linear", "conv1d", "experts"]
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
# transformers' task models whose head is new at fine-tuning (num_labels outputs, a span or choice
# scorer): trained whole, as PEFT's modules_to_save, not adapted. A pretrained head (an LM head's
# transform, Gemma 4's projections) stays a target, as PEFT's all-linear keeps it. Any classification
# counts (LUKE's ForEntityClassification, PatchTST's ForClassification, ViLT's ForImagesAndTextClassification),
# and the name may go on in words (DeiT's ...WithTeacher; Perceiver's ...Learned, ...Fourier, ...ConvProcessing).
_TASK_HEAD_CLASS = re.compile(r"For[A-Za-z]*Classification([A-Z][A-Za-z]*)?$|ForQuestionAnswering(Simple)?$|ForMultipleChoice$")
#: What transformers (and timm, for ``fc`` and ``head``) names such a head at the top of the model, where no
#: base model tells it apart (PPLCNetForImageClassification's base has no class of its own) or there is no
#: model at all (a safetensors header).
TASK_HEAD_MODULES = ("classifier", "score", "qa_outputs", "classification_head", "fc", "head")


def listed_architectures(value: object) -> list[str]:
    """The class names of a config's ``architectures``: the strings among its first four (a checkpoint
    names one; a hostile list is not walked)."""
    return [arch for arch in value[:4] if isinstance(arch, str)] if isinstance(value, list) else []


def has_new_head(class_name: str) -> bool:
    """Whether a transformers model class (``BertForSequenceClassification``) adds a head that is new
    at fine-tuning."""
    return bool(_TASK_HEAD_CLASS.search(class_name))


@dataclass(frozen=True)
class TargetModule:
    """One adaptable weight. ``d_out`` x ``d_in`` is the nn.Linear orientation even for a
    GPT-2 ``Conv1D`` (``kind="conv1d"``), whose tensor is stored (d_in, d_out).

    ``kind="experts"`` is a 3-D MoE parameter stored (experts, d_out, d_in) and named as PEFT's
    ``target_parameters`` names it (``model.layers.0.mlp.experts.gate_up_proj``); every expert
    gets its own factors of one shared design, so its adapter costs ``experts`` times a 2-D one.
    ``transposed`` marks an expert stack stored (experts, d_in, d_out), as gpt-oss stores it
    (transformers' ``is_transposed``): shapes and plans are in the (d_out, d_in) orientation all the
    same, and whatever reads the stored tensor transposes it.
    """

    name: str
    d_out: int
    d_in: int
    kind: Kind = "linear"
    experts: int = 1
    transposed: bool = False

    @property
    def weight_params(self) -> int:
        """Parameters of the frozen weight (every expert counted)."""
        return self.experts * self.d_out * self.d_in

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)

    @property
    def role(self) -> str:
        """The name with layer indices replaced by ``*``: the glob its group is written as."""
        return role_of(self.name)


def role_of(name: str) -> str:
    """A tensor or module name with layer indices replaced by ``*``."""
    return _LAYER_INDEX.sub("*", name)


def tally_roles(named_sizes: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """(role, summed size) of named tensors, largest first."""
    sums: dict[str, int] = {}
    for name, size in named_sizes:
        sums[role_of(name)] = sums.get(role_of(name), 0) + size
    return tuple(sorted(sums.items(), key=lambda kv: -kv[1]))


def is_embedding(name: str) -> bool:
    """Token and position embeddings and the LM head: never adapted, by convention, not by limitation."""
    return any(seg in ("wte", "wpe", "lm_head", "shared") or "embed" in seg for seg in name.split("."))


@dataclass(frozen=True)
class ModelSpec:
    """The adaptable weights of a model and its total parameter count (the base of a % budget).

    ``unadaptable`` lists, by role, the weight matrices (2-D or more) that are not targets and are not
    embeddings or the LM head: routers, expert stores in a layout cdka does not adapt, convolutions.
    Coverage reports name them when they hold a large share of the model. ``unselected`` names the
    targets a selection left out: a plan's group pattern must not match them either.
    ``modules_to_save`` lists (module name, parameter count) of a task model's new head (a classifier,
    a QA span scorer): trained whole at fine-tuning, as PEFT's ``modules_to_save``, never adapted.
    """

    name: str
    source: str
    total_params: int
    targets: tuple[TargetModule, ...]
    unadaptable: tuple[tuple[str, int], ...] = ()
    unselected: tuple[str, ...] = ()
    modules_to_save: tuple[tuple[str, int], ...] = ()

    def with_targets(self, targets: tuple[TargetModule, ...]) -> "ModelSpec":
        kept = {t.name for t in targets}
        left_out = tuple(t.name for t in self.targets if t.name not in kept)
        return replace(self, targets=targets, unselected=self.unselected + left_out)

    @property
    def shapes(self) -> dict[tuple[int, int], int]:
        """Distinct (d_out, d_in) shapes and how many targets have each."""
        counts: dict[tuple[int, int], int] = {}
        for t in self.targets:
            counts[t.shape] = counts.get(t.shape, 0) + 1
        return counts

    @property
    def matrices(self) -> dict[tuple[int, int], int]:
        """Distinct (d_out, d_in) shapes and how many 2-D matrices have each (every expert counted):
        what one shared design per shape is paid for."""
        counts: dict[tuple[int, int], int] = {}
        for t in self.targets:
            counts[t.shape] = counts.get(t.shape, 0) + t.experts
        return counts

    def roles(self) -> dict[str, list[TargetModule]]:
        """Targets grouped by role (``model.layers.*.mlp.up_proj``), in first-seen order."""
        out: dict[str, list[TargetModule]] = {}
        for t in self.targets:
            out.setdefault(t.role, []).append(t)
        return out
