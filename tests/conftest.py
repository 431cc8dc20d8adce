"""Shared fixtures: offline settings, config composition, tiny real models."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE_TESTS", "offline")
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from diffora_lab.runtime import config_dir, quiet_libraries  # noqa: E402

quiet_libraries()


def _parse_each_yaml_text_once() -> None:
    """Hydra parses its and our ~30 YAML files again on every compose (a few hundred composes
    in the suite: 15 % of the fast tier's time). In the test processes ``OmegaConf.load`` parses
    each distinct text once and builds the config from a copy of that parse: the same objects,
    the same config, the same errors (a text that fails to parse is parsed again each time).
    """
    import copy
    import io

    import yaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_yaml_loader

    original, parsed = OmegaConf.load, {}

    def load(file_):
        if isinstance(file_, (str, Path)):
            return original(file_)  # by name: as it was (the suite loads open files)
        text = file_.read()
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        if text not in parsed:
            stream = io.StringIO(text)
            stream.name = getattr(file_, "name", "<file>")  # yaml's error marks name it
            parsed[text] = yaml.load(stream, Loader=get_yaml_loader())
        obj = copy.deepcopy(parsed[text])
        if obj is not None and not isinstance(obj, (list, dict, str)):
            raise OSError(f"Invalid loaded object type: {type(obj).__name__}")
        return OmegaConf.create() if obj is None else OmegaConf.create(obj)

    OmegaConf.load = staticmethod(load)


_parse_each_yaml_text_once()

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"


_HYDRA = {"ours": None}  # the Hydra instance compose_config initialized last


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Composes the app's config as the CLI would (no Hydra run dir involved).

    Hydra is initialized on the app's config folder once and reused while nothing else has
    replaced it (initializing costs more than composing); anything else re-initializes it.
    """
    hydra = GlobalHydra.instance()
    if not (hydra.is_initialized() and hydra.hydra is _HYDRA["ours"]):
        hydra.clear()
        initialize_config_dir(config_dir=config_dir(), version_base="1.3")
        _HYDRA["ours"] = hydra.hydra
    cfg = compose(config_name="config", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.data.cache_dir = str(output_dir / "cache")
    return cfg


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: several times faster for tiny models on shared 2-core machines, and
    reference and resumed runs stay numerically comparable (the shared reference run included)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Process-wide tables a test may add to (a test search variant, method, task or backbone).
REGISTRIES = (
    ("diffora_lab.architect", "_ARCHITECTS"),
    ("diffora_lab.methods.registry", "_REGISTRY"),
    ("diffora_lab.tasks.spec", "TASKS"),
    ("diffora_lab.backbones", "_CONFIG_BUILDERS"),
)
COMPILE_CONFIGS = ("torch._dynamo.config", "torch._inductor.config")


def _registries() -> list[dict]:
    tables = []
    for module, name in REGISTRIES:
        try:
            table = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # renamed or moved: nothing to guard there
            continue
        if isinstance(table, dict):
            tables.append(table)
    return tables


@contextlib.contextmanager
def process_state_restored(compile_state: bool = True):
    """Puts back process-wide state that tests and the code they run change (see below).

    ``compile_state``: also the torch.compile configs and dynamo's caches (tens of milliseconds:
    once per module, not per test).
    """
    import torch

    environ, cwd = dict(os.environ), os.getcwd()
    torch_state = (
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
    )
    configs = {
        name: sys.modules[name].get_config_copy()
        for name in (COMPILE_CONFIGS if compile_state else ())
        if name in sys.modules
    }
    loggers = logging.root.manager.loggerDict
    levels = {
        name: logger.level for name, logger in loggers.items() if isinstance(logger, logging.Logger)
    }
    root_level = logging.root.level
    tables = [(table, dict(table)) for table in _registries()]
    modules = tuple(sys.modules)  # a set only when needed below (cheaper per test)
    try:
        yield
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        os.chdir(cwd)
        threads, grad, dtype, deterministic = torch_state
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic)
        with warnings.catch_warnings():  # reading deprecated keys warns
            warnings.simplefilter("ignore")
            for name, saved in configs.items():
                config = sys.modules[name]
                for key, value in saved.items():
                    try:
                        changed = bool(getattr(config, key) != value)
                    except Exception:  # deleted (unittest.mock.patch deletes), not comparable
                        changed = True
                    if changed:
                        setattr(config, key, value)
        if compile_state and "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        for name, level in levels.items():
            logger = loggers.get(name)
            if isinstance(logger, logging.Logger) and logger.level != level:
                logger.setLevel(level)
        if logging.root.level != root_level:
            logging.root.setLevel(root_level)
        # An entry added meanwhile stays only if a module imported meanwhile (a lazily loaded
        # part of the package) registered it.
        for table, saved in tables:
            added = [key for key in table if key not in saved]
            if added:
                imported = set(sys.modules) - set(modules)
                for key in added:
                    if getattr(table[key], "__module__", None) not in imported:
                        del table[key]
            if any(table.get(key) is not value for key, value in saved.items()):
                table.update(saved)


@pytest.fixture(autouse=True, scope="module")
def isolated_module_state():
    """What a module's shared fixtures change (a reference run) ends with the module."""
    with process_state_restored():
        yield


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Every test starts from the same RNG state and leaves the process as it found it.

    Tests patch process-wide state, and so does the code they run (Lightning writes
    ``PL_GLOBAL_SEED``, ``train.compile`` raises dynamo's recompile limit and leaves compiled
    code behind). Put back after each test: environment variables, the working directory,
    torch's thread count, grad mode, default dtype and deterministic flag, log levels, and
    entries a test added to the registries in ``REGISTRIES``; after each module also the
    torch.compile configs (dynamo, inductor) and dynamo's caches (a test that patches them uses
    ``config.patch()``, which restores them itself). The RNGs (random, numpy, torch) are seeded
    before each test, so no outcome depends on which tests ran first. Warnings filters need
    nothing here: pytest restores them around every test.
    """
    import numpy as np
    import torch

    with process_state_restored(compile_state=False):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        yield


def run_cli(args: list[str], cwd: Path, timeout: int = 900, env_extra: dict | None = None):
    """``python -m diffora_lab ARGS`` in a subprocess, offline, output captured.

    ``timeout`` guards against a hang; it is no speed limit (a loaded machine is slow).
    """
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "diffora_lab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(
    args: list[str],
    cwd: Path,
    env_extra: dict | None = None,
    module: str = "diffora_lab",
):
    """``python -m MODULE ARGS`` run in this process: the module's ``__main__`` code, as ``-m``
    runs it, with ``sys.argv``, the working directory and the environment set, its output
    captured and its exit status taken from ``SystemExit`` (0 when it returns).

    For tests of what a command does (its exit code, messages, folders, Hydra's multirun); 10 s
    cheaper than :func:`run_cli` (no new interpreter importing torch, transformers, peft and
    lightning). Tests whose subject is the process itself (signals, DDP's spawned ranks, a
    launcher's jobs, the entry point's thread settings, the installed wheel) use :func:`run_cli`.
    Returns a ``subprocess.CompletedProcess`` like :func:`run_cli`.
    """
    import io
    import runpy
    import signal
    import subprocess
    import traceback

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.root, *logging.root.manager.loggerDict.values()]
    handlers = [(lg, list(lg.handlers), lg.disabled) for lg in loggers if hasattr(lg, "handlers")]
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = list(sys.argv)
    GlobalHydra.instance().clear()
    code = 0
    with process_state_restored(compile_state=False):
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [module, *map(str, args)]
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    with warnings.catch_warnings():  # `-m` of a module its package imported
                        warnings.filterwarnings("ignore", ".*found in sys.modules", RuntimeWarning)
                        runpy.run_module(module, run_name="__main__", alter_sys=True)
                except SystemExit as stop:
                    code = 0 if stop.code is None else stop.code
                    if not isinstance(code, int):  # sys.exit("message"): printed, status 1
                        print(code, file=sys.stderr)
                        code = 1
                except Exception:  # what the interpreter would print, and its exit status
                    traceback.print_exc()
                    code = 1
        finally:
            sys.argv = argv
            GlobalHydra.instance().clear()
            for lg, kept, disabled in handlers:
                for handler in [h for h in lg.handlers if h not in kept]:
                    lg.removeHandler(handler)
                    handler.close()
                lg.handlers[:] = kept
                lg.disabled = disabled
            for number, handler in signals.items():
                signal.signal(number, handler)
    return subprocess.CompletedProcess(
        [sys.executable, "-m", module, *args], code, out.getvalue(), err.getvalue()
    )


@pytest.fixture
def smoke_cfg(tmp_path):
    """A function returning the smoke experiment config with extra overrides."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(["+experiment=smoke", *overrides], tmp_path)

    return make


def load_bench(name: str):
    """bench/NAME.py as the module ``NAME`` (bench/ is scripts, not a package on the path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class _Finished:
    """What bench/gpu_study.py's driver polls: a job that has already ended."""

    returncode: int

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode


def run_study_jobs_here(monkeypatch) -> None:
    """bench/gpu_study.py's driver (budget_curve's too) runs each job's ``python -m diffora_lab
    OVERRIDES`` in this process (:func:`run_main`), to the end, when it would start it: the same
    runs, folders and logs, without a new interpreter per job. tests/test_gpu_study.py runs the
    driver with its processes."""
    import time

    study = sys.modules["gpu_study"]

    def start(job, threads: int) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        job.log = job.folder / "study.log"
        job.started = time.time()
        done = run_main(job.overrides, REPO)
        job.log.write_text(done.stdout + done.stderr)
        job.process = _Finished(done.returncode)

    monkeypatch.setattr(study, "start", start)


@dataclass(frozen=True)
class FinishedRun:
    """A finished run folder and what ``train.run`` returned for it."""

    out: Path
    results: dict


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> FinishedRun:
    """The smoke experiment as it is (``+experiment=smoke``, nothing else), run once per session.

    Read-only: many tests compare with it (artifacts, resumes, histories). A test that writes
    into the folder (resumes in it, deletes from it) takes :func:`reference_copy` instead.
    """
    from diffora_lab.train import run

    out = tmp_path_factory.mktemp("reference")
    with process_state_restored():
        results = run(compose_config(["+experiment=smoke"], out), out)
    return FinishedRun(out, results)


@pytest.fixture
def reference_copy(reference_run, tmp_path) -> FinishedRun:
    """A private copy of :func:`reference_run`'s folder (caches included), free to change."""
    import shutil

    out = tmp_path / "reference"
    shutil.copytree(reference_run.out, out)
    return FinishedRun(out, dict(reference_run.results))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Tests that share a fixture of their module's (a module-scoped run) go to one test process
    under pytest-xdist (``--dist loadgroup``, scripts/test.sh), so the run is made once; those
    groups, the longest units of work, are handed out first, then the other slow tests, so the
    processes finish together.
    (No test depends on the order: ``-p randomly`` shuffles it.)"""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        module = item.module.__name__ if getattr(item, "module", None) else None
        for name in item.fixturenames:
            defs = info.name2fixturedefs.get(name)
            fixture = defs[-1] if defs else None
            if fixture and fixture.scope == "module" and fixture.func.__module__ == module:
                item.add_marker(pytest.mark.xdist_group(f"{module}.{name}"))
                break
    # Stable: groups, then the other slow tests, then the rest (the short ones fill the end).
    items.sort(
        key=lambda item: (
            item.get_closest_marker("xdist_group") is None,
            item.get_closest_marker("slow") is None,
        )
    )
