"""Task kinds: how a task meets a model. One class per kind, one file each, found by name.

A kind owns what differs between, say, sequence classification and causal-LM multiple choice:
the model class (``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``), the peft
``task_type`` and the trained head modules, tokenization and collation (label masking), the dev
evaluation step and its metrics. :class:`~diffora_lab.data.TaskDataModule` and
:class:`~diffora_lab.module.TrainingModule` ask the run's kind and never compare its name; a new
kind is a new file here with a ``@register_kind`` class.

- ``classification``: a classifier head on the encoder (or decoder) output, cross-entropy on the
  label (the GLUE path);
- ``choice``: a causal LM trained on the answer's tokens and scored by the log-likelihood of each
  answer (:mod:`diffora_lab.scoring`), for the commonsense suite and GLUE as prompts.

Which kind a run uses: ``task.kind`` (``auto`` by default: ``choice`` on a decoder family for a
task that has a prompt, else ``classification``); see :func:`resolve_kind_name`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from diffora_lab.tasks.spec import Examples, TaskSpec
from diffora_lab.tasks.tokenized import TokenizedSplit


class TaskKind:
    """One way of training and scoring a task (subclass, set the class facts, register).

    Class attributes:
        name: The ``task.kind`` that selects it.
        causal_lm: Needs a backbone family that can do causal LM (a decoder).
        peft_task_type: peft's ``task_type`` of the adapters (``SEQ_CLS``, ``CAUSAL_LM``).

    Args:
        spec: The task.
        options: The run's ``task`` settings this kind reads (see each kind).
    """

    name: ClassVar[str] = ""
    causal_lm: ClassVar[bool] = False
    peft_task_type: ClassVar[str] = ""

    def __init__(self, spec: TaskSpec, options: Mapping[str, Any] | None = None) -> None:
        self.spec = spec
        self.options = dict(options or {})

    def check(self, tokenizer) -> None:
        """Cheap checks of the kind's settings against the tokenizer (before any weights)."""

    def check_data(self, raw_splits, tokenizer) -> None:
        """Checks of the loaded data the kind needs (before any weights)."""

    def head_modules(self, family_heads: tuple[str, ...], override: list[str] | None) -> list[str]:
        """Modules trained and saved besides the adapters (a classifier head)."""
        raise NotImplementedError

    def load_model(self, bcfg, vocab_size: int | None, pad_token_id: int | None) -> nn.Module:
        """The backbone with this kind's head, freshly loaded."""
        raise NotImplementedError

    def tokenize(
        self, examples: Examples, tokenizer, max_length: int, cache_dir, dev: bool = False
    ) -> TokenizedSplit:
        """Token ids of a train split (``dev=False``) or of a dev split."""
        raise NotImplementedError

    def collator(self, tokenizer, multiple: int, max_length: int, dev: bool = False):
        """The ``collate_fn`` of train/search batches, or of dev batches."""
        raise NotImplementedError

    def dev_batches(self, split: TokenizedSplit, batch_size: int, bucketing: int) -> dict:
        """DataLoader arguments that cut a dev split into batches."""
        raise NotImplementedError

    def build_metrics(self) -> nn.Module:
        """Fresh metrics (updated by :meth:`validation_step`; ``compute``, ``reset``)."""
        raise NotImplementedError

    def validation_step(self, host, batch: dict, metrics: nn.Module) -> None:
        """Scores one dev batch into ``metrics``; ``host(batch)`` runs the model (gates set)."""
        raise NotImplementedError


_KINDS: dict[str, type[TaskKind]] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: adds a :class:`TaskKind` under ``cls.name``."""
    if not cls.name or (cls.name in _KINDS and _KINDS[cls.name] is not cls):
        raise ValueError(f"task kind {cls.__name__}: empty or duplicate name {cls.name!r}")
    _KINDS[cls.name] = cls
    return cls


def kind_names() -> list[str]:
    """The registered kinds (what ``task.kind`` accepts besides ``auto``)."""
    return sorted(_KINDS)


def get_kind(name: str) -> type[TaskKind]:
    """The kind class registered as ``name``.

    Raises:
        ValueError: An unknown name; the message lists the registered ones.
    """
    try:
        return _KINDS[str(name)]
    except KeyError:
        raise ValueError(
            f"task.kind={name!r}: unknown task kind; choose one of {['auto', *kind_names()]}."
        ) from None


def resolve_kind_name(requested: str | None, spec: TaskSpec, causal_lm: bool, backbone: str) -> str:
    """The kind a run uses: ``task.kind`` as set, or (``auto``) the task's kind for the backbone.

    ``auto``: on a decoder family the first of the task's kinds that is a causal-LM kind (GLUE
    tasks then run as prompts), else the first the task supports.

    Raises:
        ValueError: The task does not support the kind, or a causal-LM kind on an encoder-only
            backbone.
    """
    if requested in (None, "auto"):
        causal = [k for k in spec.kinds if get_kind(k).causal_lm]
        name = causal[0] if causal_lm and causal else spec.kinds[0]
    else:
        name = get_kind(requested).name
        if name not in spec.kinds:
            raise ValueError(
                f"task.kind={name!r}: task {spec.name!r} supports {list(spec.kinds)}; "
                "choose one of those (or task.kind=auto)."
            )
    if get_kind(name).causal_lm and not causal_lm:
        others = [k for k in spec.kinds if not get_kind(k).causal_lm]
        raise ValueError(
            f"task {spec.name!r} as task.kind={name!r} is scored by a causal LM, and backbone "
            f"{backbone!r} is encoder-only; choose a decoder backbone (e.g. backbone=smollm2_135m"
            " or backbone=tiny_llama)" + (f" or task.kind={others[0]}." if others else ".")
        )
    return name


# Every module in this folder registers its kind on import: a new file is a new kind.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
