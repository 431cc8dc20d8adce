"""Tests for diffora_lab.tasks: task specs, GLUE TSV reading, the synthetic task."""

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from diffora_lab.tasks import (
    TASKS,
    Examples,
    check_data_dir,
    generate_synthetic,
    get_task,
    load_hub,
    load_raw,
    read_glue_tsv,
)
from diffora_lab.tasks.synthetic import kinds_of

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def write_tsv(path: Path, rows: list[list[str]], *, trailing_newline: bool = True) -> Path:
    """Write tab-joined rows as UTF-8, exactly as given (no quoting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(row) for row in rows)
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


MNLI_DEV_HEADER = [
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2",
    "label1", "label2", "label3", "label4", "label5", "gold_label",
]  # fmt: skip
MNLI_TRAIN_HEADER = [*MNLI_DEV_HEADER[:11], "gold_label"]


def mnli_row(header: list[str], index: int, premise: str, hypothesis: str, gold: str) -> list[str]:
    values = {"index": str(index), "sentence1": premise, "sentence2": hypothesis}
    values["gold_label"] = gold
    return [values.get(column, f"({column} {index})") for column in header]


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    """A small GLUE folder holding fixture files for all eight tasks."""
    root = tmp_path / "glue"
    cola_rows = [
        ["gj04", "1", "", 'The sailors rode the breeze clear of the "rocks".'],
        ["gj04", "0", "*", "The more we study verbs, the crazier they get get."],
        ["clc95", "1", "", "Bill ate the peaches."],
    ]
    write_tsv(root / "CoLA" / "train.tsv", cola_rows)
    # The real CoLA dev file has no trailing newline.
    write_tsv(root / "CoLA" / "dev.tsv", cola_rows[:2], trailing_newline=False)

    sst_header = ["sentence", "label"]
    write_tsv(
        root / "SST-2" / "train.tsv",
        [sst_header, ["hide new secretions from the parental units ", "0"], ['a "gem" ', "1"]],
    )
    write_tsv(root / "SST-2" / "dev.tsv", [sst_header, ["it 's a charming journey . ", "1"]])

    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(
        root / "MRPC" / "train.tsv",
        [
            mrpc_header,
            ["1", "702876", "702977", "Amrozi accused his brother .", "Referring to him , ..."],
            ["0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought it ."],
        ],
    )
    write_tsv(root / "MRPC" / "dev.tsv", [mrpc_header, ["1", "1", "2", "He said.", "He told."]])

    stsb_header = [
        "index", "genre", "filename", "year", "old_index", "source1", "source2",
        "sentence1", "sentence2", "score",
    ]  # fmt: skip
    stsb_meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    write_tsv(
        root / "STS-B" / "train.tsv",
        [
            stsb_header,
            ["0", *stsb_meta, "A plane is taking off.", "An air plane is taking off.", "5.000"],
            ["1", *stsb_meta, "A man plays a flute.", "A man is eating.", "0.500"],
            ["2", *stsb_meta, "A cat sleeps.", "A kitten naps.", "3.8"],
        ],
    )
    write_tsv(
        root / "STS-B" / "dev.tsv",
        [stsb_header, ["0", *stsb_meta, "A man with a hat.", "A man wearing a hat.", "5.0"]],
    )

    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    qqp_rows = [qqp_header]
    for index in range(150):
        ids = [str(index), str(2 * index), str(2 * index + 1)]
        qqp_rows.append([*ids, f"q{index} a?", f"q{index} b?", str(index % 2)])
    # A malformed row as in the real QQP train file: the question broke over a line.
    qqp_rows.insert(40, ["999", "1998", "1999", "How do I", "learn?"])
    write_tsv(root / "QQP" / "train.tsv", qqp_rows)
    write_tsv(root / "QQP" / "dev.tsv", [qqp_header, ["0", "1", "2", "Why?", "Why not?", "1"]])

    qnli_header = ["index", "question", "sentence", "label"]
    write_tsv(
        root / "QNLI" / "train.tsv",
        [
            qnli_header,
            ["0", "When?", "In 1999.", "entailment"],
            ["1", "Who?", "Nobody knows where.", "not_entailment"],
        ],
    )
    write_tsv(root / "QNLI" / "dev.tsv", [qnli_header, ["0", "What?", "A cat.", "entailment"]])

    rte_header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(
        root / "RTE" / "train.tsv",
        [
            rte_header,
            ["0", "No weapons were found.", "Weapons were found.", "not_entailment"],
            ["1", "A dog barks.", "An animal makes noise.", "entailment"],
        ],
    )
    write_tsv(root / "RTE" / "dev.tsv", [rte_header, ["0", "It rains.", "Wet.", "entailment"]])

    write_tsv(
        root / "MNLI" / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_row(MNLI_TRAIN_HEADER, 0, "A man runs.", "A person moves.", "entailment"),
            mnli_row(MNLI_TRAIN_HEADER, 1, "A man runs.", "He is tall.", "neutral"),
            mnli_row(MNLI_TRAIN_HEADER, 2, "A man runs.", "He sleeps.", "contradiction"),
        ],
    )
    write_tsv(
        root / "MNLI" / "dev_matched.tsv",
        [
            MNLI_DEV_HEADER,
            mnli_row(MNLI_DEV_HEADER, 0, "Two kids play.", "Kids sleep.", "contradiction"),
            mnli_row(MNLI_DEV_HEADER, 1, "Two kids play.", "Kids play.", "entailment"),
        ],
    )
    write_tsv(
        root / "MNLI" / "dev_mismatched.tsv",
        [MNLI_DEV_HEADER, mnli_row(MNLI_DEV_HEADER, 0, "Rain fell.", "It was wet.", "neutral")],
    )
    return root


# ------------------------------------------------------------------------------------------
# Specs


def test_registry_holds_the_eight_glue_tasks_and_synthetic() -> None:
    glue = {"mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb", "synthetic"}
    commonsense = {"boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "arc_easy"}
    commonsense |= {"arc_challenge", "openbookqa", "commonsense_170k", "synthetic_choice"}
    assert set(TASKS) == glue | commonsense
    assert all(TASKS[name].kinds == ("choice",) for name in commonsense)
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.primary_metric in spec.metrics
    assert get_task("cola").primary_metric == "mcc"
    assert get_task("stsb").is_regression
    assert get_task("stsb").label_names is None
    assert not get_task("sst2").is_regression
    assert get_task("mnli").dev_splits == ("matched", "mismatched")
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("mnli").text_fields == ("premise", "hypothesis")
    assert get_task("SST-2") is TASKS["sst2"]
    assert set(get_task("mrpc").metrics) == {"accuracy", "f1"}


def test_unknown_task_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"task\.name='sst3'.*'cola'.*'sst2'"):
        get_task("sst3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"primary_metric": "f1"}, "primary_metric"),
        ({"metrics": ("pearson",)}, "does not apply to a classification"),
        ({"metrics": ("bleu",), "primary_metric": "bleu"}, "unknown metric 'bleu'"),
        ({"label_names": ("a",)}, "label_names"),
        ({"text_fields": ()}, "text_fields"),
        ({"dev_splits": ("train",)}, "'train' cannot be a dev split"),
    ],
)
def test_inconsistent_spec_is_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(TASKS["sst2"], **changes)


def test_examples_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="parallel"):
        Examples(text_a=["a", "b"], text_b=None, labels=[0])
    with pytest.raises(ValueError, match="text_b"):
        Examples(text_a=["a", "b"], text_b=["x"], labels=[0, 1])


# ------------------------------------------------------------------------------------------
# GLUE TSV formats


def test_cola_headerless_rows_parse(glue_root: Path) -> None:
    spec = get_task("cola")
    train = read_glue_tsv(spec, glue_root, "train")
    assert train.text_a[0] == 'The sailors rode the breeze clear of the "rocks".'
    assert train.text_b is None
    assert train.labels == [1, 0, 1]
    dev = read_glue_tsv(spec, glue_root, "validation")
    assert len(dev) == 2
    assert dev.labels == [1, 0]


def test_sst2_keeps_sentences_as_distributed(glue_root: Path) -> None:
    train = read_glue_tsv(get_task("sst2"), glue_root, "train")
    assert train.text_a == ["hide new secretions from the parental units ", 'a "gem" ']
    assert train.labels == [0, 1]


def test_mrpc_reads_quality_as_label(glue_root: Path) -> None:
    train = read_glue_tsv(get_task("mrpc"), glue_root, "train")
    assert train.labels == [1, 0]
    assert train.text_a[1] == "Yucaipa owned Dominick 's ."
    assert train.text_b == ["Referring to him , ...", "Yucaipa bought it ."]


def test_mrpc_header_with_byte_order_mark(tmp_path: Path) -> None:
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for name in ("train.tsv", "dev.tsv"):
        path = write_tsv(tmp_path / "MRPC" / name, [header, ["0", "1", "2", "A.", "B."]])
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    check_data_dir(get_task("mrpc"), tmp_path)
    assert read_glue_tsv(get_task("mrpc"), tmp_path, "train").labels == [0]


def test_stsb_scores_are_floats(glue_root: Path) -> None:
    spec = get_task("stsb")
    train = read_glue_tsv(spec, glue_root, "train")
    assert train.labels == pytest.approx([5.0, 0.5, 3.8])
    assert all(isinstance(score, float) for score in train.labels)
    assert train.text_a[0] == "A plane is taking off."
    assert train.text_b is not None
    assert train.text_b[1] == "A man is eating."


def test_qqp_malformed_row_is_skipped_with_a_warning(glue_root: Path) -> None:
    with pytest.warns(UserWarning, match=r"1 of 151 rows.*lines 41"):
        train = read_glue_tsv(get_task("qqp"), glue_root, "train")
    assert len(train) == 150
    assert "How do I" not in train.text_a
    assert train.labels[:4] == [0, 1, 0, 1]
    assert train.text_b is not None
    assert train.text_b[3] == "q3 b?"


def test_too_many_malformed_rows_is_an_error(tmp_path: Path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [header] + [["0", "1", "2", "a?", "b?", "1"]] * 50 + [["0", "1", "a?"]] * 2
    write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    with pytest.raises(ValueError, match=r"2 of 52 rows.*more than 1%"):
        read_glue_tsv(get_task("qqp"), tmp_path, "train")


def test_qnli_and_rte_map_entailment_labels(glue_root: Path) -> None:
    qnli = read_glue_tsv(get_task("qnli"), glue_root, "train")
    assert qnli.labels == [0, 1]
    assert qnli.text_a == ["When?", "Who?"]
    assert qnli.text_b == ["In 1999.", "Nobody knows where."]
    rte = read_glue_tsv(get_task("rte"), glue_root, "train")
    assert rte.labels == [1, 0]


def test_mnli_reads_columns_by_name_in_train_and_both_dev_files(glue_root: Path) -> None:
    spec = get_task("mnli")
    train = read_glue_tsv(spec, glue_root, "train")
    assert train.labels == [0, 1, 2]
    assert train.text_b == ["A person moves.", "He is tall.", "He sleeps."]
    matched = read_glue_tsv(spec, glue_root, "matched")
    assert matched.labels == [2, 0]
    assert matched.text_a == ["Two kids play.", "Two kids play."]
    mismatched = read_glue_tsv(spec, glue_root, "mismatched")
    assert mismatched.labels == [1]
    assert mismatched.text_b == ["It was wet."]
    with pytest.raises(ValueError, match=r"no split 'validation'.*'matched', 'mismatched'"):
        read_glue_tsv(spec, glue_root, "validation")


@pytest.mark.parametrize("name", ["mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb"])
def test_load_raw_from_data_dir_gives_every_split(glue_root: Path, name: str) -> None:
    spec = get_task(name)
    check_data_dir(spec, glue_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = load_raw(spec, str(glue_root))
    # Only the QQP fixture has a malformed row.
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == (1 if name == "qqp" else 0)
    assert all("field count" in message for message in messages)
    assert set(raw.dev) == set(spec.dev_splits)
    assert len(raw.train) >= 2
    assert all(len(split) >= 1 for split in raw.dev.values())
    assert (raw.train.text_b is None) == (len(spec.text_fields) == 1)


# ------------------------------------------------------------------------------------------
# Errors


def test_label_outside_label_set_names_file_line_value_and_allowed(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "label"]
    rows = [header, ["0", "a", "b", "entailment"], ["1", "c", "d", "neutral"]]
    write_tsv(tmp_path / "RTE" / "train.tsv", rows)
    with pytest.raises(ValueError, match=r"train\.tsv line 3: label 'neutral'.*'not_entailment'"):
        read_glue_tsv(get_task("rte"), tmp_path, "train")


def test_binary_label_outside_zero_one(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good ", "2"]])
    with pytest.raises(ValueError, match=r"line 2: label '2'.*\['0', '1'\]"):
        read_glue_tsv(get_task("sst2"), tmp_path, "train")


def test_stsb_score_that_is_not_a_number(tmp_path: Path) -> None:
    header = ["index", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [header, ["0", "a", "b", "high"]])
    with pytest.raises(ValueError, match=r"dev\.tsv line 2: label 'high'"):
        read_glue_tsv(get_task("stsb"), tmp_path, "validation")


def test_missing_columns_names_found_and_expected(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["text", "label"], ["good ", "1"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["good ", "1"]])
    pattern = r"missing columns \['sentence'\]; found columns \['text', 'label'\]"
    with pytest.raises(ValueError, match=pattern):
        read_glue_tsv(get_task("sst2"), tmp_path, "train")
    with pytest.raises(ValueError, match=r"task\.data_dir=.*" + pattern):
        check_data_dir(get_task("sst2"), tmp_path)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"]])
    with pytest.raises(ValueError, match="no examples for split 'validation'"):
        read_glue_tsv(get_task("sst2"), tmp_path, "validation")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples for split 'train'"):
        read_glue_tsv(get_task("cola"), tmp_path, "train")


def test_missing_data_dir_and_task_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"task\.data_dir=.*not an existing folder"):
        check_data_dir(get_task("rte"), tmp_path / "nowhere")
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(ValueError, match=r"has no RTE/ folder.*\['SST-2'\]"):
        check_data_dir(get_task("rte"), tmp_path)
    with pytest.raises(ValueError, match=r"has no RTE/ folder"):
        load_raw(get_task("rte"), tmp_path)


def test_data_dir_pointing_at_the_task_folder_gets_a_hint(glue_root: Path) -> None:
    with pytest.raises(ValueError, match=r"point task\.data_dir at its parent folder"):
        check_data_dir(get_task("rte"), glue_root / "RTE")


def test_missing_dev_file_names_it(glue_root: Path) -> None:
    (glue_root / "MNLI" / "dev_mismatched.tsv").unlink()
    check_data_dir(get_task("rte"), glue_root)
    with pytest.raises(ValueError, match=r"missing MNLI/dev_mismatched\.tsv.*'mismatched'"):
        check_data_dir(get_task("mnli"), glue_root)


def test_cola_with_a_header_is_rejected_by_the_preflight(tmp_path: Path) -> None:
    for name in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path / "CoLA" / name, [["sentence", "label"], ["Bill ate.", "1"]])
    with pytest.raises(ValueError, match=r"line 1 has 2 tab-separated fields, expected 4"):
        check_data_dir(get_task("cola"), tmp_path)


def test_synthetic_task_refuses_a_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"task\.data_dir is not used by the synthetic task"):
        load_raw(get_task("synthetic"), tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        load_raw(get_task("synthetic"), None, synthetic={"n_examples": 10})


def test_hub_failure_tells_user_to_pass_data_dir(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"task\.data_dir=/path/to/glue.*RTE/train\.tsv"):
        load_hub(get_task("rte"), cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Synthetic task


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    first = generate_synthetic(seed=3, n_train=200, n_dev=60)
    again = generate_synthetic(seed=3, n_train=200, n_dev=60)
    other = generate_synthetic(seed=4, n_train=200, n_dev=60)
    assert first.train == again.train
    assert first.dev == again.dev
    assert first.train.text_a != other.train.text_a


def test_synthetic_defaults_are_balanced_disjoint_and_well_formed() -> None:
    raw = load_raw(get_task("synthetic"), None, seed=0)
    assert len(raw.train) == 2000
    assert list(raw.dev) == ["validation"]
    dev = raw.dev["validation"]
    assert len(dev) == 400
    assert Counter(raw.train.labels) == {0: 1000, 1: 1000}
    assert Counter(dev.labels) == {0: 200, 1: 200}
    assert not set(raw.train.text_a) & set(dev.text_a)
    assert len(set(raw.train.text_a)) == len(raw.train.text_a)
    assert max(len(sentence.split()) for sentence in raw.train.text_a + dev.text_a) <= 24
    # Labels are shuffled, not in blocks.
    assert raw.train.labels[:20] != sorted(raw.train.labels[:20])


def _polarity(clause: str) -> int:
    """A clause's polarity by the rule the task states: the adjective's, flipped by a negation."""
    from diffora_lab.tasks.synthetic import _NEGATIVE, _POSITIVE

    words = clause.split()
    adjective = 1 if any(w in _POSITIVE for w in words) else 0
    assert adjective or any(w in _NEGATIVE for w in words), clause
    negated = any(n in f" {clause} " for n in (" not ", " never ", " hardly ", " far from "))
    return adjective ^ negated


def _rule(sentence: str, kind: str) -> int:
    """The label the README's description of the task gives a sentence."""
    if kind == "single":
        return _polarity(sentence)
    if kind == "majority":
        clauses = re.split(r" , | and ", sentence)
        assert len(clauses) == 3, sentence
        return int(sum(map(_polarity, clauses)) >= 2)
    for stressed_after in (" but ", " , yet ", " ; however "):
        if stressed_after in sentence:
            return _polarity(sentence.split(stressed_after)[1])
    if sentence.startswith(("although ", "while ")):
        return _polarity(sentence.split(" , ", 1)[1])
    for conceded_after in (" , despite the fact that ", " even though ", " although "):
        if conceded_after in sentence:
            return _polarity(sentence.split(conceded_after)[0])
    raise AssertionError(sentence)


def test_synthetic_labels_follow_the_stated_rule_and_need_more_than_words() -> None:
    raw, kinds = generate_synthetic(7, noise=0), kinds_of(7, noise=0)
    assert set(kinds["train"]) == {"single", "contrast", "majority"}
    for sentence, label, kind in zip(raw.train.text_a, raw.train.labels, kinds["train"]):
        assert _rule(sentence, kind) == label, (sentence, kind)
    # A bag of words (naive Bayes on word counts) cannot solve the default task; it solves the
    # smoke experiment's single clauses without negation perfectly.
    assert _bag_of_words_accuracy(raw) < 0.7
    easy = generate_synthetic(7, negation=0, contrast=0, majority=0, lexicon=4, noise=0)
    assert _bag_of_words_accuracy(easy) == 1.0


def _bag_of_words_accuracy(raw) -> float:
    counts = {0: Counter(), 1: Counter()}
    for text, label in zip(raw.train.text_a, raw.train.labels):
        counts[label].update(text.split())
    vocabulary = len(set(counts[0]) | set(counts[1]))
    totals = {label: sum(c.values()) + vocabulary for label, c in counts.items()}
    dev = raw.dev["validation"]
    correct = 0
    for text, label in zip(dev.text_a, dev.labels):
        score = {
            c: sum(math.log((counts[c][w] + 1) / totals[c]) for w in text.split()) for c in (0, 1)
        }
        correct += max(score, key=score.get) == label
    return correct / len(dev.labels)


def test_synthetic_noise_flips_a_share_of_labels_in_each_class() -> None:
    clean = generate_synthetic(3, n_train=400, n_dev=200, noise=0)
    noisy = generate_synthetic(3, n_train=400, n_dev=200, noise=0.1)
    assert noisy.train.text_a == clean.train.text_a  # the same sentences, some labels flipped
    flipped = [a != b for a, b in zip(clean.train.labels, noisy.train.labels)]
    assert sum(flipped) == 40 and Counter(noisy.train.labels) == {0: 200, 1: 200}
    dev_flips = sum(
        a != b for a, b in zip(clean.dev["validation"].labels, noisy.dev["validation"].labels)
    )
    assert dev_flips == 20


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"noise": 0.5},
            r"task\.synthetic\.noise=0\.5: the share of flipped labels, in \[0, 0\.5\)",
        ),
        ({"negation": 1.5}, r"task\.synthetic\.negation=1\.5: a share in \[0, 1\]"),
        ({"contrast": 0.7, "majority": 0.5}, r"at most 1 together"),
        ({"lexicon": 1}, r"task\.synthetic\.lexicon=1: adjectives per polarity"),
        ({"colour": 1}, r"unknown keys \['colour'\]"),
    ],
)
def test_synthetic_settings_out_of_range_name_the_setting(setting, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic(0, n_train=10, n_dev=10, **setting)


def test_synthetic_size_overrides_and_odd_sizes() -> None:
    raw = load_raw(get_task("synthetic"), None, seed=1, synthetic={"n_train": 101, "n_dev": 11})
    assert len(raw.train) == 101
    assert len(raw.dev["validation"]) == 11
    assert abs(sum(raw.train.labels) * 2 - 101) == 1
    with pytest.raises(ValueError, match=r"task\.synthetic\.n_dev must be an integer >= 2"):
        generate_synthetic(0, n_train=10, n_dev=0)


def test_limits_keep_the_first_examples_of_train_and_of_each_dev_split() -> None:
    spec, sizes = get_task("synthetic"), {"n_train": 50, "n_dev": 20}
    full = load_raw(spec, None, seed=3, synthetic=sizes)
    cut = load_raw(spec, None, seed=3, synthetic=sizes, train_limit=12, dev_limit=5)
    assert cut.train.text_a == full.train.text_a[:12] and cut.train.labels == full.train.labels[:12]
    assert cut.dev["validation"].labels == full.dev["validation"].labels[:5]
    only_train = load_raw(spec, None, seed=3, synthetic=sizes, train_limit=12)
    assert len(only_train.train) == 12 and len(only_train.dev["validation"]) == 20
    for bad in (0, True):
        with pytest.raises(ValueError, match=r"task\.train_limit=.*>= 1, or null"):
            load_raw(spec, None, seed=3, synthetic=sizes, train_limit=bad)


# ------------------------------------------------------------------------------------------
# The real shared GLUE files (skipped when absent)


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="shared GLUE data not present")
def test_real_shared_glue_files_match_readme_counts() -> None:
    expected = {
        ("sst2", "train"): (67_349, 29_780),
        ("sst2", "validation"): (872, 428),
        ("cola", "train"): (8_551, 2_528),
        ("cola", "validation"): (1_043, 322),
        ("rte", "train"): (2_490, 1_241),
        ("rte", "validation"): (277, 131),
        ("qnli", "validation"): (5_463, 2_761),
    }  # (rows, rows with label id 0 except for rte/qnli: rows with "not_entailment" = id 1)
    for (name, split), (rows, count) in expected.items():
        spec = get_task(name)
        if not (SHARED_GLUE / spec.glue_dir).is_dir():
            continue
        examples = read_glue_tsv(spec, SHARED_GLUE, split)
        assert len(examples) == rows, (name, split)
        counted_label = 1 if name in ("rte", "qnli") else 0
        assert examples.labels.count(counted_label) == count, (name, split)
        assert all(text for text in examples.text_a)
    for name in ("sst2", "cola", "rte"):
        if (SHARED_GLUE / get_task(name).glue_dir).is_dir():
            check_data_dir(get_task(name), SHARED_GLUE)
    if (SHARED_GLUE / "QNLI").is_dir() and not (SHARED_GLUE / "QNLI" / "train.tsv").exists():
        with pytest.raises(ValueError, match=r"missing QNLI/train\.tsv"):
            check_data_dir(get_task("qnli"), SHARED_GLUE)
