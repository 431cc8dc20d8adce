"""The speed-up settings: numerics unchanged when off, the deferred non-finite check, compile.

* With every speed-up off, the pipeline's loss sequence equals that of an independent eager loop
  written here the way the training step always worked (random batches padded to their longest
  example, AdamW's default kernel, clipping, the lr schedule), bit for bit.
* The non-finite check reads the device only every ``train.finite_check_every`` steps, yet a run
  whose weights become NaN still stops naming the step and phase, and never writes a checkpoint
  with non-finite weights.
* ``train.compile`` (regional) gives eager's losses within float tolerance and leaves state dict
  keys unchanged: compiled and eager checkpoints load into each other.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch._inductor.config  # noqa: F401  (patched in the compile test)
import torch.nn.functional as F
from conftest import compose_config

from diffora_lab.module import STATE_KEY, TrainingModule
from diffora_lab.speed import compile_layers, layer_modules
from diffora_lab.train import ConfigError, assemble, prepare, run

LORA = ["+experiment=smoke", "method=lora", "logger=csv", "train.log_every=1", "train.max_steps=12"]
OFF = ["data.bucketing=0", "train.compile=false", "train.optimizer=default"]


def logged_losses(out: Path) -> list[float]:
    with open(out / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    return [float(row["train/loss"]) for row in sorted(rows, key=lambda r: int(r["step"]))]


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name


def eager_losses(cfg, steps: int) -> list[float]:
    """The training loop as it was written before the speed-ups, on the run's model and data."""
    prepared = prepare(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = assemble(cfg, prepared)  # same weights and tokenized rows as the run
    model, train, optim = parts.module.model, parts.datamodule.train, parts.module.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": 0.01},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    batch_size, seed, pad = (
        int(cfg.train.batch_size),
        int(cfg.seed),
        prepared.tokenizer.pad_token_id,
    )
    per_epoch = len(train) // batch_size
    model.train()
    losses = []
    for step in range(steps):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
        rows = [train[i] for i in order[b * batch_size : (b + 1) * batch_size].tolist()]
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            key: torch.tensor(
                [r[key] + [pad if key == "input_ids" else 0] * (width - len(r[key])) for r in rows]
            )
            for key in ("input_ids", "token_type_ids")
            if key in rows[0]
        }
        batch["attention_mask"] = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        )
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
        loss = model(**batch).loss
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step)
        torch.nn.utils.clip_grad_norm_(params, float(cfg.train.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_speedups_off_reproduce_the_eager_loop_bit_for_bit(tmp_path):
    # finite_check_every=5: the deferred check is on (it never changes what is computed).
    out = tmp_path / "run"
    cfg = compose_config([*LORA, *OFF, "train.finite_check_every=5"], out)
    run(cfg, out)
    expected = eager_losses(compose_config([*LORA, *OFF], tmp_path / "eager"), 12)
    assert logged_losses(out) == expected


@pytest.mark.slow
def test_nan_weights_stop_the_run_and_no_checkpoint_holds_them(tmp_path, monkeypatch):
    poison_at = 5
    original = TrainingModule._after_weight_step

    def poisoned(self):  # a divergence at a known step: one adapter weight becomes NaN
        original(self)
        if self.step == poison_at:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_B" in n).fill_(
                    float("nan")
                )

    monkeypatch.setattr(TrainingModule, "_after_weight_step", poisoned)
    out = tmp_path / "run"
    cfg = compose_config(
        ["+experiment=smoke", "train.ckpt_every=2", "train.finite_check_every=9"], out
    )
    with pytest.raises(FloatingPointError) as error:
        run(cfg, out)
    message = str(error.value)
    # The first NaN loss is the architecture step right after the poisoned weight update (same
    # step); the check runs at the next checkpoint (step 6), which is therefore not written.
    assert f"non-finite architecture loss at step {poison_at} in phase 'search'" in message
    assert "steps 4-6" in message
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[STATE_KEY]["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_bad_speedup_settings_fail_before_loading(tmp_path):
    for override, setting in (
        ("data.bucketing=-8", "data.bucketing"),
        ("train.optimizer=adam8bit", "train.optimizer"),
        ("train.finite_check_every=0", "train.finite_check_every"),
    ):
        with pytest.raises(ConfigError, match=setting):
            prepare(compose_config(["+experiment=smoke", override], tmp_path))


def _lora_model(cfg):
    """The run's model and data, seeded alike for every call."""
    prepared = prepare(cfg)
    pl.seed_everything(0, verbose=False)
    return assemble(cfg, prepared)


# Inductor generates and compiles C++ for every graph: minutes on a loaded 2-core machine, so it
# runs only when asked (DIFFORA_TEST_INDUCTOR=1); aot_eager traces and differentiates the same
# graphs through torch.compile without code generation.
INDUCTOR = pytest.mark.skipif(
    not os.environ.get("DIFFORA_TEST_INDUCTOR"), reason="set DIFFORA_TEST_INDUCTOR=1"
)


# The compiling tests share a test process (xdist): torch.compile's first use there costs seconds.
COMPILING = pytest.mark.xdist_group("torch_compile")


@COMPILING
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_layers_match_eager_and_share_checkpoints(tmp_path, backend):
    # Inductor's own RNG would draw other dropout masks; with fallback_random it uses eager's.
    # torch's own patch() restores the config on exit (conftest's guard also resets dynamo).
    with torch._inductor.config.patch(fallback_random=True):
        _compare_compiled_with_eager(tmp_path, backend)


def _compare_compiled_with_eager(tmp_path, backend):
    cfg = compose_config(["+experiment=smoke", "method=lora"], tmp_path)
    eager, compiled = _lora_model(cfg), _lora_model(cfg)
    layers = compile_layers(compiled.module.model, str(cfg.backbone.layer_pattern), backend)
    assert layers == len(layer_modules(eager.module.model, str(cfg.backbone.layer_pattern))) == 2
    assert list(eager.module.model.state_dict()) == list(compiled.module.model.state_dict())
    loader = eager.datamodule.train_dataloader()
    batches = [batch for batch, _ in zip(loader, range(3))]
    # One padded width for the three batches (padding is masked): one graph to trace. A second
    # width makes dynamo retrace with symbolic shapes, which took most of this test's time.
    width = max(batch["input_ids"].shape[1] for batch in batches)
    batches = [
        {k: v if v.ndim < 2 else F.pad(v, (0, width - v.shape[1])) for k, v in batch.items()}
        for batch in batches
    ]
    losses = {}
    for name, parts in (("eager", eager), ("compiled", compiled)):
        model = parts.module.model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
        torch.manual_seed(1)
        losses[name] = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    # The two models' weights after the same steps load into each other (strict).
    eager.module.model.load_state_dict(compiled.module.model.state_dict())
    compiled.module.model.load_state_dict(eager.module.model.state_dict())


@COMPILING
@pytest.mark.slow
def test_a_compiled_run_resumes_eagerly_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    # diffora: the gates enter compiled layers (scaling tensor, lora_A hooks), then discretize.
    common = ["+experiment=smoke", "train.max_steps=16", "dam.search_steps=8", "data.bucketing=16"]
    compiled = ["train.compile=true", "train.compile_backend=aot_eager", "train.stop_after=6"]
    stopped = run(compose_config([*common, *compiled], out), out)
    assert stopped["stopped_at"] == 6
    results = run(compose_config([*common, "train.compile=false"], out), out)
    assert results["steps"] == 16


# Two DDP ranks with bucketing, the deferred check and foreach AdamW: tests/test_scaleout.py.


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@COMPILING
@pytest.mark.slow
def test_a_second_compiled_run_in_a_process_compiles_as_if_alone():
    """All layers share one forward code object: without clearing dynamo's caches, a second
    run's layers (a sweep's next job, in-process) stack their code on the first run's, guarded
    against its shapes, and other shapes make dynamo retrace them for dynamic shapes."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    first = _Net()
    compile_layers(first, r"layers\.(\d+)$", "aot_eager")
    first(torch.randn(2, 3, 4))
    alone = len(_debug_get_cache_entry_list(_Block.forward))
    second = _Net()
    compile_layers(second, r"layers\.(\d+)$", "aot_eager")
    second(torch.randn(2, 5, 4))  # another width, as another job's batches have
    assert len(_debug_get_cache_entry_list(_Block.forward)) == alone
