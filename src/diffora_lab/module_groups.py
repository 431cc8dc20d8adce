"""Module-type groups: which candidate types are attention and which are the MLP.

The fixed-choice baselines (``method=lora_qv``, ``lora_attn``, ``lora_mlp``;
methods/fixed_choice.py) adapt one group. Types are the short names of ``backbone.module_types``:
attention is q, k, v, o (and qkv, a fused projection as in phi3); the MLP is every other
candidate type (ffn_in, ffn_out on encoders; gate, up, down, or a fused gate_up, on decoders).
This table is meant to move into the per-family table of backbones once there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ATTENTION = frozenset({"q", "k", "v", "o", "qkv"})
QUERY_VALUE = frozenset({"q", "v"})

GROUPS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "qv": ("q and v (the original LoRA choice, peft's default)", QUERY_VALUE.__contains__),
    "attn": ("the attention projections", ATTENTION.__contains__),
    "mlp": ("the MLP (FFN) matrices", lambda module_type: module_type not in ATTENTION),
}


def group_types(group: str, module_types: Sequence[str], backbone: str = "") -> list[str]:
    """The module types of ``group`` among a backbone's candidate types, in their order.

    Raises:
        ValueError: An unknown group, or a backbone without that group's types (e.g. q,v on a
            fused qkv projection).
    """
    if group not in GROUPS:
        raise ValueError(f"module group {group!r}: choose one of {sorted(GROUPS)}.")
    what, belongs = GROUPS[group]
    chosen = [t for t in module_types if belongs(t)]
    if group == "qv" and set(chosen) != QUERY_VALUE:
        chosen = []  # both or nothing: q alone is not the qv choice
    if not chosen:
        raise ValueError(
            f"method=lora_{group}: backbone {backbone!r} has no candidates of {what} "
            f"(its module types: {list(module_types)}); choose another fixed choice."
        )
    return chosen
