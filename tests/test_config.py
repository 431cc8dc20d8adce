"""Tests for the Hydra configs and diffora_lab.config: composition, settings, bad input.

Every experiment file and every option of the primary config's groups must compose and pass
:func:`~diffora_lab.config.validate`; every user mistake must fail early with a ``ValueError``
(``ConfigError`` from :func:`~diffora_lab.train.prepare`) naming the setting, and the CLI must
print it without a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_GLUE, compose_config
from omegaconf import OmegaConf

from diffora_lab.config import optim_settings, search_settings, validate
from diffora_lab.methods import get_method
from diffora_lab.runtime import config_dir
from diffora_lab.tasks import get_task, load_hub
from diffora_lab.train import ConfigError, prepare

CONF = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Groups picked with `group=option`; `experiment` is added with `+`, `hydra` is Hydra's own.
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra")
)


def primary_defaults() -> set[str]:
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {next(iter(entry)) for entry in defaults if isinstance(entry, dict)}


def group_options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


# --------------------------------------------------------------------------------- composition


def test_config_tree_has_the_expected_groups():
    assert {"backbone", "task", "method", "logger"} <= set(GROUPS)
    assert {"backbone", "task", "method", "logger"} <= primary_defaults()
    assert "smoke" in EXPERIMENTS and len(EXPERIMENTS) >= 9


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_config([f"+experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)
    optim = optim_settings(cfg)
    search = search_settings(cfg)
    assert search.enabled  # the default method is diffora
    assert 0 <= search.warmup_steps < search.steps < optim.max_steps
    assert 0.0 < search.budget <= 1.0
    if name.startswith("deberta_"):
        assert cfg.backbone.name == "deberta_v3_base"
        assert cfg.task.name == name.removeprefix("deberta_")
    # An experiment's overrides land where they belong, not in a stray top-level key.
    assert set(cfg) <= set(compose_config([]))


def test_smoke_experiment_is_small_and_offline():
    cfg = compose_config(["+experiment=smoke"])
    prepared = prepare(cfg)  # the tests run with HF_HUB_OFFLINE=1: nothing may be downloaded
    assert len(prepared.candidates) == 12  # 2 layers x 6 module types
    search = search_settings(cfg)
    assert 0 < search.warmup_steps < search.steps < optim_settings(cfg).max_steps


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_group_option_composes_and_validates(group, option):
    prefix = "" if group in primary_defaults() else "+"
    cfg = compose_config([f"{prefix}{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)
    # The file name is the name the code knows it by (what `group=option` promises); a preset
    # of a method (diffora_faithful) is named after it and says which preset it is.
    if group == "method":
        name = get_method(cfg.method.name).name
        assert option == name or option == f"{name}_{cfg.method.preset}"
    elif group == "task":
        assert get_task(cfg.task.name).name == option
    elif group in ("backbone", "logger"):
        assert cfg[group].name == option
    elif group == "match":
        expected = None if option == "none" else int(option.rsplit("_r", 1)[1])
        assert cfg.match.get("target_rank") == expected


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_every_method_composes_with_the_smoke_experiment(option):
    cfg = compose_config(["+experiment=smoke", f"method={option}"])
    validate(cfg)
    # Presets of one method (diffora, diffora_faithful) share its name.
    assert option.startswith(cfg.method.name)
    assert search_settings(cfg).enabled == get_method(cfg.method.name).searches


# ------------------------------------------------------------------------- derived settings


def test_search_settings_steps_and_switches():
    cfg = compose_config(["+experiment=smoke", "dam.search_ratio=0.25"])
    assert search_settings(cfg).steps == 10
    cfg = compose_config(["+experiment=smoke", "dam.search_steps=7"])
    assert search_settings(cfg).steps == 7
    cfg = compose_config(["+experiment=smoke", "method=lora"])
    assert not search_settings(cfg).enabled and search_settings(cfg).steps == 0


def test_temperature_anneals_linearly_over_the_search():
    cfg = compose_config(["+experiment=smoke", "dam.tau=2.0", "dam.tau_end=0.5"])
    search = search_settings(cfg)
    taus = [search.tau_at(s) for s in range(search.steps + 5)]
    assert taus[0] == pytest.approx(2.0)
    assert taus[search.steps - 1] == pytest.approx(0.5)
    assert all(t == pytest.approx(0.5) for t in taus[search.steps - 1 :])
    assert all(a > b for a, b in zip(taus[: search.steps - 1], taus[1 : search.steps]))


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = compose_config(["+experiment=smoke", "train.max_steps=100", "train.warmup_ratio=0.1"])
    optim = optim_settings(cfg)
    lrs = [optim.lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(optim.lr / 10)
    assert max(lrs) == pytest.approx(optim.lr) == lrs[9]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[100] == 0.0 and min(lrs) >= 0.0


# ------------------------------------------------------------------------------- bad input

BAD_SETTINGS = [
    (["budget=0"], "budget"),
    (["budget=1.5"], "budget"),
    (["budget=half"], "budget"),
    (["budget=-0.25"], "budget"),
    (["budget=true"], "budget"),
    (["rank=0"], "rank"),
    (["rank=-3"], "rank"),
    (["rank=2.5"], "rank"),
    (["task.name=not_a_task"], "task"),
    (["method.name=prefix_tuning"], "method"),
    (["task=sst2", "task.data_dir=/nonexistent/glue"], "task.data_dir"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.accumulate=0"], "train.accumulate"),
    (["dam.search_split=1.0"], "dam.search_split"),
    (["dam.search_ratio=0"], "dam.search_ratio"),
    (["dam.tau=0"], "dam.tau"),
    (["dam.relaxation=softmax_row"], "dam.relaxation"),  # now search=softmax_row
    (["dam.order=second"], "dam.order"),  # now dam.arch_grad
    (["dam.arch_grad=third"], "dam.arch_grad"),
    (["dam.progressive=true"], "dam.progressive"),  # now search=progressive
    (["dam.budget_penalty=1"], "dam.budget_penalty"),  # now search=budget_penalty
    (["search.name=gumbel"], "search"),
    (["search.prune_end=0"], "search.prune_end"),
    (["search=budget_penalty", "search.weight=-1"], "search.weight"),
    (["budget_unit=flops"], "budget_unit"),
    (["dam.sweep_budgets=[0.25,0.75]"], "dam.sweep_budgets"),  # without the run's budget
    (["dam.sweep_budgets=[0.5,2]"], "dam.sweep_budgets"),
    (["dam.mask_path=/nonexistent/mask.json"], "dam.mask_path"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
]
TRAINER_SETTINGS = [
    (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val"),
    (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches"),
    (["+trainer.max_steps=10"], "trainer.max_steps"),
    (["trainer.precision=16-mixed"], "trainer.precision"),
    (["trainer.precision=16"], "trainer.precision"),
]


def ids(cases):
    return [" ".join(overrides) for overrides, _ in cases]


# Settings that would make the search a silent no-op.
NO_OP_SEARCH_SETTINGS = [
    (["dam.search_steps=100"], "dam.search_steps"),  # > train.max_steps: never discretizes
    (["dam.search_steps=0"], "dam.search_steps"),  # discretizes the initial gates
    (["dam.search_steps=-5"], "dam.search_steps"),
    (["dam.warmup_steps=20"], "dam.warmup_steps"),  # >= search steps: no architecture step
    (["dam.warmup_steps=-1"], "dam.warmup_steps"),
    (["train.lr=-0.001"], "train.lr"),
    (["dam.arch_lr=-0.05"], "dam.arch_lr"),
]


@pytest.mark.parametrize(("overrides", "setting"), BAD_SETTINGS, ids=ids(BAD_SETTINGS))
def test_validate_names_the_bad_setting(overrides, setting):
    cfg = compose_config(["+experiment=smoke", *overrides])
    with pytest.raises(ValueError, match=rf"(?<![\w.]){re.escape(setting)}\b"):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    NO_OP_SEARCH_SETTINGS,
    ids=ids(NO_OP_SEARCH_SETTINGS),
)
def test_validate_rejects_settings_that_make_the_search_a_no_op(overrides, setting):
    cfg = compose_config(["+experiment=smoke", *overrides])
    with pytest.raises(ValueError, match=rf"(?<![\w.]){re.escape(setting)}\b"):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    BAD_SETTINGS + TRAINER_SETTINGS,
    ids=ids(BAD_SETTINGS + TRAINER_SETTINGS),
)
def test_prepare_raises_config_error_naming_the_setting(overrides, setting):
    cfg = compose_config(["+experiment=smoke", *overrides])
    with pytest.raises(ConfigError, match=rf"(?<![\w.]){re.escape(setting)}\b"):
        prepare(cfg)


def test_prepare_accepts_the_smoke_config():
    prepared = prepare(compose_config(["+experiment=smoke"]))
    assert prepared.spec.name == "synthetic"
    assert len(prepared.candidates) == 12
    assert prepared.candidates[0].name == "deberta.encoder.layer.0.attention.self.query_proj"


def test_prepare_accepts_edge_budgets():
    from diffora_lab.dam import num_kept

    everything = prepare(compose_config(["+experiment=smoke", "budget=1.0"]))
    assert num_kept(1.0, len(everything.candidates)) == len(everything.candidates) == 12
    one = prepare(compose_config(["+experiment=smoke", "budget=0.01"]))
    assert num_kept(0.01, len(one.candidates)) == 1  # rounds to 0: still keeps one module


@pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="no shared GLUE folder")
def test_prepare_accepts_a_glue_folder():
    prepared = prepare(
        compose_config(["+experiment=smoke", "task=rte", f"task.data_dir={SHARED_GLUE}"])
    )
    assert prepared.spec.name == "rte"


def test_prepare_rejects_a_glue_task_the_hub_cannot_serve():
    try:
        load_hub(get_task("rte"))
    except RuntimeError:
        pass  # offline (as in these tests) and not cached: the run cannot get its data
    else:
        pytest.skip("GLUE rte is cached locally: nothing to reject")
    with pytest.raises(ConfigError, match=r"task\.data_dir"):
        prepare(compose_config(["+experiment=smoke", "task=rte"]))


def test_cli_prints_config_errors_without_traceback(tmp_path):
    from conftest import run_main

    env = {"WANDB_MODE": "disabled", "DIFFORA_CACHE": str(tmp_path / "cache")}
    done = run_main(
        ["+experiment=smoke", "budget=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env
    )
    assert done.returncode == 2
    assert "budget" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind
