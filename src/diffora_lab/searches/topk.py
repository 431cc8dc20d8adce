"""``search=topk`` (ours): sigmoid gates held at a sum of k by one shared threshold.

:func:`diffora_lab.dam.budget_sigmoid`: raising one gate lowers the others, so the gates compete
for the budget instead of drifting to 1 together. k is the budget's expected module count
(:attr:`diffora_lab.budget.Budget.expected_count`: exactly k under ``budget_unit=modules``). One
cut at the end by the budget rule.
"""

from __future__ import annotations

from diffora_lab.searches.registry import SearchVariant, register_search


@register_search
class TopK(SearchVariant):
    name = "topk"
    preset = "topk"
    relaxation = "topk"
    budget_dependent = True
