"""Needle-in-a-haystack protocol (kvfactory.benchmarks.needle_haystack, needle_prompt, needle_scoring) and its
heatmaps (kvfactory.plots)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvfactory import plots
from kvfactory.benchmarks import needle_haystack, needle_prompt, needle_scoring


# ----------------------------------------------------------------------------------------------------- fake tokenizer
class WordTokenizer:
    """Word-level tokenizer: words, single punctuation marks and newlines are tokens; id 0 is a BOS special token.

    The vocabulary is fixed at construction (``corpus`` words plus whatever ``extra`` texts hold); unknown words map to
    ``<unk>``. ``chat_template`` (ChatML-like) is optional so both prompt paths can be tested. It also has what
    generation needs (pad/eos/unk ids, ``get_vocab``), and decodes ids beyond its vocabulary (a random model's) as
    ``<unk>``, so it can drive the tiny random models of ``tests/conftest.py`` (vocabulary 128).
    """

    SPLIT = re.compile(r"<s>|\n|\w+|[^\w\s]")

    def __init__(self, *texts: str, chat: bool = False) -> None:
        words = sorted({token for text in texts for token in self.SPLIT.findall(text)} - {"<s>"} | {"<unk>"})
        self.vocab = {"<s>": 0, **{word: i + 1 for i, word in enumerate(words)}}
        self.inverse = {i: word for word, i in self.vocab.items()}
        self.bos_token_id = self.pad_token_id = self.eos_token_id = 0
        self.unk_token_id = self.vocab["<unk>"]
        self.chat_template = "chatml" if chat else None

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.get(token, self.vocab["<unk>"]) for token in self.SPLIT.findall(text)]
        return [0, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.inverse.get(i, "<unk>") for i in ids if not (skip_special_tokens and i == 0))

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        assert not tokenize
        text = "".join(f"<s> {m['role']} :\n{m['content']}\n" for m in messages)
        return text + ("assistant :\n" if add_generation_prompt else "")


SENTENCE = "alpha beta gamma delta epsilon ."  # 6 tokens, the last one a sentence end
PROMPT_WORDS = " ".join([needle_prompt.INSTRUCTION, needle_prompt.CONTEXT_OPEN, needle_prompt.CONTEXT_CLOSE,
                         "Question Answer : user assistant system", needle_prompt.RETRIEVAL_QUESTION,
                         needle_haystack.NEEDLE, "! ? no periods here"])


@pytest.fixture(scope="module")
def fake() -> WordTokenizer:
    return WordTokenizer(SENTENCE, PROMPT_WORDS)


@pytest.fixture(scope="module")
def fake_chat() -> WordTokenizer:
    return WordTokenizer(SENTENCE, PROMPT_WORDS, chat=True)


def essay_folder(root: Path) -> Path:
    """Three small essays, one with CRLF endings (like the shared ``worked.txt``)."""
    folder = root / "essays"
    folder.mkdir()
    (folder / "b.txt").write_bytes(b"Second essay. It has two lines.\r\nLine two ends here.\r\n")
    (folder / "a.txt").write_text("First essay. Short!\n")
    (folder / "c.txt").write_text("Third essay? Yes.\n")
    (folder / "ignored.md").write_text("not an essay")
    return folder


# ------------------------------------------------------------------------------------------------------- constants
def test_constants() -> None:
    assert needle_haystack.NEEDLE.startswith("\nThe best thing") and needle_haystack.NEEDLE.endswith("sunny day.\n")
    assert needle_prompt.RETRIEVAL_QUESTION == "What is the best thing to do in San Francisco?"
    assert needle_haystack.DEFAULT_DEPTHS == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]


# -------------------------------------------------------------------------------------------------------- haystacks
def test_haystack_sorted_crlf_normalised_and_repeated(tmp_path: Path, fake: WordTokenizer) -> None:
    folder = essay_folder(tmp_path)
    text = needle_haystack.load_haystack_text(folder)
    assert "\r" not in text
    assert text == ("First essay. Short!\nSecond essay. It has two lines.\nLine two ends here.\nThird essay? Yes.\n")
    one_pass = len(fake.encode(text, add_special_tokens=False))
    longer = needle_haystack.load_haystack_text(folder, min_tokens=2 * one_pass + 1, tokenizer=fake)
    assert longer == text * 3  # whole passes, no separator
    with pytest.raises(ValueError, match="tokenizer"):
        needle_haystack.load_haystack_text(folder, min_tokens=10)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_haystack_missing_folder_names_the_flags(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "essays"
    if case == "empty":
        folder.mkdir()
    with pytest.raises(needle_haystack.HaystackNotFound, match=r"--haystack_dir.*--haystack noise"):
        needle_haystack.load_haystack_text(folder)


def test_noise_haystack(fake: WordTokenizer) -> None:
    noise = needle_haystack.NOISE_SENTENCE
    assert needle_haystack.noise_haystack(repeats=2) == f"{noise} {noise}"
    long = needle_haystack.noise_haystack(min_tokens=500, tokenizer=fake)
    assert len(fake.encode(long, add_special_tokens=False)) >= 500


@pytest.mark.skipif(needle_haystack.default_haystack_dir() is None, reason="no shared PaulGrahamEssays folder here")
def test_shared_essays_are_the_49_upstream_files() -> None:
    text = needle_haystack.load_haystack_text()
    assert len(text) == 643_830 and "\r" not in text  # gkamradt's package total (after worked.txt CRLF → LF)
    assert text.startswith("July 2010What hard liquor,")


# ---------------------------------------------------------------------------------------------------- sentence ends
@pytest.mark.parametrize("text, expected", [
    (".", True), (" .", True), (".\n", True), (".\n\n", True), ('."', True), (').', True), ("?!", True), ("!", True),
    ("?\u201d", True), ("\u3002", True),
    ("Mr.", False), ("etc.", False), ("1.", False), ("...", False), (",", False), ("", False), ("\n", False),
    ("the", False), (". The", False),
])
def test_sentence_end_rule(text: str, expected: bool) -> None:
    assert needle_haystack.is_sentence_end(text) is expected


def test_sentence_end_ids_found_from_the_tokenizer(fake: WordTokenizer) -> None:
    assert needle_haystack.sentence_end_token_ids(fake) == {fake.vocab["."], fake.vocab["!"], fake.vocab["?"]}


# ---------------------------------------------------------------------------------------------------------- context
@pytest.mark.parametrize("depth", [0, 11, 22, 29, 50, 56, 89, 99, 100])
def test_insertion_at_depth_after_a_sentence_end(fake: WordTokenizer, depth: float) -> None:
    haystack = fake.encode(" ".join([SENTENCE] * 100), add_special_tokens=False)  # 600 tokens, "." every 6th
    needle_ids = fake.encode(needle_haystack.NEEDLE, add_special_tokens=False)
    overhead = 7
    context = needle_haystack.build_context(fake, haystack, needle_haystack.NEEDLE, depth, 400, overhead)
    keep = 400 - overhead - len(needle_ids)
    assert len(context.ids) == keep + len(needle_ids) == 400 - overhead
    target = int(keep * (depth / 100))  # upstream's expression: 29% of 100 gives 28, not 29
    expected = keep if depth == 100 else (target // 6) * 6
    assert context.insertion_index == expected
    assert context.ids[expected:expected + len(needle_ids)] == needle_ids
    assert context.ids[:expected] + context.ids[expected + len(needle_ids):] == haystack[:keep]
    if 0 < expected < keep:
        assert fake.inverse[context.ids[expected - 1]] == "."


def test_upstream_float_expression() -> None:
    assert int(100 * (29 / 100)) == 28  # the quirk build_context keeps for parity


def test_no_sentence_end_inserts_at_zero(fake: WordTokenizer) -> None:
    haystack = fake.encode(" ".join(["no periods here"] * 200), add_special_tokens=False)
    context = needle_haystack.build_context(fake, haystack, needle_haystack.NEEDLE, 50, 300)
    assert context.insertion_index == 0
    assert context.text.startswith(fake.decode(fake.encode(needle_haystack.NEEDLE, False)))


def test_context_errors(fake: WordTokenizer) -> None:
    haystack = fake.encode(SENTENCE * 10, add_special_tokens=False)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        needle_haystack.build_context(fake, haystack, needle_haystack.NEEDLE, 101, 50)
    with pytest.raises(ValueError, match="smaller than the needle"):
        needle_haystack.build_context(fake, haystack, needle_haystack.NEEDLE, 50, 10)
    with pytest.raises(ValueError, match="min_tokens"):
        needle_haystack.build_context(fake, haystack, needle_haystack.NEEDLE, 50, 500)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [120, 333, 1000])
def test_prompt_length_equals_target_on_fake_tokenizer(fake: WordTokenizer, fake_chat: WordTokenizer, chat: bool,
                                                       length: int) -> None:
    tokenizer = fake_chat if chat else fake
    parts = needle_prompt.prompt_parts(tokenizer)
    assert parts.chat_template is chat
    assert parts.prefix_ids[0] == 0  # BOS: written by the template, or the plain prompt's default special token
    overhead = needle_prompt.prompt_overhead(tokenizer)
    haystack = " ".join([SENTENCE] * 300)
    for depth in needle_haystack.DEFAULT_DEPTHS:
        context = needle_haystack.build_context(tokenizer, haystack, needle_haystack.NEEDLE, depth, length, overhead)
        prompt = needle_prompt.build_prompt_ids(tokenizer, context.ids, needle_prompt.RETRIEVAL_QUESTION)
        assert len(prompt) == length
        text = tokenizer.decode(prompt)
        assert "< document >" in text and "What is the best thing" in text.replace(" ?", "?")
        assert text.rstrip().endswith("assistant :" if chat else "Answer :")


@pytest.mark.parametrize("chat", [False, True])
def test_answer_prefix_ends_the_prompt_and_keeps_its_length(fake: WordTokenizer, fake_chat: WordTokenizer,
                                                            chat: bool) -> None:
    tokenizer = fake_chat if chat else fake
    prefix = "alpha beta gamma"
    plain = needle_prompt.prompt_parts(tokenizer)
    parts = needle_prompt.prompt_parts(tokenizer, answer_prefix=prefix)
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    assert parts.prefix_ids == plain.prefix_ids
    assert parts.suffix_ids == plain.suffix_ids + tuple(prefix_ids)  # the assistant turn (or "Answer:") starts with it
    overhead = needle_prompt.prompt_overhead(tokenizer, answer_prefix=prefix)
    assert overhead == plain.overhead + len(prefix_ids)
    haystack = " ".join([SENTENCE] * 300)
    context = needle_haystack.build_context(tokenizer, haystack, needle_haystack.NEEDLE, 50, 333, overhead)
    prompt = needle_prompt.build_prompt_ids(tokenizer, context.ids, answer_prefix=prefix)
    assert len(prompt) == 333 and prompt[-len(prefix_ids):] == prefix_ids


@pytest.fixture(scope="module")
def smollm2() -> Any:
    try:
        from kvfactory.models import load_tokenizer
    except ImportError as error:
        pytest.skip(f"kvfactory.models.load_tokenizer is not available yet ({error})")
    try:
        return load_tokenizer("smollm2-135m")
    except (OSError, ImportError) as error:
        pytest.skip(f"the embedded SmolLM2 tokenizer cannot be loaded here ({error})")


def test_prompt_length_equals_target_on_smollm2(smollm2: Any, tmp_path: Path) -> None:
    essays = needle_haystack.default_haystack_dir() or essay_folder(tmp_path)
    lengths = (256, 1000, 2500)
    overhead = needle_prompt.prompt_overhead(smollm2)
    haystack = smollm2.encode(needle_haystack.load_haystack_text(essays, min_tokens=max(lengths), tokenizer=smollm2),
                              add_special_tokens=False)
    ends = needle_haystack.sentence_end_token_ids(smollm2)
    assert smollm2.encode(".", add_special_tokens=False)[-1] in ends
    needle_ids = smollm2.encode(needle_haystack.NEEDLE, add_special_tokens=False)
    for length in lengths:
        for depth in (0, 33, 56, 100):
            context = needle_haystack.build_context(smollm2, haystack, needle_haystack.NEEDLE, depth, length, overhead)
            prompt = needle_prompt.build_prompt_ids(smollm2, context.ids, needle_prompt.RETRIEVAL_QUESTION)
            assert len(prompt) == length
            i = context.insertion_index
            assert context.ids[i:i + len(needle_ids)] == needle_ids
            if 0 < i < len(context.ids) - len(needle_ids):
                assert context.ids[i - 1] in ends
    text = smollm2.decode(prompt, skip_special_tokens=False)
    assert "Dolores Park" in text and needle_prompt.RETRIEVAL_QUESTION in text


# ---------------------------------------------------------------------------------------------------------- scoring
ANSWER_PART = "eat a sandwich and sit in Dolores Park on a sunny day."


def test_rouge1_reference_values() -> None:
    needle = needle_haystack.NEEDLE
    assert needle_scoring.rouge1_f(needle, needle) == pytest.approx(1.0)
    assert needle_scoring.rouge1_f(needle.strip(), needle) == pytest.approx(1.0)
    assert needle_scoring.rouge1_f(ANSWER_PART, needle) == pytest.approx(24 / 33)  # KVCF score 7.2727...
    assert needle_scoring.rouge1_f("", needle) == 0.0 and needle_scoring.rouge1_f("...", needle) == 0.0
    assert needle_scoring.rouge_tokens("Sitting in the Park, sunny days!") == [
        "sit", "in", "the", "park", "sunni", "day"]


def test_rouge1_matches_rouge_score_when_installed() -> None:
    if importlib.util.find_spec("rouge_score") is None:
        pytest.skip("rouge-score is not installed (the re-implementation is pinned by the reference values)")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    for answer in (ANSWER_PART, "The best thing is to sit in Dolores park.", "Eating sandwiches!", ""):
        assert needle_scoring.rouge1_f(answer, needle_haystack.NEEDLE) == pytest.approx(
            scorer.score(needle_haystack.NEEDLE, answer)["rouge1"].fmeasure)


def test_needle_recall() -> None:
    q = needle_prompt.RETRIEVAL_QUESTION
    assert needle_scoring.key_words(needle_haystack.NEEDLE, exclude=q) == {
        "eat", "sandwich", "sit", "dolor", "park", "sunni", "day"}
    assert len(needle_scoring.key_words(needle_haystack.NEEDLE)) == 11
    assert needle_scoring.needle_recall(ANSWER_PART, question=q) == 1.0
    assert needle_scoring.needle_recall("Eat a sandwich and sit in Dolores Park on a sunny day", question=q) == 1.0
    assert needle_scoring.needle_recall("sitting in Dolores Park", question=q) == pytest.approx(3 / 7)
    assert needle_scoring.needle_recall("The best thing to do in San Francisco is", question=q) == 0.0
    assert needle_scoring.needle_recall("The best thing to do in San Francisco is") == pytest.approx(4 / 11)
    assert needle_scoring.needle_recall("", needle_haystack.NEEDLE) == 0.0
    assert {"a", "the", "in", "and", "is", "to", "do", "on"} <= needle_scoring.STOP_WORDS
    assert needle_scoring.score_answer(ANSWER_PART) == {"recall": 1.0, "rouge1_f": pytest.approx(24 / 33)}


# ---------------------------------------------------------------------------------------------------------- results
def write(folder: Path, length: int, depth: float, recall: float, **kw: Any) -> Path:
    fields = dict(model="smollm2-135m", method="snapkv", budget=128, needle=needle_haystack.NEEDLE, answer="x",
                  rouge1_f=recall, kept_tokens=128.0, seconds=0.5)
    fields.update(kw)
    return needle_scoring.write_cell(folder, context_length=length, depth_percent=depth, recall=recall, **fields)


def test_write_read_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    assert needle_scoring.completed_cells(folder) == set()
    assert needle_scoring.cell_filename(1000, 50) == "len_1000_depth_5000_results.json"
    assert needle_scoring.cell_filename(1000, np.float64(11.0)) == "len_1000_depth_1100_results.json"
    path = write(folder, 1000, np.float64(11.0), 0.5, extra={"insertion_index": 97, "question": "q"})
    write(folder, 2000, 0.0, 1.0)
    write(folder, 1000, 0.0, 0.25)
    assert path.name == "len_1000_depth_1100_results.json" and not list(folder.glob("*.tmp"))
    record = json.loads(path.read_text())
    assert record["insertion_index"] == 97 and record["depth_percent"] == 11.0 and "timestamp_utc" in record
    assert set(needle_scoring.CELL_FIELDS) <= set(record)
    (folder / "len_3000_depth_0_results.json").write_text('{"context_len')  # a crash mid-write elsewhere
    cells = needle_scoring.read_cells(folder)
    assert [(c["context_length"], c["depth_percent"]) for c in cells] == [(1000, 0.0), (1000, 11.0), (2000, 0.0)]
    done = needle_scoring.completed_cells(folder, model="smollm2-135m", method="snapkv", budget=128)
    assert done == {(1000, 0.0), (1000, 11.0), (2000, 0.0)}
    assert (1000, float(np.round(np.linspace(0, 100, 10))[1])) in done
    with pytest.raises(ValueError, match="one results folder per"):
        needle_scoring.completed_cells(folder, method="h2o")
    with pytest.raises(ValueError, match="override"):
        write(folder, 1000, 0.0, 0.1, extra={"recall": 3})


# ------------------------------------------------------------------------------------------------------------ plots
def synthetic_run(folder: Path, method: str, budget: int | None, lengths: list[int],
                  skip: set[tuple[int, float]] = frozenset()) -> Path:
    for j, length in enumerate(lengths):
        for i, depth in enumerate(needle_haystack.DEFAULT_DEPTHS):
            if (length, depth) not in skip:
                write(folder, length, depth, (i + j) % 5 / 4, method=method, budget=budget)
    return folder


def test_needle_grid_shape_missing_and_duplicates(tmp_path: Path) -> None:
    folder = synthetic_run(tmp_path / "snap", "snapkv", 128, [1000, 2000, 4000], skip={(4000, 56.0)})
    write(folder / "dup", 1000, 0.0, 0.0)  # a sub-folder is not read
    grid = plots.needle_grid(folder)
    assert grid.values.shape == (10, 3) and grid.lengths == [1000, 2000, 4000] and grid.depths[5] == 56.0
    assert np.isnan(grid.values[5, 2]) and grid.missing == 1
    assert grid.values[1, 2] == pytest.approx((1 + 2) % 5 / 4)
    assert (grid.model, grid.method, grid.budget) == ("smollm2-135m", "snapkv", "128")
    records = needle_scoring.read_cells(folder) + [dict(needle_scoring.read_cells(folder)[0], recall=0.0)]
    assert plots.needle_grid(records).values[0, 0] == pytest.approx(0.0 / 2)  # duplicates are averaged
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no needle cells"):
        plots.needle_grid(tmp_path / "empty")
    with pytest.raises(ValueError, match="no 'seconds_x'"):
        plots.needle_grid(folder, metric="seconds_x")


def test_heatmap_and_comparison_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    snap = synthetic_run(tmp_path / "snap", "snapkv", 128, [1000, 2000, 4000, 8000], skip={(8000, 44.0)})
    full = synthetic_run(tmp_path / "full", "fullkv", None, [1000, 2000, 4000, 8000])
    wide = synthetic_run(tmp_path / "wide", "pyramidkv", 96, list(range(1000, 8001, 250)))
    png = plots.plot_needle_heatmap(snap)
    assert png == snap / "needle_heatmap.png"
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert 500 < width < 2000 and 400 < height < 1500
    assert plots.needle_grid(snap).values.shape == (10, 4)
    wide_png = plots.plot_needle_heatmap(wide, tmp_path / "img" / "wide.png", title="custom", metric="rouge1_f")
    assert matplotlib.image.imread(wide_png).shape[1] > width  # wider grid, wider figure
    side = plots.plot_needle_comparison([full, snap], tmp_path / "cmp.png")
    stacked = plots.plot_needle_comparison([full, wide], tmp_path / "cmp_v.png")
    side_h, side_w = matplotlib.image.imread(side).shape[:2]
    stacked_h, _ = matplotlib.image.imread(stacked).shape[:2]
    assert side_w > side_h and stacked_h > side_h
    with pytest.raises(ValueError, match="layout"):
        plots.plot_needle_comparison([full], tmp_path / "x.png", layout="diagonal")
