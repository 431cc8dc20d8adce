"""Do the seeds of a study keep the same modules? (issue 20.3: what the gates learn)

For each method folder of a finished study (``<runs>/<task>/<method>/seed*/dam/mask.json``, as
bench/decoder_study.py and bench/gpu_study.py lay them out), the kept sets of every pair of
seeds are compared by their Jaccard overlap |A & B| / |A | B|. A search whose choice is a property
of the task keeps nearly the same set at every seed (overlap near 1); a choice that is noise
overlaps like two random draws of the same size, about p / (2 - p) for a share p kept. The
random-order control (``diffora_random_order``) and ``random_mask`` are that chance level,
measured with the same budget. Also printed: how many of the kept modules are of each type,
summed over the seeds.

    python bench/kept_sets.py bench/results/decoder/sst2 --methods diffora diffora_random_order

Reads only; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
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


def kept_sets(folder: Path) -> tuple[dict[str, set[str]], int]:
    """``{seed folder: kept module names}`` and the number of candidates."""
    sets, candidates = {}, 0
    for path in sorted(folder.glob("seed*/dam/mask.json")):
        mask = json.loads(path.read_text())
        sets[path.parts[-3]] = set(mask["kept_modules"])
        candidates = len(mask["modules"])
    return sets, candidates


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def stability(folder: Path) -> Stability | None:
    sets, candidates = kept_sets(folder)
    if len(sets) < 2:
        return None
    overlaps = [jaccard(a, b) for a, b in itertools.combinations(sets.values(), 2)]
    share = statistics.mean(len(s) for s in sets.values()) / candidates
    by_type = Counter(name.rsplit(".", 1)[-1] for kept in sets.values() for name in kept)
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
    )


def table(rows: list[Stability]) -> str:
    lines = [
        "| method | seeds | kept of candidates | overlap mean (min, max) | chance p/(2-p) | "
        "kept by type, all seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = f"{min(r.kept)}-{max(r.kept)} of {r.candidates}"
        overlap = f"{r.overlap_mean:.3f} ({r.overlap_min:.3f}, {r.overlap_max:.3f})"
        types = ", ".join(f"{t} {n}" for t, n in r.by_type.items())
        lines.append(f"| {r.method} | {r.seeds} | {kept} | {overlap} | {r.chance:.3f} | {types} |")
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
