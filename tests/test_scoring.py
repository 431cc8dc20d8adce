"""The log-likelihood scorer (diffora_lab.scoring): lm-evaluation-harness's tokenization convention
and batched scores equal to one unpadded forward per choice, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import compose_config
from transformers import AutoTokenizer

from diffora_lab import backbones
from diffora_lab.scoring import (
    ChoiceItem,
    collate_rows,
    continuation_logprobs,
    encode_pair,
    encode_pairs,
    model_inputs,
    score_choices,
    score_row,
)


@pytest.fixture(scope="module")
def backbone_cfg(tmp_path_factory):
    return compose_config(["backbone=tiny_llama"], tmp_path_factory.mktemp("tok")).backbone


@pytest.fixture(scope="module")
def tokenizer_dir(backbone_cfg) -> str:
    return backbones.tokenizer_source(backbone_cfg)


@pytest.fixture(scope="module")
def tokenizer(backbone_cfg):
    # As training and scoring load it: one without a pad token (some transformers versions
    # convert the GGUF tokenizer without one) pads with EOS.
    return backbones.load_tokenizer(backbone_cfg)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_encode_pair_splits_the_whole_encoding_at_the_context(tokenizer):
    context, continuation = "Question: is the sky blue?  ", "yes"
    ctx, cont = encode_pair(tokenizer, context, continuation)
    # Trailing whitespace moves to the continuation; the pieces concatenate to the whole text.
    assert ctx == tokenizer.encode("Question: is the sky blue?")
    assert ctx + cont == tokenizer.encode(context + continuation)
    assert tokenizer.decode(cont) == "  yes"


def test_encode_pair_gives_a_straddling_token_to_the_continuation(tokenizer):
    # "Answer:" + "positive" merges differently than " positive" after it: the split is taken
    # from the whole encoding, so the continuation is what the model reads after the context.
    ctx, cont = encode_pair(tokenizer, "Answer:", "positive")
    assert ctx + cont == tokenizer.encode("Answer:positive")
    assert encode_pair(tokenizer, "Answer:", " positive")[1] != cont


def test_encode_pair_bos_conventions(tokenizer_dir):
    with_bos = AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    bos = with_bos.bos_token_id
    ctx, cont = encode_pair(with_bos, "Is it?", " yes")
    assert ctx[0] == bos and bos not in cont and ctx[1:] == with_bos.encode("Is it?")[1:]
    # A text that already starts with BOS is encoded without another one.
    ctx2, _ = encode_pair(with_bos, with_bos.bos_token + "Is it?", " yes")
    assert ctx2 == ctx
    # An empty context becomes the prefix token (BOS).
    assert encode_pair(with_bos, "", "yes") == (
        [bos],
        with_bos.encode("yes", add_special_tokens=False),
    )


def test_batched_encoding_equals_one_pair_at_a_time(tokenizer_dir):
    with_bos = AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs = [
        ("Question: is it?  ", "yes"),
        ("Answer:", "positive"),
        ("Answer:", " positive"),
        ("", "alone"),
        (plain.bos_token + "Is it?", " no"),
        ("### Response:\n", "the correct answer is answer2"),
    ]
    for tok in (plain, with_bos):
        assert encode_pairs(tok, pairs) == [encode_pair(tok, c, x) for c, x in pairs]


def test_score_row_truncates_from_the_left():
    inputs, targets = score_row([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert inputs == [3, 4, 5, 6] and targets == [6, 7]
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        score_row([1, 2], [], max_length=4)


def _reference(model, tokenizer, item: ChoiceItem) -> list[tuple[float, bool]]:
    """One unpadded forward per choice, as lm-evaluation-harness computes a row."""
    out = []
    for continuation in item.continuations():
        ctx, cont = encode_pair(tokenizer, item.context, continuation)
        logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont) :]
        logprobs = logits.log_softmax(-1)
        target = torch.tensor(cont)
        loglik = float(logprobs.gather(-1, target[:, None]).sum())
        out.append((loglik, bool((logprobs.argmax(-1) == target).all())))
    return out


def test_score_choices_equals_one_forward_per_choice(model, tokenizer):
    items = [
        ChoiceItem(
            "The film was great.\nQuestion: positive or negative?\nAnswer:",
            ("negative", "positive"),
            1,
        ),
        ChoiceItem("Q: what color is the sky?\nA:", ("blue", "green and yellow", "a deep red")),
        ChoiceItem("Short", ("a", "bb")),
    ]
    with torch.no_grad():
        expected = [_reference(model, tokenizer, item) for item in items]
    for batch_size in (1, 3, 16):
        got = score_choices(model, tokenizer, items, batch_size=batch_size)
        for row, ref in zip(got, expected, strict=True):
            assert [g for _, g in row] == [g for _, g in ref]
            assert [ll for ll, _ in row] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_greedy_flag_and_the_batched_logprobs(model, tokenizer):
    # A continuation made of the model's own greedy tokens is flagged greedy.
    ids = tokenizer.encode("Hello there")
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    batch = collate_rows([(ids, [nxt]), (ids[1:], [nxt])], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    loglik, greedy = continuation_logprobs(logits, batch)
    assert bool(greedy[0]) and loglik.shape == (2,) and bool((loglik < 0).all())


def test_choices_with_the_same_input_run_once(tokenizer):
    # One-token answers: every choice's input is the context, so the batch holds it once.
    rows = [score_row(*encode_pair(tokenizer, "Answer:", f" {w}"), 64) for w in ("no", "yes")]
    batch = collate_rows(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 1 and batch["row_input"].tolist() == [0, 0]
