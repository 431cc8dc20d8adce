"""The README's "Bad input" table, run row by row.

Each row of the table names the input (command-line overrides), the situation it meets (a data
folder, a checkpoint, a busy or finished run folder: built here by ``SITUATIONS``) and the exact
message. The test reads the table from README.md, so the README cannot drift from the code: every
row must be refused by ``train.run`` with that message, before anything is written to the run
folder (the folder is compared byte for byte before and after). The CLI's side (exit code 2, no
traceback) is covered by ``test_cli_refusals_exit_2_without_traceback_and_leave_the_folder``.

Placeholders in the table: ``RUN`` the run folder, ``DIR`` the data folder, ``MASK`` the mask
file, ``PID``/``HOST`` the process holding the folder, ``CKPT`` another run's checkpoint, ``…``
any text (e.g. a machine's core count).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, compose_config, run_main

from diffora_lab.runfolder import RunFolderLock
from diffora_lab.train import ConfigError, run

SECTION = "## Bad input"


@dataclass
class Row:
    overrides: list[str]
    situation: str
    message: str


def read_table(readme: Path = REPO / "README.md") -> list[Row]:
    """The rows of the first table in the README's "Bad input" section."""
    lines = readme.read_text().split(SECTION, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3 and cells[2][0] == cells[2][-1] == "`", line
        overrides = re.findall(r"`([^`]+)`", cells[0])
        situation = "" if cells[1] == "(none)" else cells[1]
        rows.append(Row(overrides, situation, cells[2][1:-1]))
    return rows


# ------------------------------------------------------------------------------- situations


def sst2_rows() -> list[list[str]]:
    words = ["a fine film", "a dull plot", "great acting", "bad pacing"]
    return [[f"{words[i % 4]} number {i}", str(i % 2)] for i in range(40)]


def write_sst2(root: Path, train_lines: list[bytes] | None = None) -> None:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    lines = [b"sentence\tlabel", *("\t".join(r).encode() for r in sst2_rows())]
    (folder / "dev.tsv").write_bytes(b"\n".join(lines[:11]) + b"\n")
    (folder / "train.tsv").write_bytes(b"\n".join(train_lines or lines) + b"\n")


def sst2_with(line_number: int, content: bytes) -> Callable:
    def make(ctx: Context) -> None:
        lines = [b"sentence\tlabel", *("\t".join(r).encode() for r in sst2_rows())]
        lines[line_number - 1] = content
        write_sst2(ctx.data, lines)

    return make


def cola_with_header(ctx: Context) -> None:
    folder = ctx.data / "CoLA"
    folder.mkdir(parents=True)
    rows = [f"gj04\t{i % 2}\t\tsentence number {i} is fine ." for i in range(30)]
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")
    (folder / "train.tsv").write_text("\n".join(["source\tlabel\tmark\tsentence", *rows]) + "\n")


def mask_file(edit: Callable[[dict], object]) -> Callable:
    def make(ctx: Context) -> None:
        mask = json.loads(ctx.saved_mask.read_text())
        content = edit(mask)
        ctx.mask.write_text(content if isinstance(content, str) else json.dumps(content))

    return make


def keep_all(mask: dict) -> dict:
    return {**mask, "kept": [True] * len(mask["kept"]), "k": len(mask["kept"])}


def in_modules(budget: float, k: int) -> Callable[[dict], dict]:
    """The mask in the paper's unit (modules) at ``budget``, keeping its first ``k`` modules."""

    def edit(mask: dict) -> dict:
        kept = [index < k for index in range(len(mask["kept"]))]
        return {**mask, "unit": "modules", "budget": budget, "kept": kept, "k": k}

    return edit


def in_params_keeping_all(mask: dict) -> dict:
    """A mask in parameters (12 modules of 10, target 60) whose ``kept`` was edited to all."""
    return {**keep_all(mask), "unit": "params", "sizes": [10] * 12, "target": 60.0}


def nan_gate(mask: dict) -> str:
    return json.dumps({**mask, "gates": [float("nan"), *mask["gates"][1:]]})  # NaN, as json writes


def kept_as_numbers(mask: dict) -> dict:
    return {**mask, "kept": [int(flag) for flag in mask["kept"]]}


def sst2_raw(train: bytes) -> Callable:
    def make(ctx: Context) -> None:
        write_sst2(ctx.data)
        (ctx.data / "SST-2" / "train.tsv").write_bytes(train)

    return make


def drop_one(mask: dict) -> dict:
    mask["kept"] = mask["kept"][:-1]
    return mask


def keep_none(mask: dict) -> dict:
    mask["kept"] = [False] * len(mask["kept"])
    mask["k"] = 0
    return mask


def checkpoint(transform: Callable[[bytes], bytes]) -> Callable:
    """The stopped run's folder (.hydra-less: it ran in-process), its checkpoint transformed."""

    def make(ctx: Context) -> None:
        shutil.copytree(ctx.stopped, ctx.run, ignore=shutil.ignore_patterns("cache"))
        last = ctx.run / "checkpoints" / "last.ckpt"
        last.write_bytes(transform(last.read_bytes()))

    return make


def older_format(data: bytes) -> bytes:
    """The same checkpoint, its diffora_lab state marked as written in format 1."""
    import torch

    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    saved["diffora_lab"]["format"] = 1
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue()


def boolq_with(broken: dict) -> Callable:
    """A commonsense folder (LLM-Adapters layout) whose boolq test.json item 1 is ``broken``."""

    def make(ctx: Context) -> None:
        item = {
            "instruction": "Please answer the following question with true or false, question: "
            "is the sky blue?\n\nAnswer format: true/false",
            "input": "",
            "output": "the correct answer is true",
            "answer": "true",
        }
        folder = ctx.data / "dataset" / "boolq"
        folder.mkdir(parents=True)
        (folder / "train.json").write_text(json.dumps([item] * 8))
        (folder / "test.json").write_text(json.dumps([item, {**item, **broken}]))
        if broken.get("answer") is None:
            test = json.loads((folder / "test.json").read_text())
            del test[1]["answer"]
            (folder / "test.json").write_text(json.dumps(test))

    return make


class Planted:
    """Unpickling this would call ``os.getcwd`` (a harmless stand-in for ``os.system``);
    tests/test_untrusted_files.py proves such a file runs code when unpickled, and is refused."""

    def __reduce__(self):
        return (os.getcwd, ())


def planted(data: bytes) -> bytes:
    """The same checkpoint with an object planted among its entries."""
    import torch

    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    saved["callbacks"]["Planted"] = Planted()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue()


def finished_with_checkpoint(ctx: Context) -> None:
    """The finished budget-0.5 run (8 steps) that wrote the mask, in the run folder."""
    shutil.copytree(ctx.saved_mask.parents[1], ctx.run, ignore=shutil.ignore_patterns("cache"))


def another_runs_checkpoint(ctx: Context) -> None:
    shutil.copyfile(ctx.saved_mask.parents[1] / "checkpoints" / "last.ckpt", ctx.ckpt)


def finished_folder(ctx: Context) -> None:
    ctx.run.mkdir(parents=True)
    (ctx.run / "results.json").write_text(json.dumps({"task": "synthetic", "steps": 40}))


def busy_folder(ctx: Context) -> None:
    ctx.lock = RunFolderLock(ctx.run)  # this process holds it: a second open file is refused
    ctx.lock.acquire()


SITUATIONS: dict[str, Callable] = {
    "": lambda ctx: None,
    "SST-2 train.tsv with a non-UTF-8 byte on line 3": sst2_with(3, b"caf\xe9 au lait\t1"),
    "SST-2 train.tsv with label `2` on line 4": sst2_with(4, b"a fine film\t2"),
    "CoLA train.tsv with a header line": cola_with_header,
    "SST-2 train.tsv with one example": sst2_raw(b"sentence\tlabel\na fine film\t1\n"),
    "SST-2 train.tsv with CR-only line endings": sst2_raw(
        b"\r".join([b"sentence\tlabel", *("\t".join(r).encode() for r in sst2_rows())]) + b"\r"
    ),
    "an empty mask file": mask_file(lambda mask: ""),
    "a mask with budget 0.9 that keeps 6 of 12": mask_file(in_modules(0.9, 6)),
    "a mask that keeps 12 of 12 at budget 0.5": mask_file(in_modules(0.5, 12)),
    "a mask in params edited to keep all 12 modules": mask_file(in_params_keeping_all),
    "a mask with 5 `module_types` for 6 columns": mask_file(
        lambda mask: {**mask, "module_types": mask["module_types"][:5]}
    ),
    "a mask with a NaN gate": mask_file(nan_gate),
    "a mask whose `kept` holds 1 and 0": mask_file(kept_as_numbers),
    "a mask with one `kept` entry missing": mask_file(drop_one),
    "a mask that keeps no module": mask_file(keep_none),
    "a checkpoint at step 6": checkpoint(lambda data: data),
    "an empty checkpoint": checkpoint(lambda data: b""),
    "a truncated checkpoint": checkpoint(lambda data: data[: len(data) // 2]),
    "a checkpoint written by another version (format 1)": checkpoint(older_format),
    "a commonsense folder whose boolq test item 1 has no `answer`": boolq_with({"answer": None}),
    "a commonsense folder whose boolq test item 1 answers `maybe`": boolq_with({"answer": "maybe"}),
    "a checkpoint that would run code when unpickled": checkpoint(planted),
    "a mask file": mask_file(lambda mask: mask),
    "a finished run folder": finished_folder,
    "a run folder finished at budget 0.5": finished_with_checkpoint,
    "another run's finished checkpoint at CKPT": another_runs_checkpoint,
    "a run folder in use by another process": busy_folder,
}


@dataclass
class Context:
    root: Path
    stopped: Path  # a real run folder stopped at step 6 (checkpoint, CSV, search split)
    saved_mask: Path  # a real dam/mask.json
    lock: RunFolderLock | None = None

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def data(self) -> Path:
        return self.root / "glue"

    @property
    def mask(self) -> Path:
        return self.root / "mask.json"

    @property
    def ckpt(self) -> Path:
        return self.root / "finished.ckpt"

    def substitute(self, text: str) -> str:
        for name, value in (
            ("RUN", str(self.run)),
            ("DIR", str(self.data)),
            ("MASK", str(self.mask)),
            ("CKPT", str(self.ckpt)),
            ("PID", str(__import__("os").getpid())),
            ("HOST", socket.gethostname()),
        ):
            text = text.replace(name, value)
        return text


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """A smoke run stopped at step 6, and a mask (from a short run at budget 0.5)."""
    out = tmp_path_factory.mktemp("stopped")
    run(compose_config(["+experiment=smoke", "train.stop_after=6"], out), out)
    assert (out / "csv" / "metrics.csv").is_file() and (out / "dam" / "search_split.json").is_file()
    masked = tmp_path_factory.mktemp("masked")
    cfg = compose_config(["+experiment=smoke", "train.max_steps=8", "dam.warmup_steps=1"], masked)
    run(cfg, masked)
    return out, masked / "dam" / "mask.json"


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def matches(expected: str, actual: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("…"))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


ROWS = read_table()


def test_the_table_covers_the_issue_cases():
    inputs = {" ".join(row.overrides) + " | " + row.situation for row in ROWS}
    assert len(inputs) == len(ROWS) >= 40  # no duplicate rows
    assert set(SITUATIONS) == {row.situation for row in ROWS}  # every situation is used


@pytest.mark.parametrize(
    "row",
    ROWS,
    ids=[" ".join(r.overrides) + (f" [{r.situation}]" if r.situation else "") for r in ROWS],
)
def test_bad_input_is_refused_with_the_readme_message(row, tmp_path, stopped):
    ctx = Context(tmp_path, *stopped)
    SITUATIONS[row.situation](ctx)
    overrides = [ctx.substitute(o) for o in row.overrides]
    cfg = compose_config(["+experiment=smoke", *overrides], tmp_path)
    for override in overrides:  # compose_config points data.cache_dir into tmp_path
        if override.startswith("data.cache_dir="):
            cfg.data.cache_dir = override.split("=", 1)[1]
    before = snapshot(ctx.run)
    try:
        with pytest.raises(ConfigError) as refused:
            run(cfg, ctx.run)
    finally:
        if ctx.lock is not None:
            ctx.lock.release()
    message = str(refused.value)
    assert matches(ctx.substitute(row.message), message), message
    if ctx.lock is not None:
        before = {k: v for k, v in before.items() if k != ".lock"}
    after = snapshot(ctx.run)
    assert after == before, "a refused run changed its folder"


def test_cli_refusals_exit_2_without_traceback_and_leave_the_folder(tmp_path):
    """A command on a folder another run holds (here this process's lock, taken as a second
    process would) exits 2 at once naming the holder's pid and host, prints no traceback, and
    leaves the holder's .hydra/ and logs untouched (the command runs here: conftest.run_main)."""
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (folder / "csv").mkdir()
    (folder / "csv" / "metrics.csv").write_text("step,train/loss\n0,0.7\n")
    before = snapshot(folder)
    env = {"DIFFORA_CACHE": str(tmp_path / "cache")}
    with RunFolderLock(folder):
        before_locked = snapshot(folder)
        args = ["+experiment=smoke", "seed=2", f"hydra.run.dir={folder}"]
        done = run_main(args, tmp_path, env)
        assert snapshot(folder) == before_locked
    assert done.returncode == 2, done.stderr[-2000:]
    pid, host = __import__("os").getpid(), socket.gethostname()
    assert f"in use by pid {pid} on host {host}" in done.stderr
    assert "diffora_lab: error: hydra.run.dir=" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert snapshot(folder) == before
