"""What a run shows while it trains: a bar on a terminal, log lines elsewhere, a resume notice."""

from __future__ import annotations

import io
import logging
import re

import pytest
from conftest import compose_config

from diffora_lab.progress import PhaseProgressBar, ProgressLog, progress_callbacks
from diffora_lab.train import run

STEPS = 8  # 4 search steps (architecture steps from step 1), 4 fine-tuning steps
SHORT = (
    f"train.max_steps={STEPS}",
    "train.val_every=8",
    "train.ckpt_every=4",
    "dam.warmup_steps=1",
    "dam.log_every=4",
    "logger=none",
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def smoke(tmp_path, *overrides):
    cfg = compose_config(["+experiment=smoke", *SHORT, *overrides], tmp_path)
    return run(cfg, tmp_path)


def test_the_view_follows_the_output():
    assert isinstance(progress_callbacks(True, 30, terminal=True)[-1], PhaseProgressBar)
    assert isinstance(progress_callbacks(True, 30, terminal=False)[-1], ProgressLog)
    assert len(progress_callbacks(False, 30, terminal=False)) == 1  # the resume notice only


@pytest.mark.slow
def test_off_a_terminal_log_lines_carry_phase_step_losses_rate_and_eta(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr("sys.stdout", Pipe())
    with caplog.at_level(logging.INFO, logger="diffora_lab"):
        smoke(tmp_path, "train.progress_every=0")  # a line after every step
    lines = [r.getMessage() for r in caplog.records if " steps/s " in r.getMessage()]
    pattern = re.compile(
        r"(search|finetune) step (\d+)/8 \| loss \S+( search_loss \S+)? \| "
        r"\d+\.\d\d steps/s \| ETA \d+m\d\ds"
    )
    parsed = [pattern.fullmatch(line) for line in lines]
    assert all(parsed), lines
    steps = [int(m.group(2)) for m in parsed]
    assert steps[0] == 1 and steps[-1] == STEPS
    phases = [m.group(1) for m in parsed]
    assert "search" in phases and phases[-1] == "finetune"
    # The search loss appears once architecture steps run, and only while searching.
    assert any(m.group(3) for m in parsed if m.group(1) == "search")
    assert not any(m.group(3) for m in parsed if m.group(1) == "finetune")


@pytest.mark.slow
def test_off_a_terminal_the_interval_holds_lines_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("sys.stdout", Pipe())
    with caplog.at_level(logging.INFO, logger="diffora_lab"):
        smoke(tmp_path, "train.progress_every=3600")
    lines = [r.getMessage() for r in caplog.records if " steps/s " in r.getMessage()]
    # The first step, the change of phase and the end: not one per step.
    assert [line.split(" |")[0] for line in lines] == [
        "search step 1/8",
        f"finetune step {STEPS // 2 + 1}/8",
        f"finetune step {STEPS}/8",
    ]


@pytest.mark.slow
def test_on_a_terminal_the_bar_shows_phase_steps_losses_rate_and_eta(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    smoke(tmp_path)
    frames = terminal.getvalue().replace("\r", "\n").splitlines()
    bars = [f for f in frames if " steps |" in f]
    assert any(f.startswith("search ") for f in bars), bars
    last = [f for f in bars if f.startswith("finetune ") and f"{STEPS}/{STEPS} steps" in f]
    assert last, bars
    assert "step/s" in last[-1] or "s/step" in last[-1]  # the rate
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", last[-1])  # elapsed < time left (ETA)
    assert "loss=" in last[-1]
    assert any("search_loss=" in f for f in bars if f.startswith("search "))


@pytest.mark.slow
def test_resuming_says_from_which_step_and_phase(tmp_path, capsys):
    stopped = smoke(tmp_path, "train.stop_after=2", "trainer.enable_progress_bar=false")
    assert stopped["stopped_at"] == 2
    capsys.readouterr()
    smoke(tmp_path, "ckpt_path=last", "trainer.enable_progress_bar=false")
    out = capsys.readouterr().out.splitlines()
    notices = [line for line in out if line.startswith("diffora_lab: resuming")]
    assert notices == ["diffora_lab: resuming from checkpoint at step 2 of 8, phase search"]
