"""The README is true: its command blocks run, its shown outputs match what the code prints.

Every fenced block of README.md is taken apart here: ``bash`` blocks are split into commands and
run (``python -m diffora_lab ...`` with a few overrides appended so they finish in seconds),
``python`` blocks are executed, a ``$ command`` block's output is compared with what the command
prints, and the summary block's line labels with a real run's summary. Commands that need the
hub, a GPU, a cluster or the network are listed in :data:`NOT_RUN` with the reason; each entry
must still occur in the README, so the list cannot go stale, and any other command is run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_GLUE, run_main

from diffora_lab import gguf

README = REPO / "README.md"

# Substring of a command -> why this test does not run it.
NOT_RUN = {
    "bash scripts/setup_and_run.sh": "installs packages (network); the default job is run below",
    "bash scripts/test.sh": "runs this test suite",
    "+experiment=deberta_mnli": "DeBERTa-v3-base and MNLI from the hub",
    "backbone.path=/models/deberta-v3-base": "a local DeBERTa-v3-base folder",
    "hydra/launcher=slurm": "a SLURM cluster with GPUs",
    "runs/smoke_decoder": "the decoder export walk-through: tests/test_lm_eval.py runs it",
    "vllm serve": "vLLM on a GPU",
    "convert_lora_to_gguf.py": "llama.cpp's converter (a llama.cpp checkout)",
    "llama-cli": "llama.cpp",
    "+experiment=llama3_8b_commonsense": "Llama-3-8B and the LLM-Adapters data on a GPU",
}
# Placeholders the README uses for a finished run -> a finished run folder of the test's.
RUN_PLACEHOLDER = "outputs/synthetic/diffora/2026-11-28_11-40-02"
# Appended to every `python -m diffora_lab` command but the default job (the fixture runs that
# one in full): a few steps on the first 256 train examples (not SST-2's 67k), no W&B, on a tiny
# backbone.
FAST = (
    "train.max_steps=6",
    "task.train_limit=256",
    "train.val_every=3",
    "train.ckpt_every=3",
    "train.eval_batch_size=256",
    "dam.warmup_steps=1",
    "dam.log_every=2",
    "logger=none",
)
TINY = ("backbone=tiny_deberta", "task.max_length=64")
# Decoder commands (README "Decoder LLMs") run on the tiny random Llama instead, scored on the
# first 24 dev items (each item is one forward pass per answer choice).
DECODER = ("smoke_decoder", "smollm2", "tiny_llama", "tiny_qwen2", "commonsense")
# The GGUF tokenizer is the machine's converted copy (the other tests' too), as a user's
# second command finds it: converting it again would take 11 s.
TINY_DECODER = (
    "backbone=tiny_llama",
    "task.max_length=64",
    "task.dev_limit=24",
    f"backbone.convert_dir={gguf.default_root()}",
)


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, indented ones included."""
    text = README.read_text()
    found = re.findall(r"^( *)```(\w*)\n(.*?)^\1```", text, flags=re.M | re.S)
    return [
        (lang, "\n".join(line[len(indent) :] for line in body.splitlines()))
        for indent, lang, body in found
    ]


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, trailing comments removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    result = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            result.append(line)
    return result


def skip_reason(command: str) -> str | None:
    return next((why for key, why in NOT_RUN.items() if key in command), None)


def test_the_not_run_list_names_commands_the_readme_still_has():
    every = [c for lang, body in blocks() if lang == "bash" for c in commands(body)]
    for key in NOT_RUN:
        assert any(key in c for c in every), f"NOT_RUN entry {key!r} no longer in the README"


def test_matched_table_in_the_readme_is_what_the_code_prints():
    from diffora_lab.matching import params_table

    printed = set(params_table().splitlines())
    readme = [line for line in README.read_text().splitlines() if line.startswith("| MiniLM-L6")]
    readme += [line for line in README.read_text().splitlines() if line.startswith("| DeBERTa")]
    assert len(readme) == 12
    assert set(readme) <= printed


def _env(tmp: Path) -> dict[str, str]:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DIFFORA_CACHE=str(tmp / "cache"),
        # The test processes share the cores (one per core): one thread each.
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )


def _prepare(command: str, tmp: Path, index: int, finished: Path | None) -> list[str] | None:
    """The command as run here (placeholders filled, overrides appended), or None to skip."""
    if finished is not None:
        command = command.replace(RUN_PLACEHOLDER, str(finished))
        command = command.replace("path/to/adapter", str(finished / "adapter"))
    if "data.dir" in command or "data_dir" in command or "/data/glue" in command:
        if not SHARED_GLUE.is_dir():
            return None
        command = re.sub(r"(?<=[\s=])(\.\./shared)?/data/glue", str(SHARED_GLUE), command)
    args = shlex.split(command)
    if args[0] == "python":
        args[0] = sys.executable
    if args[1:3] == ["-m", "diffora_lab"]:
        tiny = TINY_DECODER if any(key in command for key in DECODER) else TINY
        args += [*FAST, *tiny]
        args += [f"hydra.run.dir={tmp}/run{index}", f"hydra.sweep.dir={tmp}/multi{index}"]
    return args


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's first command, `python -m diffora_lab`: the full default job, as the README
    ran it (W&B offline, as without an API key), only in a folder of the test's. Its summary is
    compared with the README's, its adapter loaded by the README's Python block, its folder
    evaluated by the README's evaluate command."""
    tmp = tmp_path_factory.mktemp("readme")
    done = _run([sys.executable, "-m", "diffora_lab", f"hydra.run.dir={tmp}/run0"], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run0", done.stdout


@pytest.mark.slow
def test_every_bash_command_runs(reference_run, tmp_path):
    """Every command but the default job (see ``default_run``), shortened; the run folder and
    adapter the README's commands name are the session's finished reference run's. Each
    ``python -m`` command runs in this process (``conftest.run_main``: the module's ``__main__``
    with the command's arguments and exit status; the default job and ``--help`` run as processes
    of their own)."""
    run_dir = reference_run.out
    ran, skipped = [], []
    for index, command in enumerate(
        c for lang, body in blocks() if lang == "bash" for c in commands(body)
    ):
        if command == "python -m diffora_lab":
            continue  # the default job: the `default_run` fixture runs it in full
        args = None if skip_reason(command) else _prepare(command, tmp_path, index + 1, run_dir)
        if args is None:
            skipped.append(command)
            continue
        assert args[:2] == [sys.executable, "-m"], command  # every command run is `python -m`
        # One cache for all, as on a user's machine (~/.cache/diffora_lab): the GGUF tokenizer
        # of the decoder commands is converted once.
        done = run_main(args[3:], tmp_path, {"DIFFORA_CACHE": str(tmp_path / "cache")}, args[2])
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command)
    # smoke, sweep, lora, evaluate; with ../shared also the GLUE commands (a user's clone has no
    # ../shared: the commands that need it are skipped, not failed).
    assert len(ran) >= (5 if SHARED_GLUE.is_dir() else 4), ran
    assert all(skip_reason(c) or not SHARED_GLUE.is_dir() for c in skipped), skipped


@pytest.mark.slow
def test_python_blocks_run_and_load_the_adapter(default_run, tmp_path, monkeypatch):
    from peft import PeftModel

    run_dir, _ = default_run
    python_blocks = [body for lang, body in blocks() if lang == "python"]
    assert python_blocks
    monkeypatch.chdir(tmp_path)
    for body in python_blocks:
        namespace: dict = {}
        exec(compile(body.replace(RUN_PLACEHOLDER, str(run_dir)), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, PeftModel)
    assert model.base_model.model.config.num_labels == namespace["num_labels"] == 2


def summary_block() -> str:
    return next(body for lang, body in blocks() if lang == "" and body.startswith("diffora_lab:"))


# Summary lines that vary from run to run (wall time) or machine to machine (where it ran).
VARYING = {
    "time": r"\d+ s: start-up \d+ s, search \d+ s, fine-tune \d+ s, scoring and export \d+ s"
}


@pytest.mark.slow
def test_summary_block_is_the_summary_of_the_default_job(default_run):
    """The README's example is what `python -m diffora_lab` prints, the full default job: every
    line but the time and the run folder as shown, those two in the shown form."""
    _, stdout = default_run
    real = stdout.splitlines()
    real = real[real.index(summary_block().splitlines()[0]) :]  # the header is the same
    assert len(real) >= len(summary_block().splitlines())
    for shown, printed in zip(summary_block().splitlines(), real, strict=False):
        label, _, value = shown.strip().partition("  ")
        assert printed.strip().startswith(label), (shown, printed)
        if label == "outputs":
            continue  # the run folder
        if label in VARYING:
            assert re.fullmatch(VARYING[label], printed.strip()[len(label) :].strip()), printed
            continue
        assert printed.rstrip() == shown.rstrip(), (shown, printed)  # deterministic


@pytest.mark.slow
def test_bad_input_block_shows_what_the_cli_prints(tmp_path):
    shown = next(body for lang, body in blocks() if lang == "" and body.startswith("$ "))
    first, *expected = shown.splitlines()
    args = _prepare(first.removeprefix("$ "), tmp_path, 99, None)
    done = run_main(args[3:], tmp_path, {"DIFFORA_CACHE": str(tmp_path / "cache")}, args[2])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == expected


@pytest.mark.slow
def test_help_describes_the_app_and_its_main_settings(tmp_path):
    done = _run([sys.executable, "-m", "diffora_lab", "--help"], tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("diffora_lab: DiffoRA")
    head = done.stdout.split("== Configuration groups ==")[0]
    for setting in ("method=", "task=", "backbone=", "budget=", "rank=", "seed=", "logger="):
        assert setting in head, setting
    assert "+experiment=smoke" in head and "hydra.run.dir=" in head
    # Hydra's lists of options and of every key follow, under the app's name.
    assert "method: adalora, bitfit, diffora" in done.stdout and "\nbudget: 0.5\n" in done.stdout
    assert "__main__" not in done.stdout
