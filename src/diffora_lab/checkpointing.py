"""Small checkpoints: what training changes, plus a fingerprint of the frozen backbone.

A run's frozen backbone is reloaded from its source (package, hub, folder or config) every time
the run starts, so a checkpoint need not carry it: it keeps the trainable tensors (adapters, head,
the biases of BitFit, everything for full fine-tuning), the DAM's logits and the adapters' own
frozen tensors (AdaLoRA's ``ranknum``), and records a fingerprint of the frozen backbone weights
it left out. Resuming checks that fingerprint against the backbone just loaded, refuses a
different one, and fills the left-out tensors back in from it, so the state dict still loads
strictly (a trainable tensor missing from a checkpoint is an error, not a silent re-init).

Our own entry in a Lightning checkpoint (``STATE_KEY``) carries a format number; :func:`our_state`
is the one check of it, used before anything loads (``resume.check_checkpoint``) and again when
Lightning hands the checkpoint to the module (``TrainingModule.on_load_checkpoint``, for code that
calls ``trainer.fit(ckpt_path=...)`` directly).

Every checkpoint, snapshot and cache entry is read by :func:`read_checkpoint`, with
``torch.load(weights_only=True)``: a file is data, never code. What we store is tensors and plain
values (the RNG states too, ``rng.py``), so nothing needs an allow-list.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

# Tensors whose names contain these are created by the adapter or the DAM, not loaded from the
# backbone's source, so they are always saved even when frozen.
OWN_TENSORS = ("lora_", "ranknum", "dam.")
# peft's wrapping renames backbone tensors; the fingerprint uses the backbone's own names, so
# the same backbone has the same fingerprint in every phase (adapters dropped or not).
_WRAPPERS = ((".base_layer.", "."), (".original_module.", "."))
_PREFIXES = ("model.base_model.model.", "model.")


STATE_KEY = "diffora_lab"  # our entry in a Lightning checkpoint
STATE_FORMAT = 2  # 2: the method's state under "method"; checked on resume; in the search-cache key


def our_state(checkpoint: object, source: str) -> dict:
    """The diffora_lab entry of a loaded checkpoint, refused unless this version wrote it.

    Args:
        checkpoint: What ``torch.load`` returned.
        source: Names the checkpoint in the error (the setting and the path).

    Raises:
        ValueError: No diffora_lab entry, or one of another format.
    """
    state = checkpoint.get(STATE_KEY) if isinstance(checkpoint, dict) else None
    written = None if not isinstance(state, dict) else state.get("format", 2)  # 2: no field yet
    if written != STATE_FORMAT or "step" not in state:
        made = "no diffora_lab state" if written is None else f"checkpoint format {written}"
        raise ValueError(
            f"{source} was not written by this version of diffora_lab ({made}; this version "
            f"reads format {STATE_FORMAT}). Resume it with the version that wrote it, or delete "
            "it (or pass ckpt_path=null) to start this run over."
        )
    return state


class UnsafeFile(ValueError):
    """A file that is not a checkpoint this version can read safely (nothing in it was run)."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values only.

    Args:
        path: The checkpoint file.
        mmap: Map the tensors instead of reading them (only the small entries are looked at).

    Raises:
        UnsafeFile: The file asks for Python objects beyond tensors and plain values (a crafted
            pickle: refused before anything in it runs), or it is another kind of file (JSON, a
            plain pickle). The message names the file.
        Exception: Whatever ``torch.load`` raises for a damaged (empty, truncated) checkpoint.
    """
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(64)
    if len(head) >= len(_ZIP_MAGIC) and not head.startswith(_ZIP_MAGIC):
        if head.lstrip()[:1] in (b"{", b"["):
            raise UnsafeFile(
                f"{path} is a JSON file, not a checkpoint (a run's dam/mask.json is read by "
                "dam.mask_path)"
            )
        raise UnsafeFile(
            f"{path} is not a checkpoint this version of diffora_lab can read safely (not in "
            "torch.save's format; nothing in it was run)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it asks for {found.group(1)}" if found else "it holds unsupported pickle content"
        raise UnsafeFile(
            f"{path} is not a checkpoint this version of diffora_lab can read safely ({what}; "
            "only tensors and plain values are read, nothing in it was run)"
        ) from None


class BackboneMismatch(ValueError):
    """A checkpoint was made with other frozen backbone weights than the ones loaded now."""


def backbone_name(key: str) -> str:
    """A state-dict key as the plain backbone names it (peft's wrappers and prefixes removed)."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    for wrapped, plain in _WRAPPERS:
        key = key.replace(wrapped, plain)
    return key


def frozen_backbone_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` that hold frozen backbone tensors (left out of checkpoints)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return [
        key
        for key in module.state_dict(keep_vars=True)
        if key not in trainable and not any(mark in key for mark in OWN_TENSORS)
    ]


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names (backbone naming), dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted((backbone_name(k), t) for k, t in tensors):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BackboneFingerprint:
    """Computes the fingerprint of a module's frozen backbone once per set of frozen keys.

    Frozen weights do not change, so hashing them (about 1 s per GB) happens once per phase, not
    at every checkpoint.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], str] = {}

    def __call__(self, module: nn.Module, keys: list[str]) -> str:
        names = tuple(keys)
        if names not in self._cache:
            state = module.state_dict()
            self._cache[names] = fingerprint((k, state[k]) for k in names)
        return self._cache[names]


def strip_backbone(checkpoint: dict, module: nn.Module, digest: BackboneFingerprint) -> dict:
    """Drops the frozen backbone from ``checkpoint['state_dict']`` and records its fingerprint.

    Returns:
        The record stored in the checkpoint: ``fingerprint``, ``tensors`` (how many were left
        out) and ``params`` (their element count).
    """
    keys = [k for k in frozen_backbone_keys(module) if k in checkpoint["state_dict"]]
    state = checkpoint["state_dict"]
    record = {
        "fingerprint": digest(module, keys),
        "tensors": len(keys),
        "params": int(sum(state[k].numel() for k in keys)),
    }
    for key in keys:
        del state[key]
    return record


def fill(
    state: dict[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    record: dict | None,
    source: str = "checkpoint",
) -> None:
    """Puts the left-out backbone tensors back into ``state``, after checking the fingerprint.

    Only ``keys`` missing from ``state`` are filled: anything else missing stays missing, and
    strict loading reports it.

    Args:
        state: A pruned state dict (changed in place).
        current: The state dict of the model just built (its backbone freshly loaded), in the
            checkpoint's structure.
        keys: The keys of ``current`` that may have been left out (its frozen backbone).
        record: What :func:`strip_backbone` stored; ``None`` for a complete (old-style) checkpoint.
        source: Named in the error.

    Raises:
        BackboneMismatch: If the loaded backbone's frozen weights are not the ones the
            checkpoint was made with.
    """
    if record is None:
        return
    missing = [key for key in keys if key not in state]
    mine = fingerprint((key, current[key]) for key in missing)
    if mine != record["fingerprint"]:
        raise BackboneMismatch(
            f"{source} was made with another backbone: the frozen weights loaded now "
            f"({len(missing)} tensors, fingerprint {mine[:12]}) are not the ones it was saved "
            f"with ({record['tensors']} tensors, fingerprint {record['fingerprint'][:12]}). "
            "Resume with the same backbone (backbone.name / backbone.path as in the run's "
            ".hydra/config.yaml), or start a new run."
        )
    for key in missing:
        state[key] = current[key]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, then renames it: a kill never truncates one.

    Reads with ``weights_only=True`` whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    asks: a checkpoint is data, never code (``checkpointing.read_checkpoint``).
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as error:  # torch's zip writer hides the errno: a full disk, mostly
            tmp.unlink(missing_ok=True)
            failed = f"writing the checkpoint failed ({error})"
            raise OSError(errno.EIO, failed, str(path)) from None
        os.replace(tmp, path)
