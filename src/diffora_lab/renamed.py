"""Settings that were renamed or moved (into the ``search=`` group): an old name in a command or
a saved config stops with the new one, instead of being ignored."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# Settings that were renamed or became part of the `search=` group: the old name stops with the new.
RENAMED = {
    "dam.order": "renamed: use dam.arch_grad={value} (the architecture gradient rule).",
    "dam.relaxation": "the relaxation is part of the search variant now: use search=softmax_row "
    "or search=topk (search=faithful for sigmoid gates).",
    "dam.progressive": "the search variant is chosen with search= now: use search=progressive "
    "(the default) or search=faithful.",
    "dam.budget_penalty": "the search variant is chosen with search= now: use "
    "search=budget_penalty search.weight={value}.",
    "dam.prune_start": "renamed: use search.prune_start={value} (with search=progressive).",
    "dam.prune_end": "renamed: use search.prune_end={value} (with search=progressive).",
}


def check_renamed(cfg: DictConfig) -> None:
    """Refuses an old setting name, saying what to write instead.

    Raises:
        ValueError: ``<old>=<value>: <what to use now>``.
    """
    for key, fix in RENAMED.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            raise ValueError(f"{key}={value!r}: {fix.format(value=value)}")
