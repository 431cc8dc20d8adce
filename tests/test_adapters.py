"""Tests for diffora_lab.adapters and candidate discovery, on the real tiny DeBERTa and peft.

The gated forward (``W x + gamma * s * B A x``), folding the gate into B at discretization, what
a dropped adapter leaves behind (nothing), and the exported peft adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from diffora_lab.adapters import (
    ADAPTER,
    LoraGates,
    apply_mask,
    attach_lora,
    base_of,
    count_parameters,
    lora_layer,
)
from diffora_lab.backbones import find_candidates, load_backbone, load_tokenizer, resolve_source
from diffora_lab.dam import top_k_mask
from diffora_lab.export import export_adapter

RANK = 4
ALPHA = 16.0
HEAD = ["classifier", "pooler"]


@pytest.fixture(scope="module")
def backbone_cfg():
    return compose_config(["+experiment=smoke"]).backbone


@pytest.fixture(scope="module")
def vocab_size(backbone_cfg) -> int:
    return len(load_tokenizer(backbone_cfg))


def candidates_of(model: nn.Module, backbone_cfg):
    return find_candidates(model, str(backbone_cfg.layer_pattern), dict(backbone_cfg.module_types))


@pytest.fixture
def lora(backbone_cfg, vocab_size):
    """A LoRA-wrapped tiny DeBERTa whose B matrices are non-zero (as after some training)."""
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    candidates = candidates_of(model, backbone_cfg)
    peft_model = attach_lora(model, candidates, RANK, ALPHA, 0.0, HEAD)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for cand in candidates:
            weight = lora_layer(peft_model, cand.name).lora_B[ADAPTER].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    peft_model.eval()
    return peft_model, candidates


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 20000, (6, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3:, 9:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([0, 1, 1, 0, 1, 0]),
    }


def random_gates(seed: int = 2) -> torch.Tensor:
    return 0.05 + 0.9 * torch.rand(2, 6, generator=torch.Generator().manual_seed(seed))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------- candidate discovery


def test_candidates_of_tiny_deberta(backbone_cfg, vocab_size):
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    candidates = candidates_of(model, backbone_cfg)
    types = list(backbone_cfg.module_types)
    assert [(c.layer, c.module_type) for c in candidates] == [
        (layer, t) for layer in range(2) for t in types
    ]
    by_type = {(c.layer, c.module_type): c for c in candidates}
    for layer in range(2):
        prefix = f"deberta.encoder.layer.{layer}."
        assert by_type[(layer, "o")].name == prefix + "attention.output.dense"
        assert by_type[(layer, "ffn_out")].name == prefix + "output.dense"
        assert (by_type[(layer, "ffn_in")].d_in, by_type[(layer, "ffn_in")].d_out) == (32, 64)
        assert (by_type[(layer, "ffn_out")].d_in, by_type[(layer, "ffn_out")].d_out) == (64, 32)
    for cand in candidates:
        assert type(model.get_submodule(cand.name)) is nn.Linear
        assert cand.lora_params(RANK) == RANK * (cand.d_in + cand.d_out)


def test_output_dense_does_not_match_attention_output_dense(backbone_cfg, vocab_size):
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    found = find_candidates(model, str(backbone_cfg.layer_pattern), {"ffn_out": "output.dense"})
    assert [c.name for c in found] == [
        "deberta.encoder.layer.0.output.dense",
        "deberta.encoder.layer.1.output.dense",
    ]


def test_minilm_candidate_names_on_a_weightless_copy():
    import transformers

    cfg = compose_config(["backbone=minilm_l6"]).backbone
    config = transformers.AutoConfig.from_pretrained(resolve_source(cfg), num_labels=2)
    with torch.device("meta"):
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    candidates = candidates_of(model, cfg)
    assert len(candidates) == 6 * 6
    names = {(c.layer, c.module_type): c.name for c in candidates}
    assert names[(5, "ffn_out")] == "bert.encoder.layer.5.output.dense"
    assert names[(5, "o")] == "bert.encoder.layer.5.attention.output.dense"
    assert names[(0, "q")] == "bert.encoder.layer.0.attention.self.query"


def test_random_deberta_v3_base_has_the_v3_base_shape():
    """The GPU throughput backbone is DeBERTa-v3-base's architecture: 12 x 6 candidates of
    768/3072 features and 184M parameters with v3's 128,100-token vocabulary."""
    cfg = compose_config(["backbone=deberta_v3_base_random"]).backbone
    with torch.device("meta"):
        model = load_backbone(cfg, 2, vocab_size=128100)
    candidates = candidates_of(model, cfg)
    assert len(candidates) == 12 * 6
    shapes = {c.module_type: (c.d_in, c.d_out) for c in candidates}
    assert shapes == {
        "q": (768, 768),
        "k": (768, 768),
        "v": (768, 768),
        "o": (768, 768),
        "ffn_in": (768, 3072),
        "ffn_out": (3072, 768),
    }
    n_params = sum(p.numel() for p in model.parameters())
    assert 184.0e6 < n_params < 184.9e6, n_params


def test_pattern_matching_nothing_names_the_setting(backbone_cfg, vocab_size):
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    pattern = str(backbone_cfg.layer_pattern)
    with pytest.raises(ValueError, match=r"backbone\.module_types\.up"):
        find_candidates(model, pattern, {"q": "attention.self.query_proj", "up": "mlp.up_proj"})
    with pytest.raises(ValueError, match=r"backbone\.layer_pattern"):
        find_candidates(model, r"bert\.encoder\.layer\.(\d+)\.", {"q": "attention.self.query"})
    with pytest.raises(ValueError, match=r"backbone\.module_types"):
        find_candidates(model, pattern, {})


# ---------------------------------------------------------------------------------- attaching


def test_attach_lora_freezes_backbone_and_keeps_head_trainable(backbone_cfg, vocab_size):
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    candidates = candidates_of(model, backbone_cfg)
    peft_model = attach_lora(model, candidates, RANK, ALPHA, 0.0, HEAD)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert len(lora_names) == 2 * len(candidates)
    assert all(".modules_to_save." in n for n in trainable - lora_names)
    assert {n.split(".")[2] for n in trainable - lora_names} == set(HEAD)
    # Standard LoRA init: B = 0, so the adapters start as a no-op.
    for cand in candidates:
        layer = lora_layer(peft_model, cand.name)
        assert not layer.lora_B[ADAPTER].weight.any()
        assert layer.scaling[ADAPTER] == pytest.approx(ALPHA / RANK)
    counts = count_parameters(peft_model)
    assert counts["adapter"] == sum(c.lora_params(RANK) for c in candidates)
    assert counts["backbone"] == 0
    assert counts["total"] == counts["adapter"] + counts["head"]


@pytest.mark.parametrize("rank", [0, -3])
def test_attach_lora_rejects_rank_below_one(backbone_cfg, vocab_size, rank):
    model = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    with pytest.raises(ValueError, match="rank"):
        attach_lora(model, candidates_of(model, backbone_cfg), rank, ALPHA, 0.0, HEAD)


# ------------------------------------------------------------------------------------- gating


@pytest.mark.parametrize("gate_grad", [False, True], ids=["in_scaling", "on_lora_A_output"])
def test_gated_module_computes_w_x_plus_gate_times_scaled_lora(lora, gate_grad):
    peft_model, candidates = lora
    gates = random_gates().requires_grad_(gate_grad)
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(gates)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    for index, cand in enumerate(candidates):
        layer = lora_layer(peft_model, cand.name)
        inputs = x[..., : cand.d_in]
        with torch.no_grad():
            got = layer(inputs)
            base = layer.get_base_layer()(inputs)
            branch = inputs @ layer.lora_A[ADAPTER].weight.T @ layer.lora_B[ADAPTER].weight.T
        expected = base + gates.detach().flatten()[index] * (ALPHA / RANK) * branch
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (branch.abs().max() * ALPHA / RANK) > 1e-2  # the branch matters
    gated_by.remove()
    # peft's own float scalings are back: a plain LoRA model again.
    for cand in candidates:
        scaling = lora_layer(peft_model, cand.name).scaling[ADAPTER]
        assert type(scaling) is float and scaling == pytest.approx(ALPHA / RANK)


def test_lora_gates_require_gates_before_forward(lora, batch):
    peft_model, candidates = lora
    gated_by = LoraGates(peft_model, candidates)
    with pytest.raises(RuntimeError, match="set"):
        logits(peft_model, batch)
    gated_by.remove()
    logits(peft_model, batch)  # removed gates leave a plain LoRA model


def test_gates_carry_the_architecture_gradient(lora, batch):
    peft_model, candidates = lora
    theta = torch.zeros(2, 6, requires_grad=True)
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(torch.sigmoid(theta))
    peft_model(**batch).loss.backward()
    gated_by.remove()
    assert theta.grad is not None and (theta.grad != 0).all()


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward in one forward (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(storages.values())


def test_gates_cost_little_memory(lora, batch):
    """Weight steps (detached gates) keep what plain LoRA keeps (plus the gate values);
    architecture steps add about one rank-r output per module, not the d_out-wide branch
    outputs."""
    peft_model, candidates = lora
    plain = saved_activation_bytes(peft_model, batch)
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(random_gates())
    weight_step = saved_activation_bytes(peft_model, batch)
    gated_by.set(random_gates().requires_grad_(True))
    arch_step = saved_activation_bytes(peft_model, batch)
    gated_by.remove()
    assert weight_step - plain <= len(candidates) * 4  # the scaled gates themselves
    tokens = batch["input_ids"].numel()
    # q and k also project DeBERTa's relative embeddings, hence the margin of 2.
    rank_r_outputs = 2 * len(candidates) * tokens * RANK * 4
    branch_outputs = sum(tokens * c.d_out * 4 for c in candidates)
    assert 0 < arch_step - plain <= rank_r_outputs < branch_outputs


# -------------------------------------------------------------------- folding and discretizing


def test_folding_keeps_outputs_when_all_modules_are_kept(lora, batch):
    peft_model, candidates = lora
    gates = random_gates()
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(gates)
    gated = logits(peft_model, batch)
    gated_by.set(torch.ones(2, 6))
    ungated = logits(peft_model, batch)
    gated_by.remove()
    # The gates change the function, so equality below is not a coincidence.
    assert (gated - ungated).abs().max() > 1e-3
    apply_mask(peft_model, candidates, [True] * len(candidates), gates)
    torch.testing.assert_close(logits(peft_model, batch), gated, atol=1e-5, rtol=0)


def test_without_folding_outputs_change(lora, batch):
    peft_model, candidates = lora
    gates = random_gates()
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(gates)
    gated = logits(peft_model, batch)
    gated_by.remove()
    apply_mask(peft_model, candidates, [True] * len(candidates), gates, fold_gates=False)
    assert (logits(peft_model, batch) - gated).abs().max() > 1e-3


def test_partial_mask_removes_exactly_the_dropped_contributions(lora, batch):
    peft_model, candidates = lora
    gates = random_gates()
    kept = top_k_mask(gates, 5)
    gated_by = LoraGates(peft_model, candidates)
    gated_by.set(gates)
    gated = logits(peft_model, batch)
    gated_by.set(gates * kept)  # the dropped modules' contribution switched off, nothing else
    without_dropped = logits(peft_model, batch)
    gated_by.remove()
    assert (gated - without_dropped).abs().max() > 1e-3
    apply_mask(peft_model, candidates, kept.flatten().tolist(), gates)
    torch.testing.assert_close(logits(peft_model, batch), without_dropped, atol=1e-5, rtol=0)


def test_dropped_adapters_leave_nothing_behind(lora, batch):
    peft_model, candidates = lora
    gates = random_gates()
    kept = top_k_mask(gates, 5).flatten().tolist()
    kept_names = {c.name for c, keep in zip(candidates, kept) if keep}
    old_layers = {c.name: lora_layer(peft_model, c.name) for c in candidates}
    fired: list[str] = []
    for name, layer in old_layers.items():
        for branch in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            branch.register_forward_hook(lambda *_, name=name: fired.append(name))
    apply_mask(peft_model, candidates, kept, gates)
    base = base_of(peft_model)

    for cand, keep in zip(candidates, kept):
        module = base.get_submodule(cand.name)
        if keep:
            assert isinstance(module, LoraLayer)
        else:
            assert type(module) is nn.Linear
            assert not hasattr(module, "lora_A") and not hasattr(module, "lora_B")
            assert module is old_layers[cand.name].get_base_layer()
            assert not module.weight.requires_grad
    assert set(peft_model.peft_config[ADAPTER].target_modules) == kept_names

    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_owners = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert lora_owners - {n for n in lora_owners if "modules_to_save" in n} == kept_names
    counts = count_parameters(peft_model)
    assert counts["adapter"] == sum(c.lora_params(RANK) for c, k in zip(candidates, kept) if k)

    # Only kept adapters compute; only kept adapters receive gradients.
    peft_model.train()
    peft_model(**batch).loss.backward()
    assert sorted(set(fired)) == sorted(kept_names)
    # A and B both run (DeBERTa also projects its relative embeddings with q and k).
    assert all(fired.count(name) >= 2 for name in kept_names)
    for name, layer in old_layers.items():
        for branch in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            if name in kept_names:
                assert branch.weight.grad is not None and branch.weight.grad.abs().sum() > 0
            else:
                assert branch.weight.grad is None
        assert layer.get_base_layer().weight.grad is None


def test_reinit_restarts_kept_adapters_from_lora_init(lora, batch):
    peft_model, candidates = lora
    kept = [True, False] * 6
    apply_mask(peft_model, candidates, kept, random_gates(), reinit=True)
    for cand, keep in zip(candidates, kept):
        if keep:
            assert not lora_layer(peft_model, cand.name).lora_B[ADAPTER].weight.any()


def test_apply_mask_rejects_a_mask_of_the_wrong_length(lora):
    peft_model, candidates = lora
    with pytest.raises(ValueError, match="12 candidates"):
        apply_mask(peft_model, candidates, [True] * 11)


# -------------------------------------------------------------------------------------- export


def test_exported_adapter_reloads_as_plain_peft_lora(
    lora, batch, backbone_cfg, vocab_size, tmp_path
):
    peft_model, candidates = lora
    gates = random_gates()
    kept = top_k_mask(gates, 4).flatten().tolist()
    kept_names = {c.name for c, keep in zip(candidates, kept) if keep}
    with torch.no_grad():  # a trained head, so the head's export is checked too
        for param in base_of(peft_model).classifier.modules_to_save[ADAPTER].parameters():
            param.add_(0.3)
    apply_mask(peft_model, candidates, kept, gates)
    expected = logits(peft_model, batch)

    folder = export_adapter(peft_model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == kept_names
    assert config["r"] == RANK
    assert (folder / "adapter_model.safetensors").is_file()

    fresh = load_backbone(backbone_cfg, 2, vocab_size=vocab_size)
    loaded = PeftModel.from_pretrained(fresh, str(folder))
    loaded.eval()
    wrapped = {
        c.name for c in candidates if isinstance(base_of(loaded).get_submodule(c.name), LoraLayer)
    }
    assert wrapped == kept_names
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
