"""``search=faithful``: the paper's search (METHOD.md, Phases 1-2).

Independent sigmoid gates, nothing pulling them towards the budget, one cut at the end of the
search by the budget rule (budget.py). Its end state does not depend on the budget, so every
budget of a sweep shares one search.
"""

from __future__ import annotations

from diffora_lab.searches.registry import SearchVariant, register_search


@register_search
class Faithful(SearchVariant):
    name = "faithful"
    preset = "faithful"
    relaxation = "sigmoid"
    budget_dependent = False
