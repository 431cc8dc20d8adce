"""The budget in parameters (budget.py): one rule keeps modules in score order up to a target.

The rule is used by the search's cut, the progressive search's removals and the random mask;
these tests pin it down on candidate lists with mixed sizes (an encoder, a grouped-query
decoder), then check what the runs record.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForSequenceClassification

from diffora_lab import runs
from diffora_lab.backbones import Candidate, find_candidates
from diffora_lab.budget import Budget, for_run, in_modules, keep_in_order, num_kept
from diffora_lab.config import SearchSettings
from diffora_lab.dam import DAM, Mask
from diffora_lab.families import FAMILIES
from diffora_lab.matching import grid_candidates, lora_params, params_rank
from diffora_lab.methods import get_method
from diffora_lab.methods.fixed_choice import closest_rank
from diffora_lab.methods.random_mask import random_mask
from diffora_lab.searches import get_search
from diffora_lab.train import run

LLAMA_TYPES = dict(FAMILIES["llama"].modules)  # the family table's decoder row


@pytest.fixture(scope="module")
def gqa_candidates() -> list[Candidate]:
    """A 3-layer Llama with grouped-query attention: k and v are a quarter of q, the MLP wider."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        pad_token_id=0,
        num_labels=2,
    )
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    return find_candidates(model, r"model\.layers\.(\d+)\.", LLAMA_TYPES)


def params_budget(
    candidates: list[Candidate], fraction: float, rank: int = 8, match: int | None = None
) -> Budget:
    """The budget of a run with these settings (the config's keys, without composing it)."""
    cfg = OmegaConf.create(
        {"budget": fraction, "rank": rank, "budget_unit": "params", "match": {"target_rank": match}}
    )
    return for_run(cfg, candidates)


def test_gqa_candidates_have_their_real_sizes(gqa_candidates):
    sizes = {c.module_type: (c.d_in, c.d_out) for c in gqa_candidates if c.layer == 0}
    assert sizes["q"] == (64, 64) and sizes["k"] == sizes["v"] == (64, 16)
    assert sizes["gate"] == sizes["up"] == (64, 176) and sizes["down"] == (176, 64)
    budget = params_budget(gqa_candidates, 0.5)
    assert budget.total == lora_params(gqa_candidates, 8)
    assert budget.target == 0.5 * budget.total


@pytest.mark.parametrize("source", ["gqa", "encoder"])
def test_the_rule_keeps_a_prefix_of_the_order_within_half_a_module(gqa_candidates, source):
    candidates = gqa_candidates if source == "gqa" else grid_candidates(4, 32, 128)
    rng = random.Random(0)
    for trial in range(200):
        fraction = rng.choice([0.03, 0.05, 0.125, 0.25, 0.37, 0.5, 0.75, 0.9, 1.0])
        budget = params_budget(candidates, fraction, rank=rng.choice([1, 4, 8]))
        scores = torch.rand(len(candidates), generator=torch.Generator().manual_seed(trial))
        kept = budget.keep(scores)
        achieved = budget.count(kept)
        # Gate order: the kept modules are the best-scored ones, a prefix of the order.
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        m = int(kept.sum())
        assert m >= 1 and sorted(order[:m]) == kept.nonzero().flatten().tolist()
        # Within half a module: the first module left out would have overshot by more than
        # half of itself, the last one kept did not.
        if m < len(order):
            assert achieved + budget.sizes[order[m]] / 2 > budget.target
        if m > 1:
            assert achieved - budget.sizes[order[m - 1]] / 2 <= budget.target
        if achieved > 2 * budget.target:  # one module alone, more than twice the target
            assert m == 1 and achieved - budget.target < budget.largest
        else:
            assert abs(achieved - budget.target) <= budget.largest / 2
        assert budget.summary(kept.tolist())["within_one_module"]


def test_ties_go_to_the_earlier_module_and_one_module_is_always_kept():
    sizes = [10, 10, 10, 10]
    kept = keep_in_order(torch.full((2, 2), 0.5), sizes, target=20)
    assert kept.flatten().tolist() == [True, True, False, False]
    assert kept.shape == (2, 2)
    # A target far below the smallest module still keeps the best one.
    assert keep_in_order(torch.tensor([0.1, 0.9, 0.5]), [100, 100, 100], 1).tolist() == [
        False,
        True,
        False,
    ]
    # Exactly half a module over or under: the tie keeps it (halves round up, as k does).
    assert keep_in_order(torch.tensor([3.0, 2.0, 1.0]), [10, 10, 10], 15).tolist() == [
        True,
        True,
        False,
    ]


def test_the_rule_stops_at_the_first_module_that_overshoots():
    # A large module in second place ends the cut even though a small one after it would fit.
    kept = keep_in_order(torch.tensor([0.9, 0.8, 0.7]), [10, 100, 10], target=40)
    assert kept.tolist() == [True, False, False]
    # Modules already removed (not eligible) are never kept, whatever their score.
    eligible = torch.tensor([False, True, True])
    kept = keep_in_order(torch.tensor([0.9, 0.8, 0.7]), [10, 10, 10], 20, eligible)
    assert kept.tolist() == [False, True, True]


@pytest.mark.parametrize("n", [1, 5, 12, 36, 72])
def test_the_modules_unit_keeps_the_papers_k(n):
    for fraction in [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.75, 1.0]:
        budget = in_modules(fraction, n)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
        assert int(budget.keep(scores).sum()) == num_kept(fraction, n)


def test_a_larger_target_keeps_a_superset():
    """Cutting to a larger target and then a smaller one keeps what the smaller one keeps: the
    progressive search of a sweep passes each budget's state on its way down."""
    candidates = grid_candidates(3, 32, 128)
    scores = torch.rand(len(candidates), generator=torch.Generator().manual_seed(3))
    budget = params_budget(candidates, 0.5)
    for big, small in [(0.9, 0.5), (0.5, 0.25), (0.75, 0.1)]:
        first = budget.keep(scores, big * budget.total)
        twice = budget.keep(scores, small * budget.total, eligible=first)
        assert torch.equal(twice, budget.keep(scores, small * budget.total))


# ------------------------------------------------------------------------- random mask


def test_random_mask_draws_until_the_count(gqa_candidates):
    types = list(LLAMA_TYPES)
    budget = params_budget(gqa_candidates, 0.25)
    masks = [random_mask(gqa_candidates, types, budget, seed, "llama") for seed in range(6)]
    for mask in masks:
        assert abs(budget.count(mask.kept) - budget.target) <= budget.largest / 2
        assert (mask.unit, mask.target, mask.k) == ("params", budget.target, sum(mask.kept))
    assert len({tuple(m.kept) for m in masks}) > 1
    # The same seed draws the same modules.
    assert random_mask(gqa_candidates, types, budget, 0, "llama").kept == masks[0].kept


# ------------------------------------------------------------------------------ matching


@pytest.mark.parametrize(("fraction", "rank"), [(0.25, 32), (0.5, 16), (0.75, 11), (0.3, 27)])
def test_matched_rank_and_exact_target(gqa_candidates, fraction, rank):
    assert params_rank(fraction, 8) == rank
    budget = params_budget(gqa_candidates, fraction, rank, match=8)
    assert budget.target == lora_params(gqa_candidates, 8)  # LoRA r=8's count, exactly
    for seed in range(20):
        scores = torch.rand(len(gqa_candidates), generator=torch.Generator().manual_seed(seed))
        achieved = budget.count(budget.keep(scores))
        assert abs(achieved - budget.target) <= budget.largest / 2


def test_matched_rank_ties_go_to_the_lower_rank():
    assert params_rank(0.8, 2) == 2  # 2.5: 2 and 3 are equally far
    assert params_rank(1.0, 8) == 8
    with pytest.raises(ValueError, match="budget"):
        params_rank(0.0, 8)


# ---------------------------------------------------------------- fixed-choice baselines


def test_fixed_choices_take_their_family_group_and_name_the_method_when_it_is_missing():
    def backbone(family: str, types: list[str]):
        cfg = OmegaConf.create({"backbone": {"name": family, "family": family}})
        cfg.backbone.module_types = types
        return cfg, [SimpleNamespace(module_type=t) for t in types]

    encoder = backbone("bert", ["q", "k", "v", "o", "ffn_in", "ffn_out"])
    assert get_method("lora_qv")().kept(*encoder) == [True, False, True, False, False, False]
    assert get_method("lora_attn")().kept(*encoder) == [True] * 4 + [False] * 2
    assert get_method("lora_mlp")().kept(*encoder) == [False] * 4 + [True] * 2
    llama = backbone("llama", list(LLAMA_TYPES))
    assert [t for t, k in zip(LLAMA_TYPES, get_method("lora_mlp")().kept(*llama)) if k] == [
        "gate", "up", "down"
    ]  # fmt: skip
    phi3 = backbone("phi3", ["qkv", "o", "gate_up", "down"])
    assert get_method("lora_qv")().kept(*phi3) == [True, False, False, False]  # peft's: fused qkv
    narrowed = backbone("llama", ["q", "k", "o"])  # backbone.module_types without v
    refusal = r"method=lora_qv: backbone=llama: .*needs module types \['v'\].*another fixed choice"
    with pytest.raises(ValueError, match=refusal):
        get_method("lora_qv")().kept(*narrowed)


def test_fixed_choice_rank_is_the_closest():
    assert closest_rank(1000, 100) == 10
    assert closest_rank(1049, 100) == 10 and closest_rank(1051, 100) == 11
    assert closest_rank(1050, 100) == 10  # a tie: the lower rank
    assert closest_rank(10, 100) == 1  # never below 1


@pytest.mark.parametrize(
    ("method", "fraction", "types"),
    [("lora_qv", 0.25, {"q", "v"}), ("lora_mlp", 0.125, {"ffn_in", "ffn_out"})],
)
def test_fixed_choice_run_records_its_rank_target_and_count(tmp_path, method, fraction, types):
    cfg = compose_config(
        ["+experiment=smoke", f"method={method}", f"budget={fraction}", "logger=none"], tmp_path
    )
    results = run(cfg, tmp_path / "run")
    # tiny_deberta: q, k, v, o cost 64 each per rank unit, ffn_in / ffn_out 96; 2 layers.
    sizes = {"q": 64, "k": 64, "v": 64, "o": 64, "ffn_in": 96, "ffn_out": 96}
    target = fraction * 8 * 2 * sum(sizes.values())
    group = 2 * sum(sizes[t] for t in types)
    assert results["rank"] == closest_rank(target, group)
    count = results["budget_count"]
    assert count["target"] == pytest.approx(target)
    assert count["achieved"] == results["rank"] * group == results["params"]["adapter"]
    assert {m.split(".")[-1] for m in results["kept_modules"]} == {
        {"q": "query_proj", "v": "value_proj", "ffn_in": "dense", "ffn_out": "dense"}[t]
        for t in types
    }
    assert set(results["kept_by_type"]) >= types
    assert all(n == 2 for t, n in results["kept_by_type"].items() if t in types)
    mask = Mask.load(tmp_path / "run" / "dam" / "mask.json")
    assert mask.source == "fixed" and mask.unit == "params" and mask.target == pytest.approx(target)
    # "Within one module" is measured in a module at the reference rank (FFN: 8 x 96), the rank
    # the target is counted at, not at the rank the choice picked.
    assert count["tolerance"] == 8 * 96 and count["largest_module"] == results["rank"] * 96
    assert count["within_one_module"] is (abs(count["achieved"] - target) <= 8 * 96)


def test_one_module_is_counted_at_the_rank_the_budget_is_counted_at():
    minilm = grid_candidates(6, 384, 1536)  # the low-budget study's candidates (BENCHMARKS.md)
    cfg = OmegaConf.create({"budget": 0.05, "rank": 8, "budget_unit": "params"})
    own = for_run(cfg, minilm)  # DiffoRA: counted at its own rank
    assert own.one_module == own.largest == 8 * (384 + 1536)
    cfg.rank = 1  # lora_mlp at 5 %: rank 1 on the 12 FFN matrices, the target counted at rank 8
    fixed = for_run(cfg, minilm, reference_rank=8)
    assert fixed.target == own.target == 0.05 * 331_776
    assert fixed.largest == 1920 and fixed.one_module == 8 * 1920
    summary = fixed.summary([c.module_type.startswith("ffn") for c in minilm])
    # 23,040 against 16,588.8: 6,451 away, inside one module at rank 8 (15,360), though more
    # than three at rank 1 (1,920 each)
    assert summary["achieved"] == 23_040 and summary["within_one_module"] is True
    assert runs.off_target({"budget_count": summary}) is False
    cfg.match = {"target_rank": 2}  # match=lora_r2: the target and one module at rank 2
    matched = for_run(cfg, minilm, reference_rank=8)
    assert matched.target == 2 * 331_776 / 8 and matched.one_module == 2 * 1920
    older = {k: v for k, v in summary.items() if k != "tolerance"}  # recorded before tolerance
    assert runs.off_target({"budget_count": older}) is True


# ---------------------------------------------------------- the progressive search's end


def settings(steps: int = 40, warmup: int = 4) -> SearchSettings:
    return SearchSettings(
        enabled=True,
        steps=steps,
        warmup_steps=warmup,
        arch_lr=0.05,
        arch_betas=(0.5, 0.999),
        arch_weight_decay=0.0,
        tau_start=1.0,
        tau_end=1.0,
        arch_grad="first",
        budget=0.5,
        fold_gates=True,
        weight_sharing=True,
        merge_search_split=False,
    )


def drive(variant, dam: DAM, steps: int, seed: int, snapshots: bool = True) -> list[torch.Tensor]:
    """The search's calls to the variant, with gates that drift randomly between steps."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            dam.logits += 0.5 * torch.randn(dam.logits.shape, generator=generator)
        for budget in variant.snapshot_budgets(step) if snapshots else []:
            variant.restrict(dam, budget, 1.0)
            states.append(dam.active.clone())
        if step >= variant.cut_step:
            break
        variant.after_step(dam, step, 1.0)
    return states


@pytest.mark.parametrize("source", ["gqa", "encoder"])
def test_progressive_end_state_is_what_the_cut_keeps(gqa_candidates, source):
    candidates = gqa_candidates if source == "gqa" else grid_candidates(4, 32, 128)
    types = list(LLAMA_TYPES) if source == "gqa" else ["q", "k", "v", "o", "ffn_in", "ffn_out"]
    for seed in range(5):
        budget = params_budget(candidates, 0.3)
        variant = get_search("progressive")({"prune_end": 0.75}, settings(), budget)
        dam = DAM(len(candidates) // len(types), types)
        drive(variant, dam, 40, seed)
        active = dam.active.clone()
        kept = variant.cut(dam, dam.gates(1.0).detach())
        assert torch.equal(kept.view_as(active), active.cpu())  # the cut removes nothing in use
        assert abs(budget.count(kept.flatten()) - budget.target) <= budget.largest / 2
        assert bool((dam.gates(1.0)[~dam.active] == 0).all())


def test_a_sweep_search_passes_each_budgets_state_and_ends_like_a_lone_search(gqa_candidates):
    """The smallest budget of a sweep ends where its lone search ends; each larger budget's
    snapshot is what the lone search of the sweep's smallest held when it passed there."""
    budgets = {f: params_budget(gqa_candidates, f) for f in (0.2, 0.5, 0.8)}
    sweep = list(budgets.values())
    types = list(LLAMA_TYPES)

    def fresh(fraction, with_sweep):
        variant = get_search("progressive")(
            {"prune_end": 0.75}, settings(), budgets[fraction], sweep if with_sweep else ()
        )
        return variant, DAM(3, types)

    lone, lone_dam = fresh(0.2, with_sweep=False)
    drive(lone, lone_dam, 40, seed=7)
    shared, shared_dam = fresh(0.2, with_sweep=True)
    states = drive(shared, shared_dam, 40, seed=7)
    assert torch.equal(shared_dam.active, lone_dam.active)
    assert len(states) == 3  # one snapshot per budget, the largest first
    counts = [budgets[0.2].count(s.flatten()) for s in states]
    assert counts == sorted(counts, reverse=True)
    for fraction, state in zip((0.8, 0.5, 0.2), states):
        mine, dam = fresh(fraction, with_sweep=True)
        assert mine.cut_step <= lone.cut_step
        drive(mine, dam, 40, seed=7)  # the run of that budget alone, stopping at its cut
        assert torch.equal(mine.cut(dam, dam.gates(1.0).detach()).view_as(state), state)
        assert abs(budgets[0.2].count(state.flatten()) - budgets[fraction].target) <= (
            budgets[fraction].largest / 2
        )


def test_the_random_order_control_removes_modules_by_its_seed_not_by_the_gates(gqa_candidates):
    """search=progressive_random: the same schedule as the default search, but what leaves is
    a fixed seeded order, so gates that drift differently end in the same kept set: the prefix
    of that order within the budget. Another seed keeps another set."""
    types = list(LLAMA_TYPES)
    budget = params_budget(gqa_candidates, 0.3)

    def kept(order_seed: int, gate_seed: int) -> torch.Tensor:
        options = {"prune_end": 0.75, "order_seed": order_seed}
        variant = get_search("progressive_random")(options, settings(), budget)
        dam = DAM(3, types)
        drive(variant, dam, 40, gate_seed)
        return variant.cut(dam, dam.gates(1.0).detach()).flatten()

    order = torch.rand((3, len(types)), generator=torch.Generator().manual_seed(3))
    expected = budget.keep(order).flatten()
    for gate_seed in range(3):
        assert torch.equal(kept(3, gate_seed), expected)
    assert abs(budget.count(expected) - budget.target) <= budget.largest / 2
    assert not torch.equal(kept(4, 0), expected)
    # The default search on the same drifting gates keeps what the gates say, not this order.
    default = get_search("progressive")({"prune_end": 0.75}, settings(), budget)
    dam = DAM(3, types)
    drive(default, dam, 40, 0)
    assert not torch.equal(default.cut(dam, dam.gates(1.0).detach()).flatten(), expected)


@pytest.mark.parametrize("seed", [-1, "x", True])
def test_the_random_order_control_refuses_a_bad_seed(seed):
    options = OmegaConf.create({"prune_end": 0.75, "order_seed": seed})
    with pytest.raises(ValueError, match="search.order_seed"):
        get_search("progressive_random").validate(options, settings())


def test_the_random_order_control_takes_the_runs_seed():
    cfg = compose_config(["search=progressive_random", "seed=5"])
    assert cfg.search.order_seed == 5 and cfg.search.prune_end == 0.75


# ------------------------------------------------------------------ what the runs record


def test_a_default_run_records_unit_target_and_count(reference_run):
    results = reference_run.results  # +experiment=smoke: the default budget unit
    mask = json.loads((reference_run.out / "dam" / "mask.json").read_text())
    # tiny_deberta at rank 8: 2 layers x (4 x 512 + 2 x 768) adapter parameters in all.
    assert (mask["unit"], mask["target"]) == ("params", 0.5 * 7168)
    count = results["budget_count"]
    assert results["budget_unit"] == "params"
    assert count["unit"] == "params" and count["target"] == 0.5 * 7168
    assert count["achieved"] == results["params"]["adapter"] == count["achieved_params"]
    assert abs(count["achieved"] - count["target"]) <= 768 / 2
    assert count["largest_module"] == 768 and count["within_one_module"] is True
    assert sum(mask["kept"]) == mask["k"] == results["k"]
