"""End-to-end tests of ``diffora_lab.train.run`` on the smoke experiment.

One uninterrupted run is the reference: its artifacts (results.json, dam/, checkpoints/,
adapter/) are checked, and runs stopped mid-search, right after discretization and mid-fine-tune
and then resumed with ``ckpt_path=last`` must end exactly where it ended.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_main
from safetensors.torch import load_file

from diffora_lab.backbones import find_candidates, load_backbone, load_tokenizer
from diffora_lab.checkpointing import fingerprint
from diffora_lab.module import TrainingModule
from diffora_lab.train import ConfigError, run

STEPS, SEARCH_STEPS = 40, 20  # the smoke experiment: 40 steps, search_ratio 0.5
RESULT_KEYS = {
    "task",
    "method",
    "backbone",
    "budget",
    "rank",
    "seed",
    "params_trainable",
    "kept_modules",
    "candidate_modules",
    "metrics",
    "discretization",
    "steps",
    "wall_seconds",
}
MASK_KEYS = {"modules", "gates", "kept", "budget", "k", "step"}


@dataclass
class Run:
    out: Path
    results: dict

    @property
    def mask(self) -> dict:
        return json.loads((self.out / "dam" / "mask.json").read_text())

    @property
    def saved_results(self) -> dict:
        return json.loads((self.out / "results.json").read_text())

    def state(self) -> dict[str, torch.Tensor]:
        ckpt = torch.load(self.out / "checkpoints" / "last.ckpt", weights_only=True)
        return ckpt["state_dict"]

    def gate_records(self) -> list[dict]:
        lines = (self.out / "dam" / "gates.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def smoke_run(out: Path, *overrides: str) -> Run:
    # Each run has its own folder and caches (no shared search snapshot between runs).
    cfg = compose_config(["+experiment=smoke", *overrides], out)
    return Run(out, run(cfg, out))


@pytest.fixture(scope="module")
def reference(reference_run) -> Run:
    """The session's shared smoke run (conftest): read-only here."""
    return Run(reference_run.out, reference_run.results)


@pytest.fixture(scope="module")
def fresh_backbone():
    cfg = compose_config(["+experiment=smoke"]).backbone
    model = load_backbone(cfg, 2, vocab_size=len(load_tokenizer(cfg)))
    candidates = find_candidates(model, str(cfg.layer_pattern), dict(cfg.module_types))
    return model, candidates


# ------------------------------------------------------------------------------- artifacts


def test_results_json(reference, fresh_backbone):
    results = reference.saved_results
    assert RESULT_KEYS <= set(results)
    assert results["task"] == "synthetic" and results["method"] == "diffora"
    assert results["backbone"] == "tiny_deberta"
    assert (results["budget"], results["rank"], results["seed"]) == (0.5, 8, 42)
    assert results["steps"] == STEPS
    # The wall time covers the whole pipeline, of which fitting is one part.
    assert results["wall_seconds"] >= results["fit_seconds"] > 0
    assert results["candidate_modules"] == 12
    assert results["kept_modules"] == reference.mask["kept_modules"]
    assert len(results["kept_modules"]) == results["k"]
    # The default budget: half of all adapter parameters, within half the largest module.
    count = results["budget_count"]
    assert count["target"] == 0.5 * 7168 and abs(count["achieved"] - count["target"]) <= 384
    # Accuracy is a count over the whole dev set (not a mean of per-batch accuracies, which
    # an uneven last batch would skew): accuracy * n_dev is a whole number.
    n_dev = compose_config(["+experiment=smoke"]).task.synthetic.n_dev
    correct = results["metrics"]["val/accuracy"] * n_dev
    assert correct == pytest.approx(round(correct), abs=1e-6)
    disc = results["discretization"]
    assert {"val_before", "val_after"} <= set(disc)
    assert all(isinstance(disc[k], float) for k in ("val_before", "val_after"))
    # Trainable parameters: r (d_in + d_out) per kept module, plus the head.
    model, candidates = fresh_backbone
    kept = set(results["kept_modules"])
    adapter = sum(c.lora_params(8) for c in candidates if c.name in kept)
    head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in HEAD)
    assert results["params_trainable"] == adapter + head
    # What run() returns is what it wrote.
    assert json.loads(json.dumps(reference.results)) == results


HEAD = ("classifier", "pooler")


def test_mask_json(reference):
    mask = reference.mask
    assert MASK_KEYS <= set(mask)
    assert mask["budget"] == 0.5 and mask["step"] == SEARCH_STEPS
    assert (mask["unit"], mask["target"]) == ("params", 0.5 * 7168)
    assert len(mask["modules"]) == len(mask["gates"]) == len(mask["kept"]) == 12
    assert sum(mask["kept"]) == mask["k"]
    # Kept are the largest gates: every kept gate is at least every dropped one.
    kept = [g for g, k in zip(mask["gates"], mask["kept"]) if k]
    dropped = [g for g, k in zip(mask["gates"], mask["kept"]) if not k]
    assert min(kept) >= max(dropped)
    # The recorded gates are the final logits' sigmoid (tau 1 in the smoke experiment) on the
    # modules still active; the default search removed the others during the search (gate 0).
    # The logits are frozen after discretization, so the checkpoint holds the ones that decided.
    state = reference.state()
    active = state["dam.active"].flatten()
    assert active.tolist() == mask["kept"]  # the final cut removed nothing still in use
    gates = torch.sigmoid(state["dam.logits"].flatten()) * active
    assert mask["gates"] == pytest.approx(gates.tolist(), abs=1e-6)
    # The search moved the kept gates away from their common initial value.
    assert len(set(kept)) == mask["k"] and min(kept) > 0 and max(dropped) == 0


def test_gate_logits_in_the_checkpoint_match_the_mask(reference):
    state = reference.state()
    gates = torch.sigmoid(state["dam.logits"]) * state["dam.active"]
    torch.testing.assert_close(
        gates.flatten(), torch.tensor(reference.mask["gates"]), atol=1e-6, rtol=0
    )


def test_heatmaps_and_gate_records(reference):
    heatmaps = sorted((reference.out / "dam" / "heatmaps").glob("step_*.png"))
    steps = {int(p.stem.split("_")[1]) for p in heatmaps}
    assert len(steps) >= 2
    assert {0, SEARCH_STEPS} <= steps
    assert (reference.out / "dam" / "heatmaps" / f"step_{SEARCH_STEPS:06d}_mask.png").is_file()
    for path in heatmaps:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = reference.gate_records()
    recorded = [r["step"] for r in records]
    assert recorded == sorted(set(recorded)) and recorded[0] == 0
    assert all(len(r["gates"]) == 12 for r in records)


def test_search_split_is_saved_and_carved_from_train(reference):
    indices = json.loads((reference.out / "dam" / "search_split.json").read_text())["indices"]
    assert len(indices) == 80  # 0.2 of the 400 train examples
    assert indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < 400


def test_adapter_holds_only_kept_modules_and_head(reference):
    folder = reference.out / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    kept = set(reference.results["kept_modules"])
    assert set(config["target_modules"]) == kept
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    lora_owners = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors}
    assert {o for o in lora_owners if o.split(".")[0] not in HEAD} == kept
    state = reference.state()
    for key, value in tensors.items():
        if ".lora_" in key:
            stem = key.replace(".weight", ".default.weight")
            assert torch.equal(state[f"model.{stem}"], value), key


def test_checkpoint_holds_what_training_changed_and_fingerprints_the_backbone(
    reference, fresh_backbone
):
    model, _ = fresh_backbone
    checkpoint = torch.load(reference.out / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    # Only adapters, the head's trained copy and the DAM: no frozen backbone tensor.
    for key in state:
        assert ".lora_" in key or ".modules_to_save." in key or key.startswith("dam."), key
    record = checkpoint["diffora_lab"]["backbone"]
    assert record["tensors"] == len(model.state_dict())
    assert record["params"] == sum(v.numel() for v in model.state_dict().values())
    # The frozen weights at the end of the run are the freshly loaded ones, bit for bit.
    assert record["fingerprint"] == fingerprint(model.state_dict().items())


@pytest.mark.slow
def test_budget_one_keeps_everything_and_has_no_discretization_gap(tmp_path):
    done = smoke_run(tmp_path, "budget=1.0")
    results = done.saved_results
    assert len(results["kept_modules"]) == 12 and done.mask["k"] == 12
    disc = results["discretization"]
    assert disc["val_before"] is not None
    assert disc["val_before"] == disc["val_after"]


# ----------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_at",
    [
        pytest.param(12, id="mid-search"),
        pytest.param(SEARCH_STEPS, id="after-discretization"),
        pytest.param(30, id="mid-finetune"),
    ],
)
def test_resumed_run_ends_like_the_uninterrupted_one(reference, tmp_path, stop_at):
    stopped = smoke_run(tmp_path, f"train.stop_after={stop_at}")
    assert stopped.results.get("stopped_at") == stop_at
    assert not (tmp_path / "results.json").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "dam" / "mask.json").is_file() == (stop_at >= SEARCH_STEPS)

    resumed = smoke_run(tmp_path, "ckpt_path=last")
    assert resumed.results["steps"] == STEPS

    mask, ref_mask = resumed.mask, reference.mask
    assert mask["kept"] == ref_mask["kept"]
    assert (mask["k"], mask["step"]) == (ref_mask["k"], ref_mask["step"])
    assert mask["gates"] == pytest.approx(ref_mask["gates"], abs=1e-6, rel=0)
    assert resumed.results["kept_modules"] == reference.results["kept_modules"]
    assert resumed.results["params_trainable"] == reference.results["params_trainable"]
    assert resumed.results["discretization"] == reference.results["discretization"]
    assert resumed.results["metrics"] == pytest.approx(reference.results["metrics"])

    # The trained weights too, not only the mask.
    state, ref_state = resumed.state(), reference.state()
    trained = [k for k in ref_state if ".lora_" in k or ".modules_to_save." in k]
    assert trained and {k for k in state if ".lora_" in k} == {k for k in trained if ".lora_" in k}
    for key in trained:
        torch.testing.assert_close(state[key], ref_state[key], atol=1e-6, rtol=0, msg=key)

    # The gate record continues where it stopped: same steps, no duplicates.
    records, ref_records = resumed.gate_records(), reference.gate_records()
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    for mine, theirs in zip(records, ref_records):
        assert mine["gates"] == pytest.approx(theirs["gates"], abs=1e-6, rel=0)
    heatmaps = sorted(p.name for p in (tmp_path / "dam" / "heatmaps").glob("*.png"))
    assert heatmaps == sorted(p.name for p in (reference.out / "dam" / "heatmaps").glob("*.png"))


def test_resume_refuses_a_checkpoint_written_with_another_rank(reference, tmp_path):
    ckpt = reference.out / "checkpoints" / "last.ckpt"
    cfg = compose_config(["+experiment=smoke", "rank=4", f"ckpt_path={ckpt}"], tmp_path)
    with pytest.raises(ConfigError, match="rank"):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_resume_onto_another_backbone_exits_2_with_the_reason(reference, tmp_path):
    # Same settings, other frozen weights: the checkpoint's record is made to say init_seed=1
    # (the settings check would name a changed seed first), so only the fingerprint differs.
    ckpt = tmp_path / "seed1.ckpt"
    saved = torch.load(reference.out / "checkpoints" / "last.ckpt", weights_only=True)
    saved["hyper_parameters"]["config"]["backbone"]["init_seed"] = 1
    torch.save(saved, ckpt)
    done = run_main(
        [
            "+experiment=smoke",
            "backbone.init_seed=1",
            f"ckpt_path={ckpt}",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logger=none",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "made with another backbone" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_saved_mask_fed_back_fine_tunes_exactly_its_modules(reference, tmp_path):
    mask_file = reference.out / "dam" / "mask.json"
    done = smoke_run(tmp_path, f"dam.mask_path={mask_file}")
    results = done.saved_results
    assert results["kept_modules"] == reference.results["kept_modules"]
    assert results["params_trainable"] == reference.results["params_trainable"]
    assert results["steps"] == STEPS
    assert results["discretization"]["val_before"] is None  # no search, no discretization
    assert done.mask["kept"] == reference.mask["kept"] and done.mask["source"] == "file"
    assert not (tmp_path / "dam" / "gates.jsonl").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(reference.results["kept_modules"])
    assert "dam.logits" not in done.state()


# ------------------------------------------------------------------------------ search reuse


@pytest.fixture(scope="module")
def reused_pair(tmp_path_factory):
    """The paper's search (it does not look at the budget): a budget-0.5 run, a budget-0.25 run
    that reuses its search, and a budget-0.25 run that searches itself."""
    faithful = "method=diffora_faithful"
    first = smoke_run(tmp_path_factory.mktemp("faithful"), faithful)
    out = tmp_path_factory.mktemp("reused")
    cfg = compose_config(["+experiment=smoke", faithful, "budget=0.25"], out)
    cfg.data.cache_dir = str(first.out / "cache")  # where the first run left its search
    reused = Run(out, run(cfg, out))
    fresh = smoke_run(tmp_path_factory.mktemp("fresh"), faithful, "budget=0.25")
    return first, reused, fresh


@pytest.mark.slow
def test_reused_search_ends_like_a_fresh_search(reused_pair):
    first, reused, fresh = reused_pair
    assert reused.results["search"]["reused"] is True
    assert fresh.results["search"]["reused"] is False
    assert reused.mask["k"] == fresh.mask["k"]
    assert reused.mask["target"] == fresh.mask["target"] == 0.25 * 7168
    assert reused.mask["kept"] == fresh.mask["kept"]
    assert reused.mask["gates"] == pytest.approx(fresh.mask["gates"], abs=1e-6, rel=0)
    # Same search as the budget-0.5 run: its top 3 are among that run's top 6.
    assert reused.mask["gates"] == pytest.approx(first.mask["gates"], abs=1e-6, rel=0)
    assert set(reused.results["kept_modules"]) < set(first.results["kept_modules"])
    for key in ("kept_modules", "params_trainable", "discretization", "steps"):
        assert reused.results[key] == fresh.results[key], key
    assert reused.results["metrics"] == pytest.approx(fresh.results["metrics"])
    state, fresh_state = reused.state(), fresh.state()
    assert {k for k in state if ".lora_" in k} == {k for k in fresh_state if ".lora_" in k}
    for key, value in fresh_state.items():
        if ".lora_" in key or ".modules_to_save." in key:
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_a_reused_search_says_so_and_from_which_run(reused_pair, tmp_path, capsys, recwarn):
    first, _, _ = reused_pair
    cfg = compose_config(["+experiment=smoke", "method=diffora_faithful", "budget=0.75"], tmp_path)
    cfg.data.cache_dir = str(first.out / "cache")
    capsys.readouterr()
    results = run(cfg, tmp_path)
    out = capsys.readouterr().out
    assert results["search"]["source"]["run_folder"] == str(first.out)
    summary = out[out.index("diffora_lab: diffora_faithful on synthetic (tiny_deberta, budget") :]
    assert f"  search              reused from {first.out} (cache entry " in summary
    assert ": faithful, not run again" in summary
    assert "search 0 s (reused)" in summary and results["seconds"]["search"] == 0
    # Said before training too, and not as the recovery of a crash.
    assert "resuming" not in out
    assert f"the search of this run was already made by {first.out}" in out
    # Nothing of the other run's state is restored: no warning names its folder.
    assert not [w for w in recwarn if str(first.out) in str(w.message)], [
        str(w.message) for w in recwarn
    ]


@pytest.mark.slow
def test_a_fresh_search_shows_its_variant_and_where_the_time_went(reference):
    from diffora_lab.results import summary_text

    results = reference.results
    lines = summary_text(results, reference.out).splitlines()
    assert "  search              progressive (preset default), 20 steps" in lines
    seconds = results["seconds"]
    assert seconds["search"] > 0 and seconds["finetune"] > 0 and seconds["startup"] > 0
    assert sum(seconds.values()) == pytest.approx(results["wall_seconds"], abs=0.05)
    time_line = next(line for line in lines if line.startswith("  time  "))
    assert re.fullmatch(
        r"  time +\d+ s: start-up \d+ s, search \d+ s, fine-tune \d+ s, "
        r"scoring and export \d+ s",
        time_line,
    )


@pytest.mark.slow
def test_the_default_search_is_not_shared_across_budgets(reference, tmp_path):
    # The default search prunes towards its budget: another budget must search afresh.
    cfg = compose_config(["+experiment=smoke", "budget=0.25"], tmp_path)
    cfg.data.cache_dir = str(reference.out / "cache")
    results = run(cfg, tmp_path)
    assert results["search"]["reused"] is False
    assert results["search"]["key"] != reference.results["search"]["key"]


@pytest.mark.slow
def test_reused_search_has_the_dam_figures_of_a_fresh_one(reused_pair):
    _, reused, fresh = reused_pair
    assert [r["step"] for r in reused.gate_records()] == [r["step"] for r in fresh.gate_records()]
    names = sorted(p.name for p in (fresh.out / "dam" / "heatmaps").glob("*.png"))
    assert len(names) >= 2
    assert sorted(p.name for p in (reused.out / "dam" / "heatmaps").glob("*.png")) == names


@pytest.mark.slow
def test_budget_penalty_pulls_the_mean_gate_towards_the_budget(smoke_cfg, tmp_path):
    def mean_gate(*overrides: str) -> float:
        out = tmp_path / "_".join(o.replace("=", "-") for o in overrides)
        settings = ("budget=0.25", "budget_unit=modules", "dam.reuse_search=false")
        run(smoke_cfg(*settings, "search=budget_penalty", *overrides), out)
        gates = json.loads((out / "dam" / "mask.json").read_text())["gates"]
        return sum(gates) / len(gates)

    free = mean_gate("search.weight=0")
    pulled = mean_gate("search.weight=200")
    assert abs(pulled - 0.25) < abs(free - 0.25) - 0.02


# ------------------------------------------------------------------- GLUE folders, any task


def write_glue_task(root: Path, folder: str, header: list[str], rows: list[list[str]]) -> None:
    """DIR/<folder>/{train,dev}.tsv in the original layout (tab-separated, no quoting)."""
    (root / folder).mkdir(parents=True)
    for split, part in (("train", rows[:96]), ("dev", rows[96:])):
        lines = ["\t".join(header), *("\t".join(row) for row in part)]
        (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def mrpc_rows() -> tuple[list[str], list[list[str]]]:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = []
    for i in range(128):
        same = i % 2 == 0
        first = f"the committee approved plan {i} on monday ."
        second = first if same else f"shares of company {i} fell sharply ."
        rows.append([str(int(same)), str(2 * i), str(2 * i + 1), first, second])
    return header, rows


def stsb_rows() -> tuple[list[str], list[list[str]]]:
    header = [
        "index", "genre", "filename", "year", "old_index", "source1", "source2",
        "sentence1", "sentence2", "score",
    ]  # fmt: skip
    rows = []
    for i in range(128):
        score = i % 6
        words = ["a", "man", "plays", "the", "guitar", "loudly"]
        first = " ".join(words)
        second = " ".join(words[:score] + ["nothing"] * (6 - score))
        meta = ["main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none"]
        rows.append([str(i), *meta, first, second, f"{score:.3f}"])
    return header, rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "folder", "rows", "metrics", "head_outputs"),
    [
        ("mrpc", "MRPC", mrpc_rows, {"val/accuracy", "val/f1"}, 2),
        ("stsb", "STS-B", stsb_rows, {"val/pearson", "val/spearman"}, 1),
    ],
)
def test_a_glue_folder_and_the_task_name_are_all_a_run_needs(
    tmp_path, task, folder, rows, metrics, head_outputs
):
    """Tasks not shipped here (MRPC with F1, STS-B as regression) train from any folder in the
    original GLUE layout, with their own metrics and head."""
    root = tmp_path / "glue"
    write_glue_task(root, folder, *rows())
    done = smoke_run(
        tmp_path / "run",
        f"task={task}",
        f"task.data_dir={root}",
        "task.max_length=32",
        "train.max_steps=12",
        "train.val_every=6",
        "train.ckpt_every=12",
        "dam.warmup_steps=2",
    )
    results = done.saved_results
    assert results["task"] == task
    assert set(results["metrics"]) == metrics
    assert results["primary_metric"] in metrics
    assert all(-1.0 <= value <= 1.0 for value in results["metrics"].values())
    hidden = 32  # tiny_deberta: pooler (hidden x hidden) + classifier (hidden x outputs)
    assert (
        results["params"]["head"] == hidden * hidden + hidden + hidden * head_outputs + head_outputs
    )
    assert results["discretization"]["step"] == 6


# ------------------------------------------------------------------ accumulation, MNLI, bf16

NO_DROPOUT = (
    "+backbone.config.hidden_dropout_prob=0",
    "+backbone.config.attention_probs_dropout_prob=0",
    "method.lora_dropout=0",
)


@pytest.mark.slow
def test_accumulating_two_batches_is_one_step_on_twice_the_batch(tmp_path, monkeypatch):
    """``train.accumulate=2`` with batches of 8 takes the weight step that one batch of 16 (the
    same 16 examples: no bucketing, one permutation per epoch) takes, up to float rounding: the
    gradients the optimizer steps on (Adam's step alone would hide a factor of 2) and the weights
    after it."""
    grads: list[dict[str, torch.Tensor]] = []
    original = TrainingModule._after_weight_step

    def record(self):  # after optimizer.step(), before zero_grad: the step's gradients
        grads.append({n: p.grad.clone() for n, p in self.weight_parameters()})
        original(self)

    monkeypatch.setattr(TrainingModule, "_after_weight_step", record)
    common = ("method=lora", "data.bucketing=0", "train.max_steps=1", *NO_DROPOUT)
    whole = smoke_run(tmp_path / "whole", *common, "train.batch_size=16")
    halves = smoke_run(tmp_path / "halves", *common, "train.batch_size=8", "train.accumulate=2")
    assert whole.results["steps"] == halves.results["steps"] == 1
    assert len(grads) == 2 and grads[0].keys() == grads[1].keys()
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    one, two = whole.state(), halves.state()
    assert one.keys() == two.keys()
    moved = [k for k in one if ".lora_B." in k]  # zero at the start: the step moved them
    assert moved and all(one[k].abs().max() > 0 for k in moved)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def write_mnli(root: Path, sizes: dict[str, int]) -> None:
    """DIR/MNLI/{train,dev_matched,dev_mismatched}.tsv with GLUE's columns (dev files have five
    annotator labels, train one), generated: the label follows from the hypothesis's verb."""
    dev_header = [
        "index", "promptID", "pairID", "genre", "sentence1_binary_parse",
        "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2",
        "label1", "label2", "label3", "label4", "label5", "gold_label",
    ]  # fmt: skip
    headers = {"train": [*dev_header[:11], "gold_label"]}
    verbs = {"entailment": "moves", "neutral": "is tall", "contradiction": "sleeps"}
    (root / "MNLI").mkdir(parents=True)
    for split, count in sizes.items():
        header = headers.get(split, dev_header)
        lines = ["\t".join(header)]
        for i in range(count):
            gold = list(verbs)[i % 3]
            values = {
                "index": str(i),
                "genre": "fiction" if split != "dev_mismatched" else "letters",
                "sentence1": f"the {['man', 'woman', 'child'][i % 3]} number {i} runs .",
                "sentence2": f"a person {verbs[gold]} .",
                "gold_label": gold,
            }
            lines.append(
                "\t".join(values.get(c, gold if c.startswith("label") else "-") for c in header)
            )
        (root / "MNLI" / f"{split}.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_mnli_from_glue_files_reports_both_dev_splits(tmp_path):
    """MNLI end to end from a folder in GLUE's layout: three labels, and the matched and the
    mismatched dev sets each scored on their own file (accuracy counts on 30 and on 7 rows)."""
    root = tmp_path / "glue"
    sizes = {"train": 120, "dev_matched": 30, "dev_mismatched": 7}
    write_mnli(root, sizes)
    done = smoke_run(
        tmp_path / "run",
        "task=mnli",
        f"task.data_dir={root}",
        "task.max_length=32",
        "train.max_steps=12",
        "train.val_every=6",
        "train.ckpt_every=12",
        "dam.warmup_steps=2",
    )
    results = done.saved_results
    assert results["task"] == "mnli"
    assert set(results["metrics"]) == {"val/accuracy", "val/accuracy_mismatched"}
    for key, rows in (("val/accuracy", 30), ("val/accuracy_mismatched", 7)):
        correct = results["metrics"][key] * rows
        assert 0 <= correct <= rows and correct == pytest.approx(round(correct), abs=1e-6), key
    hidden = 32  # a three-way head: pooler (hidden x hidden) + classifier (hidden x 3)
    assert results["params"]["head"] == hidden * hidden + hidden + hidden * 3 + 3


@pytest.mark.slow
def test_bf16_mixed_runs_on_cpu_with_finite_metrics(reference, tmp_path):
    """The harness allows ``trainer.precision=bf16-mixed`` on CPU (Lightning autocasts to
    bfloat16 there): the smoke run finishes with finite losses and metrics, and its losses are not
    the float32 reference's (the setting took effect)."""
    import csv
    import math

    done = smoke_run(tmp_path, "trainer.precision=bf16-mixed")
    assert done.results["steps"] == STEPS
    assert done.results["metrics"] and all(
        math.isfinite(v) for v in done.results["metrics"].values()
    )

    def losses(out: Path) -> list[float]:
        with (out / "csv" / "metrics.csv").open(newline="") as handle:
            return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]

    mine, ref = losses(tmp_path), losses(reference.out)
    assert len(mine) == len(ref) > 0 and all(math.isfinite(v) for v in mine)
    assert mine != pytest.approx(ref, rel=1e-6, abs=0)


@pytest.mark.slow
def test_the_final_weights_are_scored_once(tmp_path, monkeypatch):
    """A dev evaluation scheduled at the last step is the final score: no second dev pass at the
    end (on MNLI a pass is 20k examples). When `train.val_every` does not divide the steps, the
    final weights are scored at the end, and that is what results.json reports."""
    import csv

    import lightning.pytorch as pl

    passes = []
    validate = pl.Trainer.validate
    monkeypatch.setattr(
        pl.Trainer, "validate", lambda self, *a, **k: passes.append(1) or validate(self, *a, **k)
    )
    for val_every, extra_passes in ((20, 0), (15, 1)):
        passes.clear()
        out = tmp_path / f"every{val_every}"
        overrides = ["+experiment=smoke", "method=lora", f"train.val_every={val_every}"]
        results = run(compose_config(overrides, out), out)
        assert len(passes) == extra_passes
        with (out / "csv" / "metrics.csv").open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("val/accuracy")]
        # One dev row per scheduled evaluation, plus the final pass where one was needed.
        assert len(rows) == STEPS // val_every + extra_passes
        assert results["metrics"]["val/accuracy"] == pytest.approx(float(rows[-1]["val/accuracy"]))
