"""AdaLoRA's recipe (conf/method/adalora.yaml) reaches peft and the training loop as configured.

These check that the settings are applied (the update scale in every SVD layer, the schedule in
steps, the trace of the adapters' movement), not what accuracy they give: BENCHMARKS.md, "AdaLoRA
as its authors run it (issue 20)", has the measurements.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from peft.tuners.adalora import SVDLinear

from diffora_lab import backbones, train
from diffora_lab.config import validate
from diffora_lab.methods.adalora import adapter_stats, attach_adalora, recipe, schedule


def fresh_model(cfg):
    model = backbones.load_backbone(cfg.backbone, 2, vocab_size=1000)
    candidates = backbones.find_candidates(
        model, cfg.backbone.layer_pattern, dict(cfg.backbone.module_types)
    )
    return attach_adalora(cfg, model, candidates)


def svd_layers(model) -> list[SVDLinear]:
    return [m for m in model.modules() if isinstance(m, SVDLinear)]


@pytest.mark.parametrize("scale", [2.0, 16.0])
def test_every_svd_layer_applies_the_configured_scale(scale):
    cfg = compose_config(["+experiment=smoke", "method=adalora", "rank=4", f"method.scale={scale}"])
    model = fresh_model(cfg)
    layers = svd_layers(model)
    assert len(layers) == len(cfg.backbone.module_types) * 2  # tiny_deberta: 2 layers
    for layer in layers:
        # peft multiplies by scaling and divides by ranknum (the initial rank, 6 here).
        assert float(layer.ranknum["default"]) == 6
        factor = layer.scaling["default"] / float(layer.ranknum["default"])
        assert factor == pytest.approx(scale, rel=1e-4)
    assert recipe(model)["scaling"] == pytest.approx(scale)
    # The trace measures what the adapter adds: delta W = factor * P diag(E) Q (E = 0 first).
    assert adapter_stats(model)["delta_w"] == 0
    layer = layers[0]
    with torch.no_grad():
        layer.lora_E["default"].fill_(1.0)
    left, right = layer.lora_B["default"], layer.lora_A["default"]
    expected = scale * float(torch.linalg.matrix_norm(left @ right))
    assert adapter_stats(model)["delta_w"] == pytest.approx(expected, rel=1e-4)


def test_the_schedule_fractions_become_steps_in_peft():
    cfg = compose_config(
        [
            "+experiment=smoke",
            "method=adalora",
            "train.max_steps=200",
            "method.tinit_ratio=0.1",
            "method.tfinal_ratio=0.5",
            "method.delta_t_ratio=0.02",
            "method.orth_reg_weight=0.3",
        ]
    )
    got = recipe(fresh_model(cfg))
    assert (got["tinit"], got["tfinal"], got["delta_t"], got["total_step"]) == (20, 100, 4, 200)
    assert got["orth_reg_weight"] == 0.3
    # A budget too short for the pruning phase is refused with the settings to change.
    with pytest.raises(ValueError, match="method.tinit_ratio=0.6 and method.tfinal_ratio=0.5"):
        schedule(200, 0.6, 0.5, 0.01)


def test_a_run_records_the_recipe_and_the_adapters_movement(tmp_path):
    steps = 12
    cfg = compose_config(
        [
            "+experiment=smoke",
            "logger=none",
            "method=adalora",
            "rank=4",
            f"train.max_steps={steps}",
            "method.trace_every=4",
            "method.scale=8",
        ],
        tmp_path,
    )
    results = train.run(cfg, tmp_path / "run")
    adalora = results["adalora"]
    assert adalora["recipe"]["scaling"] == pytest.approx(8.0)
    assert adalora["recipe"]["total_step"] == steps
    trace = adalora["trace"]
    assert [t["step"] for t in trace] == [0, 4, 8, steps - 1]
    # E starts at zero and moves; the last record counts the allocated (final) rank.
    assert trace[0]["e_norm"] < trace[-1]["e_norm"]
    assert trace[-1]["delta_w"] > 0
    assert trace[-1]["rank"] == adalora["total_rank"] == trace[-1]["budget"]
    assert trace[0]["rank"] == trace[0]["budget"] == 6 * len(adalora["ranks"])


@pytest.mark.parametrize("ratio", ["1.0", "0.5", "1.05"])
def test_an_initial_rank_with_nothing_to_prune_is_refused_before_loading(ratio):
    # peft 0.21 accepts init_r == target_r, then fails at the first allocation (kthvalue, k=0).
    cfg = compose_config(["method=adalora", "rank=8", f"method.init_ratio={ratio}"])
    with pytest.raises(ValueError, match=rf"method.init_ratio={ratio}: the initial rank"):
        validate(cfg)
    cfg = compose_config(["method=adalora", "rank=8", "method.init_ratio=1.125"])
    validate(cfg)  # round(9) > 8: one singular value per module to prune


@pytest.mark.parametrize(
    ("experiment", "task_type", "heads"),
    [("smoke", "SEQ_CLS", {"classifier", "pooler"}), ("smoke_decoder", "CAUSAL_LM", set())],
)
def test_peft_task_type_and_head_follow_the_backbone_as_in_lora(
    tmp_path, experiment, task_type, heads
):
    from diffora_lab.train import assemble, prepare

    cfg = compose_config([f"+experiment={experiment}", "method=adalora", "rank=4"], tmp_path)
    model = assemble(cfg, prepare(cfg)).module.model
    config = model.peft_config["default"]
    assert config.task_type == task_type
    # The classifier head trains and is saved; a causal LM's tied lm_head stays frozen.
    assert set(config.modules_to_save or []) >= heads
    head_trains = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert bool(head_trains) == bool(heads)


# The recipe of conf/method/adalora.yaml (BENCHMARKS.md, "AdaLoRA in this harness (issue 20.4)").
RECIPE = {"scale": 64.0, "orth": 0.1}  # and the schedule: 10 % at init_r, the last 50 % at target


def test_the_default_recipe_reaches_peft():
    cfg = compose_config(["+experiment=smoke", "method=adalora", "rank=8", "train.max_steps=300"])
    model = fresh_model(cfg)
    for layer in svd_layers(model):  # peft: lora_alpha / ranknum, ranknum = init_r = 12
        assert float(layer.ranknum["default"]) == 12
        factor = layer.scaling["default"] / float(layer.ranknum["default"])
        assert factor == pytest.approx(RECIPE["scale"], rel=1e-4)
    used = recipe(model)
    assert used["scaling"] == pytest.approx(RECIPE["scale"])
    assert (used["tinit"], used["tfinal"], used["delta_t"]) == (30, 150, 1)
    assert used["orth_reg_weight"] == RECIPE["orth"]
    # LoRA keeps its own scale (s = 2): the recipe is AdaLoRA's, not the harness's default.
    lora = compose_config(["+experiment=smoke", "method=lora"])
    assert float(lora.method.scale) == 2.0 != RECIPE["scale"]


def test_the_recipe_scale_multiplies_how_far_the_first_step_moves(tmp_path):
    # E starts at zero and Adam's first step moves each singular value by about the lr whatever
    # the gradient's size, and P, Q see only the regulariser: after one step ||delta W|| grows
    # at least in proportion to the update scale (more where Adam's eps damps the small
    # gradients of s = 2). This is why s = 2 leaves AdaLoRA behind in 300 steps.
    moved = {}
    for scale in (2.0, RECIPE["scale"]):
        cfg = compose_config(
            [
                "+experiment=smoke",
                "logger=none",
                "method=adalora",
                "rank=4",
                "train.max_steps=8",
                "method.trace_every=1",
                f"method.scale={scale}",
                "method.lora_dropout=0",
            ],
            tmp_path / str(scale),
        )
        results = train.run(cfg, tmp_path / str(scale) / "run")
        moved[scale] = results["adalora"]["trace"][0]["delta_w"]
    assert moved[2.0] > 0
    assert moved[RECIPE["scale"]] / moved[2.0] >= 0.95 * RECIPE["scale"] / 2
