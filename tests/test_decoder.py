"""Decoder LLMs end to end: tiny random Llama and Qwen2 (SmolLM2's tokenizer) through the search,
the cut, fine-tuning, the adapter and the log-likelihood dev metrics; the causal-LM batches; the
commonsense folder layout; gradient checkpointing; GLUE as prompts on real rows; SmolLM2 itself
(slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED_GLUE, compose_config

from diffora_lab.evaluate import evaluate
from diffora_lab.matching import lora_params
from diffora_lab.tasks.synthetic_choice import instruction
from diffora_lab.train import assemble, prepare, run


def decoder_cfg(tmp_path: Path, *overrides: str):
    return compose_config(["+experiment=smoke_decoder", *overrides], tmp_path)


def scored_by_lm_eval(run_dir: Path, tasks: Path, capsys) -> dict:
    """lm-evaluation-harness's scores of a finished decoder run's exported adapter, the
    user's way: ``python -m diffora_lab.lm_eval_task RUN``, then lm_eval on the line it prints
    (in this process; lm_eval's own task list is not indexed)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from diffora_lab import lm_eval_task

    capsys.readouterr()
    assert lm_eval_task.main([str(run_dir), "--out", str(tasks)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    model_args = dict(a.split("=", 1) for a in line.split("--model_args ")[1].split()[0].split(","))
    name = line.split("--tasks ")[1].split()[0]
    scored = lm_eval.simple_evaluate(
        model=HFLM(**model_args, batch_size=8, device="cpu"),
        tasks=[name],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,
    )
    return {"args": model_args, **scored["results"][name]}


@pytest.fixture(scope="session")
def decoder_runs(tmp_path_factory):
    """``+experiment=smoke_decoder`` on a tiny decoder, run once per session and backbone.

    The tests below check and score the same finished run folder; scoring it with lm_eval adds
    its ``lm_eval/`` folder, as the user's command does, and changes nothing else.
    """
    from conftest import FinishedRun, process_state_restored

    finished: dict[str, FinishedRun] = {}

    def get(backbone: str) -> FinishedRun:
        if backbone not in finished:
            root = tmp_path_factory.mktemp(f"decoder_{backbone}")
            with process_state_restored():
                results = run(decoder_cfg(root, f"backbone={backbone}"), root / "run")
            finished[backbone] = FinishedRun(root / "run", results)
        return finished[backbone]

    return get


DECODERS = ["tiny_llama", "tiny_qwen2"]
# The tests of the shared runs go to one test process (pytest-xdist), so each run is made once.
shares_the_runs = pytest.mark.xdist_group("decoder_runs")


@shares_the_runs
# tiny Qwen2's 40-step run is the full suite's; the fast tier runs it as the Qwen2.5 recipe's
# stand-in (test_experiments_compose_and_run_with_a_tiny_stand_in).
@pytest.mark.parametrize(
    "backbone", ["tiny_llama", pytest.param("tiny_qwen2", marks=pytest.mark.slow)]
)
def test_search_cut_finetune_and_score_a_decoder(backbone, decoder_runs, tmp_path):
    finished = decoder_runs(backbone)
    out, results = finished.out, finished.results
    assert results["task"] == "synthetic_choice" and results["steps"] == 40
    metrics = results["metrics"]
    assert set(metrics) == {"val/accuracy", "val/acc_norm"}
    if backbone == "tiny_llama":  # the smoke run learns: above chance (1/3) on 90 dev items
        assert metrics["val/accuracy"] > 0.5
    # The kept adapters' parameters use each module's real size (k/v: 2 of 4 heads).
    prepared = prepare(decoder_cfg(tmp_path, f"backbone={backbone}"))
    kept = [c for c in prepared.candidates if c.name in set(results["kept_modules"])]
    assert len(kept) == results["k"]
    assert results["params"]["adapter"] == lora_params(kept, results["rank"])
    # budget 0.5 counts adapter parameters: half of all candidates' (q, k, v, o, gate, up, down
    # of 2 layers at their real sizes), reached within half of one module.
    total = lora_params(prepared.candidates, results["rank"])
    largest = max(lora_params([c], results["rank"]) for c in prepared.candidates)
    counted = results["budget_count"]
    assert counted["unit"] == "params" and counted["target"] == pytest.approx(total / 2)
    assert counted["achieved"] == results["params"]["adapter"]
    assert abs(counted["achieved"] - total / 2) <= largest / 2
    assert results["params"]["head"] == 0 and results["num_labels"] is None  # no classifier
    sizes = {c.module_type: (c.d_in, c.d_out) for c in prepared.candidates}
    assert sizes["k"] == (64, 32) and sizes["q"] == (64, 64)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter.get("modules_to_save")
    assert sorted(adapter["target_modules"]) == sorted(results["kept_modules"])
    # Scoring the finished run again gives the numbers in results.json.
    assert evaluate(out) == pytest.approx(metrics, abs=1e-6)


# tiny Qwen2 borrows a tokenizer of another model type (SmolLM2's): lm_eval must be told to use
# it. The fast tier's lm_eval checks are test_lm_eval.py's (our requests, lm_eval's scores).
@shares_the_runs
@pytest.mark.slow
@pytest.mark.parametrize("backbone", DECODERS)
def test_lm_eval_scores_a_decoder_run_as_the_run_scored_itself(
    backbone, decoder_runs, tmp_path, capsys
):
    finished = decoder_runs(backbone)
    theirs = scored_by_lm_eval(finished.out, tmp_path / "tasks", capsys)
    metrics = finished.results["metrics"]
    assert theirs["acc,none"] == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    assert theirs["acc_norm,none"] == pytest.approx(metrics["val/acc_norm"], abs=1e-6)


@shares_the_runs
@pytest.mark.slow
def test_evaluate_cli_on_a_decoder_run(decoder_runs):
    finished = decoder_runs("tiny_llama")
    from conftest import run_main

    proc = run_main([str(finished.out)], finished.out, module="diffora_lab.evaluate")
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split() for line in proc.stdout.strip().splitlines())
    expected = finished.results["metrics"]
    assert {k: float(v) for k, v in printed.items()} == pytest.approx(expected, abs=1e-6)


def test_causal_batches_train_on_the_answer_with_few_logits(tmp_path):
    """Left padding, position ids and logits_to_keep give the loss of unpadded full-logit rows."""
    cfg = decoder_cfg(tmp_path, "method=lora")
    prepared = prepare(cfg)
    assembled = assemble(cfg, prepared)
    model, data = assembled.module.model.eval(), assembled.datamodule
    batch = next(iter(data.train_dataloader()))
    keep = batch["logits_to_keep"]
    assert 0 < keep < batch["input_ids"].shape[1] and batch["labels"].shape[1] == keep
    with torch.no_grad():
        loss = model(**batch).loss
        total, count = 0.0, 0
        for i in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][i].bool()
            ids = batch["input_ids"][i][real].unsqueeze(0)
            labels = torch.full_like(batch["input_ids"][i], -100)
            labels[-keep:] = batch["labels"][i]
            labels = labels[real].unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            picked = target >= 0
            total += float(
                torch.nn.functional.cross_entropy(logits[picked], target[picked], reduction="sum")
            )
            count += int(picked.sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-4)


def test_train_on_inputs_trains_every_token(tmp_path):
    cfg = decoder_cfg(tmp_path, "method=lora", "task.train_on_inputs=true")
    assembled = assemble(cfg, prepare(cfg))
    batch = next(iter(assembled.datamodule.train_dataloader()))
    assert batch["logits_to_keep"] == 0
    assert torch.equal(batch["labels"] >= 0, batch["attention_mask"].bool())


def _gradients(cfg, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    assembled = assemble(cfg, prepare(cfg))
    module = assembled.module
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, so the gates have a gradient
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    module.model.train()
    weight_loss = module(batch).loss
    weight_loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    module.model.zero_grad()
    module(batch, gate_grad=True).loss.backward()
    grads["dam.logits"] = module.dam.logits.grad.clone()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain = decoder_cfg(tmp_path, "method.lora_dropout=0.0")
    checkpointed = decoder_cfg(
        tmp_path, "method.lora_dropout=0.0", "train.gradient_checkpointing=true"
    )
    assembled = assemble(checkpointed, prepare(checkpointed))
    assert assembled.module.model.base_model.model.is_gradient_checkpointing
    batch = next(iter(assembled.datamodule.train_dataloader()))
    calls = []
    layer = assembled.module.model.base_model.model.model.layers[0]
    # A pre-hook: the recomputation stops as soon as the saved tensors are back (inside the MLP).
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    assembled.module.model.train()
    assembled.module(batch).loss.backward()
    assert len(calls) == 2  # the forward and its recomputation in the backward pass
    reference, recomputed = _gradients(plain, batch), _gradients(checkpointed, batch)
    assert reference.keys() == recomputed.keys() and any("lora_A" in n for n in reference)
    assert float(reference["dam.logits"].abs().sum()) > 0
    for name in reference:
        assert torch.allclose(reference[name], recomputed[name], atol=1e-6, rtol=1e-5), name


def test_a_decoder_can_classify_with_a_score_head(tmp_path):
    cfg = compose_config(
        ["+experiment=smoke", "backbone=tiny_llama", "task.kind=classification", "method=lora"],
        tmp_path,
    )
    cfg.train.max_steps = 4
    results = run(cfg, tmp_path / "run")
    assert results["params"]["head"] == 64 * 2  # LlamaForSequenceClassification.score, no bias
    assert results["num_labels"] == 2
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]


def _write_items(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))


def commonsense_folder(root: Path, n: int = 48) -> Path:
    """The LLM-Adapters layout with generated items (the synthetic_choice questions)."""
    from diffora_lab.tasks import load_raw
    from diffora_lab.tasks.commonsense import FOLDERS
    from diffora_lab.tasks.synthetic_choice import ANSWERS, SPEC

    raw = load_raw(SPEC, None, seed=3, synthetic={"n_train": n, "n_dev": 12})

    def items(examples):
        return [
            {
                "instruction": a,
                "input": "",
                "output": f"the correct answer is {ANSWERS[y]}",
                "answer": ANSWERS[y],
            }
            for a, y in zip(examples.text_a, examples.labels)
        ]

    _write_items(root / "ft-training_set" / "commonsense_170k.json", items(raw.train))
    for folder in FOLDERS.values():
        _write_items(root / "dataset" / folder / "test.json", items(raw.dev["validation"]))
        _write_items(root / "dataset" / folder / "train.json", items(raw.train))
    return root


@pytest.mark.slow
def test_commonsense_170k_reports_each_test_set_and_their_mean(tmp_path):
    data = commonsense_folder(tmp_path / "data")
    cfg = decoder_cfg(
        tmp_path,
        "task=commonsense_170k",
        f"task.data_dir={data}",
        "method=lora",
        "train.max_steps=4",
        "task.max_length=96",
    )
    results = run(cfg, tmp_path / "run")
    metrics = results["metrics"]
    per_task = [
        metrics[f"val/accuracy_{t}"]
        for t in (
            "boolq",
            "piqa",
            "social_i_qa",
            "hellaswag",
            "winogrande",
            "arc_easy",
            "arc_challenge",
            "openbookqa",
        )
    ]
    assert metrics["val/accuracy"] == pytest.approx(sum(per_task) / 8)
    assert "val/acc_norm_hellaswag" in metrics


@pytest.mark.slow
def test_commonsense_task_reads_its_folder(tmp_path):
    data = commonsense_folder(tmp_path / "data")
    cfg = decoder_cfg(
        tmp_path, "task=social_i_qa", f"task.data_dir={data}", "method=lora", "train.max_steps=3"
    )
    results = run(cfg, tmp_path / "run")
    assert set(results["metrics"]) == {"val/accuracy", "val/acc_norm"}


@pytest.mark.slow
def test_generation_scoring_is_an_option(tmp_path):
    cfg = decoder_cfg(tmp_path, "method=lora", "train.max_steps=4", "task.scoring=generate")
    results = run(cfg, tmp_path / "run")
    assert set(results["metrics"]) == {"val/accuracy"}


def test_items_parse_their_answer_format():
    from diffora_lab.tasks.prompts import COMMONSENSE, answer_format

    text = instruction("wonderful lovely")
    assert answer_format(text) == ("positive", "negative", "neutral")
    item = COMMONSENSE.item(text, None, 2)
    assert item.context.endswith("### Response:\nthe correct answer is")
    assert item.choices[item.gold] == "neutral"
    context, target = COMMONSENSE.train_pair(text, None, 0)
    assert context + target == item.context + " positive"


RECIPES = {
    "llama3_8b_commonsense": ("llama3_8b", "commonsense_170k", "tiny_llama"),
    "qwen25_05b_commonsense": ("qwen25_05b", "commonsense_170k", "tiny_qwen2"),
    "smollm2_sst2": ("smollm2_135m", "sst2", "tiny_llama"),
}


# tiny Llama's own run is the fast tier's (test_search_cut_...): its recipe runs in the full suite.
@pytest.mark.parametrize(
    "experiment",
    [
        pytest.param(name, marks=pytest.mark.slow) if name == "llama3_8b_commonsense" else name
        for name in sorted(RECIPES)
    ],
)
def test_experiments_compose_and_run_with_a_tiny_stand_in(experiment, tmp_path):
    backbone, task, stand_in = RECIPES[experiment]
    recipe = compose_config([f"+experiment={experiment}"], tmp_path)
    assert (recipe.backbone.name, recipe.task.name) == (backbone, task)
    if task == "commonsense_170k":  # the DoRA recipe
        assert (recipe.rank, recipe.train.lr, recipe.train.batch_size) == (32, 1e-4, 16)
        assert recipe.method.scale * recipe.rank == 64  # lora_alpha 64
        assert recipe.task.max_length == 256 and recipe.train.gradient_checkpointing
        assert recipe.backbone.dtype == "bfloat16" and recipe.trainer.precision == "bf16-mixed"
    fast = ["train.max_steps=4", "train.val_every=4", "train.ckpt_every=2", "dam.warmup_steps=1"]
    fast += ["train.batch_size=8", "task.max_length=96", "task.dev_limit=12", "logger=csv"]
    stand_ins = [f"backbone={stand_in}", "task=synthetic_choice", *fast]
    results = run(
        compose_config([f"+experiment={experiment}", *stand_ins], tmp_path), tmp_path / "run"
    )
    assert results["steps"] == 4 and results["dev_examples"] == 12


def sst2_rows(root: Path, n_train: int = 64, n_dev: int = 32) -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = (SHARED_GLUE / "SST-2" / name).read_text().splitlines()[: n + 1]
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


needs_glue = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is absent")


@needs_glue
@pytest.mark.slow
def test_glue_runs_as_a_prompt_on_a_decoder(tmp_path):
    data = sst2_rows(tmp_path / "glue")
    cfg = decoder_cfg(
        tmp_path,
        "task=sst2",
        f"task.data_dir={data}",
        "backbone=tiny_qwen2",
        "train.max_steps=6",
        "dam.warmup_steps=1",
        "task.max_length=64",
    )
    results = run(cfg, tmp_path / "run")
    assert results["dev_examples"] == 32 and set(results["metrics"]) == {
        "val/accuracy",
        "val/acc_norm",
    }


@needs_glue
@pytest.mark.slow
def test_smollm2_trains_on_a_handful_of_sst2_rows(tmp_path, capsys):
    """Search, cut, fine-tune, export on SmolLM2 offline, scored by lm-evaluation-harness."""
    data = sst2_rows(tmp_path / "glue", n_train=48, n_dev=8)
    # Batches of 2 (the recipe's 8 cost 6.6 s a step here): the path, not the model, is checked.
    overrides = [f"task.data_dir={data}", "train.max_steps=4", "dam.warmup_steps=1"]
    overrides += ["train.val_every=4", "train.batch_size=2", "logger=csv"]
    cfg = compose_config(["+experiment=smollm2_sst2", *overrides], tmp_path)
    results = run(cfg, tmp_path / "run")
    assert results["backbone"] == "smollm2_135m" and results["candidate_modules"] == 210
    assert results["dev_examples"] == 8 and 0.0 <= results["metrics"]["val/accuracy"] <= 1.0
    assert set(results["metrics"]) == {"val/accuracy", "val/acc_norm"}
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    # budget 0.5 in parameters: the kept modules hold half of all candidates' adapter parameters
    # (within half a module; how many modules that is depends on which sizes were chosen).
    counted = results["budget_count"]
    assert abs(counted["achieved"] - counted["target"]) <= counted["largest_module"] / 2
    assert adapter["task_type"] == "CAUSAL_LM"
    assert sorted(adapter["target_modules"]) == sorted(results["kept_modules"])
    assert len(adapter["target_modules"]) == results["k"] < 210
    # lm-evaluation-harness scores the exported adapter on the converted SmolLM2 folder (no
    # hub) as the run scored itself.
    theirs = scored_by_lm_eval(tmp_path / "run", tmp_path / "tasks", capsys)
    assert "converted" in theirs["args"]["pretrained"]
    assert theirs["acc,none"] == pytest.approx(results["metrics"]["val/accuracy"], abs=1e-6)
    assert theirs["acc_norm,none"] == pytest.approx(results["metrics"]["val/acc_norm"], abs=1e-6)
    shutil.rmtree(tmp_path / "run")
