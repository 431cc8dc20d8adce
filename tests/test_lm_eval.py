"""lm-evaluation-harness scores an exported causal-LM adapter as our scorer does.

The base model is a tiny random Llama saved with ``save_pretrained`` beside a small byte-level
BPE tokenizer (built here, offline, in the style of Llama-3 and SmolLM2: parametrized with and
without a BOS token); the adapter is the gated, trained, discretized export of
``test_export_decoder``. The items go through :func:`diffora_lab.lm_eval_task.write_task` (YAML +
local JSONL) into ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=BASE, peft=ADAPTER)``, and
through :func:`diffora_lab.scoring.score_choices` on the model peft reloads. Both must build the
same requests, give per-choice log-likelihoods within 1e-3 and the same predictions.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from peft import PeftModel
from test_export_decoder import gated_export
from transformers import AutoTokenizer, LlamaForCausalLM

from diffora_lab.lm_eval_task import write_task
from diffora_lab.scoring import ChoiceItem, choice_predictions, score_choices

lm_eval = pytest.importorskip("lm_eval")

ITEMS = [
    ChoiceItem("Review: a wonderful, moving film.\nSentiment:", ("positive", "negative"), 0),
    ChoiceItem("Review: dull and far too long.\nSentiment:", ("positive", "negative"), 1),
    # a trailing space moves to the continuation; multi-token answers of different lengths
    ChoiceItem("Question: what is two plus two?\nAnswer: ", ("four", "twenty two", "5"), 0),
    ChoiceItem(
        "Below is an instruction.\n\n### Instruction:\nPick one.\n\n### Response:\n",
        ("the correct answer is answer1", "the correct answer is answer2"),
        1,
        delimiter=" ",
    ),
    ChoiceItem("Is the sky green? Answer yes or no.", ("yes", "no"), 1),
]
CORPUS = [item.context + " " + choice for item in ITEMS for choice in item.choices] * 2


def bpe_tokenizer(add_bos: bool):
    """A byte-level BPE tokenizer trained on the items (spaces as in Llama-3 / SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def run(request, tmp_path_factory):
    """Base folder, exported adapter, task folder, and lm_eval's and our scores."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = bpe_tokenizer(request.param)
    exported = gated_export(root, tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")  # as lm_eval will load it
    assert (tokenizer.encode("Answer")[0] == tokenizer.bos_token_id) is request.param
    write_task(ITEMS, root / "tasks", "diffora_items")
    model = HFLM(
        pretrained=str(root / "base"), peft=str(exported["folder"]), batch_size=4, device="cpu"
    )
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=["diffora_items"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    reloaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(root / "base"), exported["folder"]
    ).eval()
    samples = sorted(results["samples"]["diffora_items"], key=lambda s: s["doc_id"])
    return {
        "samples": samples,
        "metrics": results["results"]["diffora_items"],
        "ours": score_choices(reloaded, tokenizer, ITEMS, batch_size=3),
        "trained": score_choices(exported["model"], tokenizer, ITEMS, batch_size=3),
        "root": root,
    }


def test_task_files_are_local_multiple_choice(run):
    text = (run["root"] / "tasks" / "diffora_items.yaml").read_text()
    assert "output_type: multiple_choice" in text and "dataset_path: json" in text
    rows = (run["root"] / "tasks" / "diffora_items.jsonl").read_text().splitlines()
    assert [json.loads(row)["gold"] for row in rows] == [item.gold for item in ITEMS]


def test_lm_eval_builds_our_requests(run):
    assert len(run["samples"]) == len(ITEMS)
    for sample, item in zip(run["samples"], ITEMS):
        requests = [tuple(arguments) for arguments in sample["arguments"]]
        assert requests == [(item.context, c) for c in item.continuations()]


def test_per_choice_loglikelihoods_agree(run):
    for sample, ours in zip(run["samples"], run["ours"]):
        theirs = [float(loglik) for loglik, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx([loglik for loglik, _ in ours], abs=1e-3, rel=0)
        assert [bool(g) for _, g in sample["filtered_resps"]] == [g for _, g in ours]
    # The reloaded adapter scores as the trained model in memory did.
    for reloaded, trained in zip(run["ours"], run["trained"]):
        assert [s for s, _ in reloaded] == pytest.approx([s for s, _ in trained], abs=1e-4)


def test_predictions_and_metrics_agree(run):
    acc, acc_norm = [], []
    for sample, ours, item in zip(run["samples"], run["ours"], ITEMS):
        pred, pred_norm = choice_predictions(ours, item.choices)
        theirs = [float(loglik) for loglik, _ in sample["filtered_resps"]]
        assert pred == max(range(len(theirs)), key=theirs.__getitem__)
        assert sample["acc"] == float(pred == item.gold)
        assert sample["acc_norm"] == float(pred_norm == item.gold)
        acc.append(pred == item.gold)
        acc_norm.append(pred_norm == item.gold)
    assert run["metrics"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert run["metrics"]["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_write_task_rejects_items_it_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="no gold"):
        write_task([ChoiceItem("q", ("a", "b"))], tmp_path, "x")
    mixed = [ChoiceItem("q", ("a",), 0), ChoiceItem("q", ("a",), 0, delimiter="\n")]
    with pytest.raises(ValueError, match="delimiters"):
        write_task(mixed, tmp_path, "x")
    with pytest.raises(ValueError, match="task name"):
        write_task(ITEMS, tmp_path, "my task")


# ----------------------------------------------------- the README's decoder walk-through (CLI)

SECTION = "### Taking a decoder adapter away"
# Appended to the walk-through's training command: fewer steps, the same search and cut.
SHORT = ("train.max_steps=12", "train.val_every=6", "train.ckpt_every=6", "dam.warmup_steps=2")


def walkthrough() -> tuple[list[str], str]:
    """The commands of the section's first bash block and its Python (``py``) block."""
    from test_readme import README, commands

    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ")]
    bash = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    python = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    return commands(bash), python


@pytest.mark.slow
def test_readme_walkthrough_scores_the_run_as_the_run_scored_itself(tmp_path, monkeypatch):
    """train, write the lm_eval task, run lm_eval's CLI: its acc and acc_norm are the run's."""
    from conftest import run_main

    bash, python = walkthrough()
    assert [c.split()[:3] for c in bash] == [
        ["python", "-m", "diffora_lab"],
        ["python", "-m", "diffora_lab.lm_eval_task"],
        ["lm_eval", "--model", "hf"],
    ]
    # Each command as `python -m` runs it, in this process (conftest.run_main).
    trained = run_main([*shlex.split(bash[0])[3:], *SHORT], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    module, *args = shlex.split(bash[1])[2:]
    written = run_main(args, tmp_path, module=module)
    assert written.returncode == 0, written.stderr[-3000:]
    assert "lm_eval --model hf" in written.stdout  # the printed command
    assert ",tokenizer=" in written.stdout  # the tiny Llama borrows SmolLM2's tokenizer
    module, *args = shlex.split(bash[2])
    scored = run_main([*args, "--output_path", "lm_eval_out"], tmp_path, module=module)
    assert scored.returncode == 0, scored.stderr[-3000:]
    run = tmp_path / "runs" / "smoke_decoder"
    ours = json.loads((run / "results.json").read_text())["metrics"]
    found = sorted((tmp_path / "lm_eval_out").rglob("results_*.json"))
    theirs = json.loads(found[-1].read_text())["results"]["diffora_synthetic_choice"]
    assert theirs["acc,none"] == pytest.approx(ours["val/accuracy"], abs=1e-6)
    assert theirs["acc_norm,none"] == pytest.approx(ours["val/acc_norm"], abs=1e-6)
    card = (run / "adapter" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    assert f"| val/accuracy | {ours['val/accuracy']:.4f} |" in card
    # The Python block: peft loads the adapter on the saved base, merging keeps the outputs.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python, "README.md", "exec"), namespace)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base = LlamaForCausalLM.from_pretrained(run / "lm_eval" / "base")
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = LlamaForCausalLM.from_pretrained(run / "merged").eval()
    assert isinstance(namespace["model"], PeftModel)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
