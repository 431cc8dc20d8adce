"""The default job next to one competing busy process, against the same job alone, side by side.

The job is the README's default run (``python -m diffora_lab``: MiniLM, the synthetic task,
search then fine-tuning) shortened to a fixed number of steps, started as a user would, so the
time includes start-up. Two thread settings are compared:

* ``app``    -- the environment without ``OMP_*``: the app sets ``OMP_WAIT_POLICY=PASSIVE`` and
  ``OMP_NUM_THREADS`` to the cores it may use before torch loads (``__main__.configure_threads``);
* ``active`` -- ``OMP_WAIT_POLICY=ACTIVE`` with the same thread count: OpenMP threads spin
  between parallel regions, as the app ran before it set the policy.

Each round runs, in an order rotated per round, every setting alone (``idle``) and next to one
busy process (a Python loop that keeps one core busy, started just before and stopped just after
the job). The claim is the ratio ``busy / idle`` per setting (median over rounds; goal: <= 2 on a
2-core machine, where a fair share of the cores would give 1.5); absolute times are printed for
context only (the machines are shared).

Run from the repository root::

    python bench/busy_machine.py                # 3 rounds, 12 steps per job
    python bench/busy_machine.py --rounds 1 --steps 6   # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("app", "active")


def job_env(setting: str, cache: str) -> dict[str, str]:
    """The environment of one job under a thread setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFORA_CACHE=cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    if setting == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    return env


def run_job(setting: str, steps: int, out: Path, cache: str) -> float:
    """Seconds the shortened default job takes, start-up included."""
    args = [
        sys.executable,
        "-m",
        "diffora_lab",
        f"train.max_steps={steps}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        "dam.warmup_steps=2",
        "dam.reuse_search=false",  # every job searches: the same work each time
        "logger=none",
        f"hydra.run.dir={out}",
    ]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, env=job_env(setting, cache), capture_output=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode()[-3000:])
    return seconds


def busy_process() -> subprocess.Popen:
    """One process that keeps one core busy until it is stopped."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores}; load average before: {os.getloadavg()}")
    times: dict[tuple[str, str], list[float]] = {}
    cases = [(s, load) for s in SETTINGS for load in ("idle", "busy")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        run_job("app", 6, Path(tmp) / "warm", cache)  # tokenization cache, page cache
        for round_index in range(args.rounds):
            shift = round_index % len(cases)
            for number, (setting, load) in enumerate(cases[shift:] + cases[:shift]):
                out = Path(tmp) / f"r{round_index}_{number}"
                competitor = busy_process() if load == "busy" else None
                try:
                    seconds = run_job(setting, args.steps, out, cache)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
                times.setdefault((setting, load), []).append(seconds)
                print(f"round {round_index} {setting:6s} {load:4s} {seconds:7.1f} s", flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    print(f"\n{'setting':8s} {'idle s':>8s} {'busy s':>8s} {'busy/idle':>10s}  (median of rounds)")
    for setting in SETTINGS:
        idle, busy = times[setting, "idle"], times[setting, "busy"]
        ratios = [b / i for b, i in zip(busy, idle)]
        print(
            f"{setting:8s} {statistics.median(idle):8.1f} {statistics.median(busy):8.1f} "
            f"{statistics.median(ratios):10.2f}"
        )
    app = [a / b for a, b in zip(times["app", "busy"], times["active", "busy"])]
    print(f"\nbusy: app / active = {statistics.median(app):.2f} (median of rounds)")


if __name__ == "__main__":
    main()
