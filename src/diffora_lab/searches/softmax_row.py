"""``search=softmax_row``: a row softmax, so the module types of a layer compete (the paper's
alternative relaxation); one cut at the end by the budget rule on the gates' global order. Like
the faithful search it does not look at the budget."""

from __future__ import annotations

from diffora_lab.searches.registry import SearchVariant, register_search


@register_search
class SoftmaxRow(SearchVariant):
    name = "softmax_row"
    preset = "softmax_row"
    relaxation = "softmax_row"
    budget_dependent = False
