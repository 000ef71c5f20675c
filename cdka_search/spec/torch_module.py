"""A live torch.nn.Module (or a transformers config instantiated on the meta device) -> ModelSpec."""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cdka_search.documents import brief
from cdka_search.errors import CdkaWarning, ModelSourceError, one_line
from cdka_search.spec.model_spec import (
    TASK_HEAD_MODULES,
    ModelSpec,
    TargetModule,
    has_new_head,
    is_embedding,
    listed_architectures,
    tally_roles,
)

#: Rows of the input a Linear subclass with its own forward is probed with: odd, so that a subclass
#: that regroups rows (DeepSeek-V4's head groups come in powers of two) fails on shape alone.
_PROBE_ROWS = 3


def base_kind(module) -> str | None:
    """``"linear"`` for an ``nn.Linear`` that computes ``x W^T + b``, ``"conv1d"`` for transformers' GPT-2
    ``Conv1D``, else None.

    A subclass of ``nn.Linear`` that overrides ``forward`` (Falcon's FalconLinear, DeepSeek-V4's grouped,
    block-diagonal ``o_a_proj``, routers returning scores) is probed once on a fixed input: it counts as
    linear only if it returns an output of shape (rows, out_features) that, on real weights, equals
    ``x W^T + b`` (a weight stored packed, as quantized linears keep it, is checked for shape only).
    An adapter on anything else would add an update of the wrong shape or meaning.
    ``Conv1D`` is recognised without importing transformers: its class name and its ``nf``/``nx``
    attributes with a weight stored (in, out).
    """
    import torch
    from torch import nn

    if isinstance(module, nn.Linear):
        try:
            linear_features(module)
        except TypeError:  # sizes that are not integers: not a layer whose shape can be planned
            return None
        return "linear" if type(module).forward is nn.Linear.forward or _computes_linear(module) else None
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    ):
        return "conv1d"
    return None


def linear_features(module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` as ints. Some model code builds a Linear from 0-d
    integer tensors, which nn.Linear keeps as they are (TypeError for sizes that are not integers)."""
    return operator.index(module.out_features), operator.index(module.in_features)


def _computes_linear(module) -> bool:
    import torch
    import torch.nn.functional as F

    weight, bias = module.weight, module.bias
    d_out, d_in = linear_features(module)
    plain = weight.is_floating_point() and tuple(weight.shape) == (d_out, d_in)
    # A fixed input rather than a random one: probing must not move the caller's random state.
    x = torch.linspace(-1.0, 1.0, _PROBE_ROWS * d_in, device=weight.device).reshape(_PROBE_ROWS, -1)
    try:
        with torch.no_grad():
            y = module(x.to(weight.dtype) if plain else x)
    except Exception:  # noqa: BLE001 - any failure on a plain input means it is not a plain linear map
        return False
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (_PROBE_ROWS, d_out):
        return False
    if y.device.type == "meta" or not plain:  # no values to compare with: a packed (quantized) weight
        return True
    with torch.no_grad():  # in the weight's own dtype: no float32 copy of a large weight
        expected = F.linear(x.to(weight.dtype), weight, bias).float()
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(y.float(), expected, rtol=0.0, atol=1e-2 * scale))


def expert_layout(module) -> bool | None:
    """How an experts module stores its 3-D stacks: False for (experts, d_out, d_in), True for transposed
    (experts, d_in, d_out) as gpt-oss and Llama 4 store them, None where that is not known (a convolution,
    a module whose forward needs more than the hidden states).

    transformers marks the layout (``is_transposed``) on most experts modules. Where it does not
    (Llama 4), the layout is what the forward does: :func:`~cdka_search.spec.expert_reads.observed_layout`
    watches how it multiplies by its stacks. The layout is never guessed from shapes, which cannot tell a
    transposed down-projection from a plain up-projection.
    """
    mark = getattr(module, "is_transposed", None)
    if isinstance(mark, bool):
        return mark
    from cdka_search.spec.expert_reads import observed_layout

    return observed_layout(module)


@dataclass(frozen=True)
class _Head:
    """Where a transformers task model's new head is: every module outside its base model (``base``,
    the base's ``"name."``: ``bert.`` of BertForSequenceClassification; None when the task model holds
    its base's modules itself, as T5ForQuestionAnswering does), and the modules named in ``tops``
    (full names: the head's modules within the base, or at the top where there is no base)."""

    base: str | None
    tops: frozenset[str]

    def holds(self, name: str) -> bool:
        """Whether module or parameter ``name`` belongs to the head (the base module itself does not)."""
        if self.base is not None and not f"{name}.".startswith(self.base):
            return True
        return any(f"{name}.".startswith(f"{top}.") for top in self.tops)

    def top(self, name: str) -> str:
        """The outermost module of the head that holds ``name`` (one :meth:`holds`)."""
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        # outside the base: the first prefix that does not lead to it; inside: the prefix named in tops
        return next(head for head in prefixes if head in self.tops or not (self.base or "").startswith(f"{head}."))


def _new_head(model) -> _Head | None:
    """The new head of a transformers task model (None for any other model): the modules outside its
    base model, and those of its base that its model type's own base model (transformers' AutoModel of
    its config, built on the meta device) lacks and that are sized by the labels, as Perceiver's
    classification decoder, which PerceiverForSequenceClassification builds inside its ``perceiver``. A
    task model holding its base's modules itself (T5ForQuestionAnswering, WhisperForAudioClassification)
    has the top-level modules that base model lacks; without a base model to compare with, those named as
    transformers names heads."""
    if not has_new_head(type(model).__name__):
        return None
    bare = _base_model_tops(getattr(model, "config", None))
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        tops = {name for name, child in model.named_children() if _has_parameters(child)}
        return _Head(None, frozenset(tops & set(TASK_HEAD_MODULES) if bare is None else tops - bare))
    prefix = next((f"{n}." for n, m in model.named_modules() if m is base), "")
    extra = [] if bare is None else [n for n, child in base.named_children() if n not in bare and _has_parameters(child)]
    return _Head(prefix, frozenset(f"{prefix}{n}" for n in _sized_by_labels(model, base, extra)))


def _sized_by_labels(model, base, names: list[str]) -> list[str]:
    """Those of ``base``'s children ``names`` whose size follows the number of labels: the task model
    built again on meta with one label more sizes them differently. Only such a child is a new head; one
    the task model merely adds to its base is not (Perceiver's input preprocessor, holding pretrained
    embeddings; a pooler that AutoModel leaves out)."""
    config = getattr(model, "config", None)
    labels = getattr(config, "num_labels", None)
    if not names or not isinstance(labels, int):
        return []
    wider = copy.deepcopy(config)
    wider.num_labels = labels + 1
    try:
        import torch

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = type(model)(wider).base_model
    except Exception:  # noqa: BLE001 - a class that cannot be built again from its own config
        return []

    def size(module, name: str) -> int:
        return sum(p.numel() for p in module.get_submodule(name).parameters())

    return [n for n in names if size(base, n) != size(other, n)]


def _has_parameters(module) -> bool:
    return any(True for _ in module.parameters())


def _base_model_tops(config) -> set[str] | None:
    """The top-level module names of transformers' base model for ``config``, built on meta; None when
    there is none (no transformers config, or no base model class transformers can build for it)."""
    try:
        import torch
        from transformers import AutoModel, PretrainedConfig
    except ImportError:
        return None
    if not isinstance(config, PretrainedConfig):
        return None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a copy: building a model sets fields (the attention implementation) on the config it is given
            return {name for name, _ in AutoModel.from_config(copy.deepcopy(config)).named_children()}
    except Exception:  # noqa: BLE001 - a type with no base class (an image classifier's backbone), or one that fails
        return None


def _read_directly(model) -> set[int]:
    """Modules whose weight the model's code multiplies by itself instead of calling the module: an
    adapter there would never run (and merging it would change the output), so they are no targets and
    their weights are reported uncovered. nn.MultiheadAttention's ``out_proj``, and each child a
    transformers forward names in ``force_accelerate_hooks``, the decorator that marks children whose
    weights it reads (Mamba's, Falcon-Mamba's and Jamba's ``dt_proj``)."""
    from torch import nn

    bypassed: set[int] = set()
    named_by_class: dict[type, tuple[str, ...]] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            bypassed.add(id(module.out_proj))
        kind = type(module)
        if kind not in named_by_class:
            named_by_class[kind] = _hooked_children(getattr(kind, "forward", None))
        for child in named_by_class[kind]:
            if isinstance(found := getattr(module, child, None), nn.Module):
                bypassed.add(id(found))
    return bypassed


def _hooked_children(forward, depth: int = 6) -> tuple[str, ...]:
    """The children named by transformers' ``force_accelerate_hooks`` (its wrapper's closure holds them
    as ``child_module_names``) where ``forward`` is that wrapper or wraps it, through other decorators
    (``functools.wraps``'s ``__wrapped__``, or a closure holding the original, as the kernels hub's
    forward replacement does), else ()."""
    code = getattr(forward, "__code__", None)
    if code is None or depth == 0:
        return ()
    contents = [_content(c) for c in getattr(forward, "__closure__", None) or ()]
    if "child_module_names" in code.co_freevars:
        names = contents[code.co_freevars.index("child_module_names")]
        return tuple(n for n in names if isinstance(n, str)) if isinstance(names, (list, tuple)) else ()
    inner = [getattr(forward, "__wrapped__", None), *(c for c in contents if callable(c))]
    return next((found for f in inner if f is not None and (found := _hooked_children(f, depth - 1))), ())


def _content(cell) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def spec_from_module(model, name: str | None = None) -> ModelSpec:
    """Targets are every linear module (:func:`base_kind`) except the output embedding and a task model's
    new head (a classifier: trained whole, listed in ``modules_to_save``), and
    every 3-D parameter of a module transformers marks as experts (stored (experts, d_out, d_in), or
    transposed) by its full parameter name, as PEFT's ``target_parameters`` names it."""
    import torch.nn as nn

    excluded: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and get_out() is not None:
        excluded.add(id(get_out()))
    bypassed = _read_directly(model)
    head = _new_head(model)
    targets: list[TargetModule] = []
    for module_name, module in model.named_modules():
        if id(module) in excluded or module_name.split(".")[-1] == "lm_head":
            continue
        if head is not None and head.holds(module_name):
            continue  # a new task head (classifier, score): trained whole, not adapted
        kind = None if id(module) in bypassed else base_kind(module)
        if kind == "linear":
            targets.append(TargetModule(module_name, *linear_features(module)))
        elif kind == "conv1d":
            d_in, d_out = module.weight.shape
            targets.append(TargetModule(module_name, int(d_out), int(d_in), "conv1d"))
        elif (transposed := expert_layout(module)) is not None:
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    experts, d_out, d_in = (int(d) for d in param.shape)
                    if transposed:
                        d_out, d_in = d_in, d_out
                    targets.append(TargetModule(f"{module_name}.{param_name}", d_out, d_in, "experts", experts, transposed))
    targeted = {t.name for t in targets}
    seen: set[int] = set()
    total = 0
    others: list[tuple[str, int]] = []  # weight matrices no target covers, embeddings and LM head aside
    heads: dict[str, int] = {}  # the new task head's top modules -> their parameters
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            full = f"{module_name}.{param_name}" if module_name else param_name
            # A parameter of the task model itself (Nemotron 3 diarization's silence_embeds) is in no module
            # that PEFT's modules_to_save could train whole: it stays with the base, frozen.
            if module_name and head is not None and head.holds(full):
                top = head.top(full)
                heads[top] = heads.get(top, 0) + p.numel()
                continue
            covered = module_name in targeted or full in targeted or id(module) in excluded
            if p.dim() >= 2 and not covered and not isinstance(module, nn.Embedding) and not is_embedding(full):
                others.append((full, p.numel()))
    heads = {head: n for head, n in heads.items() if n}  # an empty head trains nothing
    if not targets:
        beside = f" outside its new task head ({', '.join(heads)})" if heads else ""
        raise ModelSourceError(f"{name or type(model).__name__}: no nn.Linear, Conv1D or expert weights to adapt{beside}")
    return ModelSpec(name or type(model).__name__, "module", total, tuple(targets), tally_roles(others),
                     modules_to_save=tuple(heads.items()))


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers maps ``model_type`` to a config class, read from the text of
    its auto tables: importing transformers would import torch (seconds) just to refuse a name.
    True when the tables cannot be read or do not look as expected, so the real loader decides."""
    import importlib.util

    try:
        found = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return True
    if found is None or not found.submodule_search_locations:
        return True
    auto = Path(next(iter(found.submodule_search_locations))) / "models" / "auto"
    try:
        text = "".join(f.read_text(encoding="utf-8") for f in sorted(auto.glob("*.py")))
    except OSError:
        return True
    if '("llama", "LlamaConfig")' not in text:  # an unknown table layout: no verdict from it
        return True
    return f'("{model_type}", "' in text


def meta_spec_from_config(path: Path, name: str) -> ModelSpec:
    """Any architecture transformers knows, built on the meta device (no weight allocated)."""
    from cdka_search.spec.hf_config import read_config
    from cdka_search.textdata import refuse_remote_code

    kind = read_config(path).get("model_type")
    if not isinstance(kind, str) or not kind.strip():
        raise ModelSourceError(f"{path}: config.json has no model_type text, so its architecture is unknown")
    if path.is_dir():  # these checks run before importing torch: bad input fails fast
        refuse_remote_code(path, "config.json")
    else:
        refuse_remote_code(path.parent, path.name)
    if not transformers_knows(kind):
        raise ModelSourceError(
            f"{path}: model_type {brief(kind)} is neither built into cdka (see docs/models.md) nor known to the installed transformers"
        )
    import torch  # noqa: F401 - imported here so that its ImportError reaches config_spec, which says what to install
    import transformers

    try:
        with _transformers_log_as_warnings(path):
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model = _build_on_meta(config)
    except Exception as exc:  # transformers raises many unrelated types for a bad config
        raise ModelSourceError(f"{path}: transformers cannot build this config ({one_line(exc)})") from None
    built_from_part = model.config is not config
    left_out = [key for key in getattr(config, "sub_configs", None) or {}
                if built_from_part and type(getattr(config, key, None)) is not type(model.config)]
    if left_out:  # a multimodal config of which transformers builds the language model alone (Llama 4)
        warnings.warn(f"{path}: transformers builds {type(model).__name__} from this config, without its "
                      f"{', '.join(left_out)}: those parts are neither counted in the total nor planned", CdkaWarning,
                      stacklevel=2)
    return replace(spec_from_module(model, name), name=name, source="hf-config")


@contextlib.contextmanager
def _transformers_log_as_warnings(path: Path) -> Iterator[None]:
    """transformers' own log lines while it reads and builds a config (``bos_token_id must be ... within
    the vocabulary``), each said once as a cdka ``warning:`` line, in place of its handler's raw lines
    ahead of cdka's output or its one error line. A filter of this call's own is added to the handlers
    and removed from them after, so that calls overlapping in threads leave the logger as it was."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # transformers adds its handler on first use: filter that one, not a later one
    said: list[str] = []

    def collect(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            said.append(record.getMessage())
        return False

    handlers = logging.getLogger("transformers").handlers[:]
    for handler in handlers:
        handler.addFilter(collect)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(collect)
        for message in dict.fromkeys(said):
            warnings.warn(f"{path}: transformers says: {' '.join(message.split())}", CdkaWarning, stacklevel=4)


def _build_on_meta(config):
    """The model of ``config`` on the meta device: the class its ``architectures`` names where
    transformers defines it (the model a checkpoint is for, with its task head and module names, as
    DebertaV2ForSequenceClassification names ``deberta.encoder...``); else the first auto class that
    maps it: for an encoder-decoder config a sequence-to-sequence model (BART's and Whisper's causal-LM
    classes are their decoders alone), then a causal LM, an image-text-to-text model (Pix2Struct,
    ShieldGemma 2), else the bare model (BERT's encoder). Each auto class refuses a config it does not
    map with a ValueError."""
    import torch
    import transformers

    named = [getattr(transformers, arch, None) for arch in listed_architectures(getattr(config, "architectures", None))]
    named = [cls for cls in named if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
             and getattr(cls, "config_class", None) not in (None, transformers.PretrainedConfig)
             and isinstance(config, cls.config_class)]  # a model class of this config, not a base class or another model's
    seq2seq = [transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSpeechSeq2Seq] if getattr(config, "is_encoder_decoder", False) else []
    autos = [*seq2seq, transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText, transformers.AutoModel]
    with torch.device("meta"), warnings.catch_warnings():
        # A zero-width module transformers builds (a shared expert of width 0) makes torch's init say it
        # does nothing: not a warning for the user, whose one line must stay one line.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        for cls in named:
            try:
                return cls._from_config(config)
            except Exception:  # noqa: BLE001 - a class named for another config: the auto classes decide
                pass
        for auto in autos[:-1]:
            try:
                return auto.from_config(config)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
        return autos[-1].from_config(config)
