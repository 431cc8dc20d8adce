"""Parameter matching: the DiffoRA rank whose adapter costs what LoRA r=8 (or r=2) costs.

METHOD.md, "Budgets and fair comparison": comparisons with LoRA/AdaLoRA are only fair at matched
trainable parameters. ``match=lora_r8`` (``conf/match/``) turns that into a rule applied once the
candidate modules are known; each method states its rule (``Method.run_rank``, applied by
``methods.resolve_rank``):

- LoRA on all candidates (``lora`` and its peft variants): the reference rank (it is the
  reference);
- ``adalora``: target_r = the reference rank (its final rank budget is target_r per module);
- selecting methods (``diffora``, ``random_mask``) under ``budget_unit=params`` (the default):
  rank r = round(r0 / budget) (:func:`params_rank`) and the budget's target is LoRA r0's count on
  all candidates exactly (budget.py), so the cut keeps within half a module (at rank r) of it;
- the same under ``budget_unit=modules``: the rank whose EXPECTED kept adapter parameters are
  closest to the reference (:func:`masked_rank`, below);
- fixed-choice baselines (``lora_qv``, ``lora_attn``, ``lora_mlp``): the rank whose adapter on
  their module group is closest to the target (methods/fixed_choice.py);
- ``full`` / ``bitfit``: ``rank`` is unused and left as given.

The expectation (``budget_unit=modules``). A rank-r adapter on module i costs r (d_in_i + d_out_i).
DiffoRA keeps k = max(1, round(budget * n)) of the n candidates, and which ones is only known
after the search.
We define the expected cost as the mean over all k-subsets, i.e. the kept set of the
``random_mask`` baseline (the no-information prior of the search):

    E[params(r)] = r * (k / n) * sum_i (d_in_i + d_out_i)

and LoRA at rank r0 on all candidates costs r0 * sum_i (d_in_i + d_out_i). The sum cancels, so the
matched rank is the integer nearest to r0 * n / k (the lower one on a tie, so the expectation never
overshoots on a tie) for any mix of module sizes. With equal module sizes (or a mask that keeps
each module type in proportion) the expectation is also the achieved count. With mixed sizes the
achieved count depends on what the search keeps: between ``min_params`` (the k smallest modules
kept) and ``max_params`` (the k largest), e.g. 0.67x to 1.33x on DeBERTa-v3-base at budget 0.5.
:func:`achieved` reports the real count for a final mask; report it with every result.

Alternatives (not implemented): match the worst case (``max_params``) so a run never exceeds the
reference, or adapt the budget instead of the rank (e.g. budget 2/3 at r=3 matches LoRA r=2
exactly where budget 0.75 cannot).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from diffora_lab.backbones import Candidate
from diffora_lab.budget import num_kept, target_rank_of

__all__ = [
    "achieved",
    "lora_params",
    "masked_rank",
    "matched_rank",
    "params_rank",
    "target_rank_of",
]

log = logging.getLogger(__name__)


def lora_params(candidates: Sequence[Candidate], rank: int) -> int:
    """Adapter parameters of rank-``rank`` LoRA on every candidate: r * sum (d_in + d_out)."""
    return sum(c.lora_params(rank) for c in candidates)


@dataclass(frozen=True)
class Match:
    """A matched setting: DiffoRA's rank at a budget against LoRA at a reference rank.

    Attributes:
        target_rank: The reference LoRA rank r0 (on all candidates).
        budget: The selection ratio rho.
        n: Number of candidate modules.
        k: Modules kept, max(1, round(budget * n)).
        rank: The matched DiffoRA rank.
        target_params: LoRA r0 on all candidates.
        expected_params: Kept adapter parameters expected at ``rank`` (mean over k-subsets).
        min_params: Kept adapter parameters if the k smallest modules are kept.
        max_params: ... if the k largest are kept.
    """

    target_rank: int
    budget: float
    n: int
    k: int
    rank: int
    target_params: int
    expected_params: float
    min_params: int
    max_params: int

    @property
    def ratio(self) -> float:
        """Expected / target: 1.0 is a perfect match."""
        return self.expected_params / self.target_params

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def expected_kept_params(candidates: Sequence[Candidate], rank: int, budget: float) -> float:
    """Mean adapter parameters over all k-subsets: r * (k / n) * sum (d_in + d_out)."""
    n = len(candidates)
    return lora_params(candidates, rank) * num_kept(budget, n) / n


def matched_rank(candidates: Sequence[Candidate], budget: float, target_rank: int) -> Match:
    """The rank whose expected kept adapter parameters are closest to LoRA ``target_rank``.

    Args:
        candidates: All candidate modules of the backbone.
        budget: The selection ratio rho in (0, 1].
        target_rank: The reference LoRA rank on all candidates (8 or 2 in the AdaLoRA tables).

    Returns:
        The matched setting, with the expected count and its bounds.

    Raises:
        ValueError: No candidates, a budget outside (0, 1] or a reference rank below 1.
    """
    if not candidates:
        raise ValueError("parameter matching needs at least one candidate module.")
    if target_rank < 1:
        raise ValueError(f"match.target_rank={target_rank}: the LoRA rank must be >= 1.")
    n = len(candidates)
    k = num_kept(budget, n)
    target = lora_params(candidates, target_rank)
    ideal = target_rank * n / k
    # The cost is linear in the rank: the best integer is one of the two around the ideal.
    options = sorted({max(1, math.floor(ideal)), max(1, math.ceil(ideal))})
    rank = min(
        options, key=lambda r: (abs(expected_kept_params(candidates, r, budget) - target), r)
    )
    sizes = sorted(c.lora_params(rank) for c in candidates)
    return Match(
        target_rank=int(target_rank),
        budget=float(budget),
        n=n,
        k=k,
        rank=int(rank),
        target_params=target,
        expected_params=expected_kept_params(candidates, rank, budget),
        min_params=sum(sizes[:k]),
        max_params=sum(sizes[-k:]),
    )


@dataclass(frozen=True)
class Achieved:
    """Adapter parameters a final mask actually keeps, against the matching target.

    Attributes:
        params: r * sum over kept modules of (d_in + d_out).
        target_params: LoRA ``target_rank`` on all candidates.
        ratio: ``params / target_params``.
        kept: Number of kept modules.
        by_type: Kept adapter parameters per module type.
    """

    params: int
    target_params: int
    ratio: float
    kept: int
    by_type: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def achieved(
    kept: Sequence[bool], candidates: Sequence[Candidate], rank: int, target_rank: int
) -> Achieved:
    """Adapter parameters kept by a final mask (``Mask.kept``) vs LoRA ``target_rank``.

    Args:
        kept: One flag per candidate, in candidate order (``Mask.kept``).
        candidates: All candidate modules.
        rank: The rank the kept adapters have.
        target_rank: The reference LoRA rank on all candidates.

    Raises:
        ValueError: ``kept`` does not have one flag per candidate.
    """
    if len(kept) != len(candidates):
        raise ValueError(f"mask has {len(kept)} entries for {len(candidates)} candidates")
    by_type: dict[str, int] = {}
    params = 0
    for cand, keep in zip(candidates, kept):
        cost = cand.lora_params(rank) if keep else 0
        by_type[cand.module_type] = by_type.get(cand.module_type, 0) + cost
        params += cost
    target = lora_params(candidates, target_rank)
    return Achieved(params, target, params / target, int(sum(bool(k) for k in kept)), by_type)


def params_rank(budget: float, target_rank: int) -> int:
    """The rank of a selecting method matched under ``budget_unit=params``: round(r0 / budget).

    At rank r the budget's fraction of all candidates is budget * r * sum (d_in + d_out), so
    r = r0 / budget makes it LoRA r0's count; with an integer r the target stays LoRA r0's count
    exactly (budget.for_run) and only the share of modules kept moves (to r0 / r). Ties go to
    the lower rank.

    Raises:
        ValueError: A budget outside (0, 1] or a reference rank below 1.
    """
    num_kept(budget, 1)  # the range check
    if target_rank < 1:
        raise ValueError(f"match.target_rank={target_rank}: the LoRA rank must be >= 1.")
    ideal = target_rank / budget
    options = sorted({max(1, math.floor(ideal)), max(1, math.ceil(ideal))})
    return min(options, key=lambda r: (abs(r * budget - target_rank), r))


def masked_rank(
    method: str,
    candidates: Sequence[Candidate],
    budget: float,
    target_rank: int,
    tolerance: float = 0.05,
) -> int:
    """The matched rank of a method keeping k of n candidates, logged with its expected count.

    Each method decides how its rank is matched (``Method.matched_rank`` in ``methods/``); the
    methods that keep k of the n candidates (DiffoRA, a random mask) call this.

    Raises:
        ValueError: A bad ``target_rank`` or ``budget``.
    """
    match = matched_rank(candidates, budget, target_rank)
    level = logging.WARNING if abs(match.ratio - 1.0) > tolerance else logging.INFO
    log.log(
        level,
        "match: %s budget %.3g keeps %d/%d modules; rank %d expects %.0f adapter params vs "
        "LoRA r=%d's %d (ratio %.3f, tolerance %.2f; achieved lies in [%d, %d] by what is kept)",
        method,
        match.budget,
        match.k,
        match.n,
        match.rank,
        match.expected_params,
        target_rank,
        match.target_params,
        match.ratio,
        tolerance,
        match.min_params,
        match.max_params,
    )
    return match.rank


def matched_table(
    backbones: dict[str, Sequence[Candidate]] | None = None,
    budgets: Sequence[float] = (0.25, 0.5, 0.75),
    target_ranks: Sequence[int] = (8, 2),
) -> str:
    """A Markdown table of matched settings (the README's table is a selection of its rows).

    Args:
        backbones: Display name -> candidate modules; default: MiniLM-L6 and DeBERTa-v3-base
            (their candidates from the sizes alone, no weights needed).
        budgets: Budgets to match at.
        target_ranks: LoRA ranks on all candidates to match.
    """
    if backbones is None:
        backbones = {
            "MiniLM-L6": grid_candidates(6, 384, 1536),
            "DeBERTa-v3-base": grid_candidates(12, 768, 3072),
        }
    lines = [
        "| backbone | reference | LoRA params | budget | k / n | DiffoRA r | expected params "
        "| ratio | range (smallest-largest kept) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, candidates in backbones.items():
        for target_rank in target_ranks:
            for budget in budgets:
                m = matched_rank(candidates, budget, target_rank)
                lines.append(
                    f"| {name} | LoRA r={target_rank} | {m.target_params:,} | {budget} "
                    f"| {m.k} / {m.n} | {m.rank} | {m.expected_params:,.0f} | {m.ratio:.3f} "
                    f"| {m.min_params:,} - {m.max_params:,} |"
                )
    return "\n".join(lines)


def grid_candidates(
    layers: int, hidden: int, intermediate: int, prefix: str = "encoder.layer"
) -> list[Candidate]:
    """Candidates of a BERT-style encoder from its sizes (no weights): q, k, v, o, ffn_in, ffn_out.

    Used for planning tables and tests, e.g. MiniLM-L6 (6, 384, 1536) or DeBERTa-v3-base
    (12, 768, 3072).
    """
    shapes = {
        "q": (hidden, hidden),
        "k": (hidden, hidden),
        "v": (hidden, hidden),
        "o": (hidden, hidden),
        "ffn_in": (hidden, intermediate),
        "ffn_out": (intermediate, hidden),
    }
    return [
        Candidate(f"{prefix}.{layer}.{module_type}", layer, module_type, d_in, d_out)
        for layer in range(layers)
        for module_type, (d_in, d_out) in shapes.items()
    ]


def params_table(
    backbones: dict[str, Sequence[Candidate]] | None = None,
    budgets: Sequence[float] = (0.25, 0.5, 0.75),
    target_ranks: Sequence[int] = (8, 2),
) -> str:
    """Matched settings under ``budget_unit=params`` (the default) as a Markdown table.

    The target is LoRA r0's count exactly; the cut keeps within half of the largest module (at
    the matched rank) of it, whatever the search keeps.
    """
    if backbones is None:
        backbones = {
            "MiniLM-L6": grid_candidates(6, 384, 1536),
            "DeBERTa-v3-base": grid_candidates(12, 768, 3072),
        }
    lines = [
        "| backbone | reference | target (LoRA params) | budget | DiffoRA r | share kept (r0 / r) "
        "| achieved within ± |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, candidates in backbones.items():
        largest = max(c.d_in + c.d_out for c in candidates)
        for target_rank in target_ranks:
            for budget in budgets:
                rank = params_rank(budget, target_rank)
                lines.append(
                    f"| {name} | LoRA r={target_rank} | {lora_params(candidates, target_rank):,} "
                    f"| {budget} | {rank} | {target_rank / rank:.3f} | {rank * largest // 2:,} |"
                )
    return "\n".join(lines)
