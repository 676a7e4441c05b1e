"""RULER's QA generator (``synthetic/qa.py``, tasks ``qa_1`` = SQuAD v2 dev, ``qa_2`` = HotpotQA dev distractor).

``qa_data`` is a folder with ``squad.json`` (``dev-v2.0.json``) and/or ``hotpotqa.json``
(``hotpot_dev_distractor_v1.json``), the names RULER's ``download_qa_dataset.sh`` gives them. Sample ``i`` asks QA
``i + pre_samples``; its gold paragraph(s) are mixed with sampled distractors and shuffled with
``random.Random(seed)``. Upstream's in-place shuffle of the whole document list when every document is used is
kept (within one :func:`generate_qa` call).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .common import MissingTaskData, Rngs, SampleDoesNotFit, remove_newline_tab

__all__ = ["DOCUMENT_PROMPT", "QA_FILES", "read_squad", "read_hotpotqa", "generate_qa"]

DOCUMENT_PROMPT = "Document {i}:\n{document}"
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
MAX_RETRIES = 1000


def read_squad(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Answerable SQuAD v2 questions (all answer texts kept) and the sorted unique paragraphs."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = doc_id[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [own], "more_context": [i for i in article_docs if i != own]})
    return qas, docs


def read_hotpotqa(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """HotpotQA questions with their 10 context documents (``title\\nsentences``) and the sorted unique documents."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [doc_id[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


def load_qa(dataset: str, qa_data: str | Path | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Read ``{qa_data}/squad.json`` or ``{qa_data}/hotpotqa.json``.

    Raises
    ------
    MissingTaskData
        When ``qa_data`` is ``None`` or the file is missing.
    """
    if dataset not in QA_FILES:
        raise ValueError(f"qa dataset {dataset!r} not in {tuple(QA_FILES)}")
    hint = (f"pass --qa_data (qa_data=), a folder with {QA_FILES[dataset]} "
            f"({'SQuAD v2.0 dev-v2.0.json' if dataset == 'squad' else 'HotpotQA hotpot_dev_distractor_v1.json'})")
    if qa_data is None:
        raise MissingTaskData(f"RULER {dataset} QA data not given: {hint}")
    path = Path(qa_data) / QA_FILES[dataset]
    if not path.is_file():
        raise MissingTaskData(f"{path} not found: {hint}")
    return read_squad(path) if dataset == "squad" else read_hotpotqa(path)


def _input_output(rngs: Rngs, template: str, qas: list[dict[str, Any]], docs: list[str], index: int,
                  num_docs: int) -> tuple[str, list[str]]:
    item = qas[index]
    gold, more = item["context"], item.get("more_context", [])
    if num_docs < len(docs):
        if num_docs - len(gold) > len(more):
            excluded = set(gold + more)
            addition = [i for i in range(len(docs)) if i not in excluded]
            chosen = gold + more + rngs.py.sample(addition, max(0, num_docs - len(gold) - len(more)))
        else:
            chosen = gold + rngs.py.sample(more, num_docs - len(gold))
        all_docs = [docs[i] for i in chosen]
    else:
        all_docs = docs  # upstream shuffles the shared list in place
    rngs.fresh().shuffle(all_docs)
    context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(all_docs))
    return template.format(context=context, query=item["query"]), item["outputs"]


def generate_qa(
    args: dict[str, Any], template: str, count: Callable[[str], int], max_seq_length: int, tokens_to_generate: int,
    num_samples: int, seed: int, qa_data: str | Path | None = None, pre_samples: int = 0,
    remove_newline: bool = False,
) -> list[dict[str, Any]]:
    """Samples of ``qa_1``/``qa_2`` (args: ``dataset`` = ``squad`` or ``hotpotqa``), search in steps of 10 docs."""
    qas, docs = load_qa(str(args["dataset"]), qa_data)
    if num_samples + pre_samples > len(qas):
        raise ValueError(f"{args['dataset']} has {len(qas)} usable questions; asked for {num_samples + pre_samples}")
    rngs = Rngs(seed)
    incremental = 10
    num_docs, total = incremental, 0
    while total + tokens_to_generate < max_seq_length:
        text, answer = _input_output(rngs, template, qas, docs, 0, num_docs)
        total = count(text + f" {answer}")
        if total + tokens_to_generate > max_seq_length:
            num_docs -= incremental
            break
        num_docs += incremental
        if num_docs > len(docs):
            num_docs = len(docs)
            break
    if num_docs <= 0:
        raise SampleDoesNotFit(f"qa: max_seq_length={max_seq_length} is too short for {incremental} documents")

    records = []
    for index in range(num_samples):
        used, failures = num_docs, 0
        while True:
            try:
                text, answer = _input_output(rngs, template, qas, docs, index + pre_samples, used)
            except ValueError:  # more documents asked than the sample can give: upstream's bare except
                text, answer = "", []
                length = max_seq_length + 1
            else:
                length = count(text) + tokens_to_generate
            if length <= max_seq_length:
                break
            if used > incremental:
                used -= incremental
            else:
                failures += 1
                if failures > MAX_RETRIES:
                    raise SampleDoesNotFit(f"qa sample {index} exceeds max_seq_length={max_seq_length}")
        if remove_newline:
            text = remove_newline_tab(text)
        records.append({"index": index, "input": text, "outputs": answer, "length": length})
    return records
