"""Do the seeds of a study keep the same modules? (issue 20.3: what the gates learn)

For each method folder of a study (``<runs>/<task>/<method>/seed*/dam/mask.json`` of the runs
that finished, as bench/decoder_study.py and bench/gpu_study.py lay them out), the kept sets of
every pair of seeds are compared by their Jaccard overlap |A & B| / |A | B|. A search whose
choice is a property of the task keeps nearly the same set at every seed (overlap near 1); a
choice that is noise overlaps like two random draws of the same size, about p / (2 - p) for a
share p kept. The random-order control (``diffora_random_order``) and ``random_mask`` are that
chance level, measured with the same budget. Also printed: how many of the kept modules are of
each type, summed over the seeds.

Where the seeds recorded their gates (``dam/gates.jsonl``, every ``dam.log_every`` steps of the
search; a removed module's gate is recorded as 0), the order in which the search removed the
modules is compared too: each module's removal step (the first record with its gate at 0; kept
modules last), the Spearman correlation of those orders for every pair of seeds (0: unrelated
orders, 1: the same), and the gates' spread (max - min) in the last record before the first
removal: how far the gates had separated when the first modules left.

    python bench/kept_sets.py bench/results/decoder/sst2 --methods diffora diffora_random_order

Reads only; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Stability:
    method: str
    seeds: int
    candidates: int
    kept: list[int]
    overlap_mean: float
    overlap_min: float
    overlap_max: float
    chance: float
    by_type: dict[str, int]
    order_agreement: float | None = None  # mean Spearman of the removal orders over seed pairs
    first_removal: list[int] | None = None  # per seed: the step of the first removal
    spread_before: list[float] | None = None  # per seed: max - min gate just before it


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank; inf: after every step)."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    def finite(values: list[float]) -> torch.Tensor:
        top = max((v for v in values if v != float("inf")), default=0.0)
        return torch.tensor(
            [top + 1 if v == float("inf") else v for v in values], dtype=torch.float64
        )

    x, y = finite(a), finite(b)
    if len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:
        return float("nan")
    return float(spearman_corrcoef(x, y))


def removal_steps(path: Path) -> tuple[list[float], int, float] | None:
    """From one seed's ``gates.jsonl``: each module's removal step (inf: never removed), the
    step of the first removal and the gates' spread in the last record before it."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    records.sort(key=lambda r: r["step"])
    removed = [float("inf")] * len(records[0]["gates"])
    first, spread = None, 0.0
    previous = records[0]["gates"]
    for record in records:
        gates = record["gates"]
        for i, gate in enumerate(gates):
            if gate == 0 and removed[i] == float("inf"):
                removed[i] = record["step"]
        if first is None and any(g == 0 for g in gates):
            first, spread = record["step"], max(previous) - min(previous)
        previous = gates
    return removed, (first if first is not None else -1), spread


def finished(folder: Path, name: str) -> list[Path]:
    """``seed*/<name>`` of the finished runs (``results.json`` written): a run stopped mid-way
    is left out, as it is of the study's table."""
    return [
        p for p in sorted(folder.glob(f"seed*/{name}")) if (p.parents[1] / "results.json").is_file()
    ]


def kept_sets(folder: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``{seed folder: kept module names}`` and the candidates' names."""
    sets, candidates = {}, []
    for path in finished(folder, "dam/mask.json"):
        mask = json.loads(path.read_text())
        sets[path.parts[-3]] = set(mask["kept_modules"])
        candidates = mask["modules"]
    return sets, candidates


def module_type(name: str, candidates: list[str]) -> str:
    """A module's type: its last name part (``q_proj``), or the part after the layer index
    where last parts repeat across types (BERT's ``attention.output.dense``, ``output.dense``)."""

    def after_layer(n: str) -> str:
        return re.split(r"\.\d+\.", n, maxsplit=1)[-1]

    types = {after_layer(c) for c in candidates} or {after_layer(name)}
    if len({t.rsplit(".", 1)[-1] for t in types}) == len(types):
        return name.rsplit(".", 1)[-1]
    return after_layer(name)


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def stability(folder: Path) -> Stability | None:
    sets, names = kept_sets(folder)
    candidates = len(names)
    if len(sets) < 2:
        return None
    overlaps = [jaccard(a, b) for a, b in itertools.combinations(sets.values(), 2)]
    share = statistics.mean(len(s) for s in sets.values()) / candidates
    by_type = Counter(module_type(n, names) for kept in sets.values() for n in kept)
    orders = [
        r
        for r in (removal_steps(p) for p in finished(folder, "dam/gates.jsonl"))
        if r is not None and r[1] >= 0
    ]
    agreement = None
    if len(orders) >= 2:
        pairs = [spearman(a[0], b[0]) for a, b in itertools.combinations(orders, 2)]
        agreement = statistics.mean(pairs)
    return Stability(
        method=folder.name,
        seeds=len(sets),
        candidates=candidates,
        kept=[len(s) for s in sets.values()],
        overlap_mean=statistics.mean(overlaps),
        overlap_min=min(overlaps),
        overlap_max=max(overlaps),
        chance=share / (2 - share),
        by_type=dict(sorted(by_type.items())),
        order_agreement=agreement,
        first_removal=[r[1] for r in orders] or None,
        spread_before=[r[2] for r in orders] or None,
    )


def table(rows: list[Stability]) -> str:
    lines = [
        "| method | seeds | kept of candidates | overlap mean (min, max) | chance p/(2-p) | "
        "removal order, Spearman over seed pairs | first removal seen (record step) "
        "| gate spread then | kept by type, all seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = f"{min(r.kept)}-{max(r.kept)} of {r.candidates}"
        overlap = f"{r.overlap_mean:.3f} ({r.overlap_min:.3f}, {r.overlap_max:.3f})"
        types = ", ".join(f"{t} {n}" for t, n in r.by_type.items())
        agreement = "-" if r.order_agreement is None else f"{r.order_agreement:.3f}"
        first = "-" if not r.first_removal else "/".join(map(str, sorted(set(r.first_removal))))
        spread = "-"
        if r.spread_before:
            spread = f"{min(r.spread_before):.4f}-{max(r.spread_before):.4f}"
        lines.append(
            f"| {r.method} | {r.seeds} | {kept} | {overlap} | {r.chance:.3f} | {agreement} "
            f"| {first} | {spread} | {types} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_folder", type=Path, help="<runs>/<task>: one folder per method")
    parser.add_argument("--methods", nargs="+", help="method folders (default: every one)")
    args = parser.parse_args(argv)
    names = args.methods or sorted(p.name for p in args.task_folder.iterdir() if p.is_dir())
    rows = [s for s in (stability(args.task_folder / n) for n in names) if s is not None]
    if not rows:
        parser.error(f"{args.task_folder}: no method folder has two seeds with dam/mask.json")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
