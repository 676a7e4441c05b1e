"""RULER's fixed strings and task table (hsiehjackson/RULER @ e40fae1).

``TASK_TEMPLATES`` mirrors ``scripts/data/synthetic/constants.py``, ``MODEL_TEMPLATES`` mirrors
``scripts/data/template.py`` and ``SYNTHETIC`` mirrors ``scripts/synthetic.yaml`` (the 13 tasks). The strings are
kept byte-for-byte, typos included ("assgined", the trailing space of the vt answer prefix).
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "TASK_TEMPLATES", "MODEL_TEMPLATES", "SYNTHETIC", "TASKS", "NOISE", "build_template", "model_wrapper",
    "tokens_to_generate", "task_config",
]

#: Per-generator task template, answer prefix and number of tokens to generate.
TASK_TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
        ),
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
        ),
        "answer_prefix": (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            "{num_v} variables are assgined the value {query}, they are: "
        ),
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\n"
            "Question: What are the 10 most common words in the above list?"
        ),
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": (
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. {context}\n"
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": (
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n{context}\n\n"
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nQuestion: {query}"
        ),
        "answer_prefix": " Answer:",
    },
}

#: Model (chat) wrappers; ``{task_template}`` is replaced by the task template.
MODEL_TEMPLATES: dict[str, str] = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:"
    ),
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "command-r-chat": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{task_template}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    "chatglm-chat": "[gMASK]sop<|user|> \n {task_template}<|assistant|> \n ",
    "RWKV": (
        "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. "
        "Please feel free to ask any question and I will always answer it\n\nUser: {task_template}\n\nAssistant:"
    ),
    "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
    "meta-llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "jamba": "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> {task_template}<|eom|><|bom|><|assistant|>",
}

_NIAH = "niah"
#: The 13 tasks of ``scripts/synthetic.yaml``: generator name and its arguments.
SYNTHETIC: dict[str, dict[str, Any]] = {
    "niah_single_1": {"task": _NIAH, "args": {"type_haystack": "repeat", "type_needle_k": "words",
                                             "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1,
                                             "num_needle_q": 1}},
    "niah_single_2": {"task": _NIAH, "args": {"type_haystack": "essay", "type_needle_k": "words",
                                             "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1,
                                             "num_needle_q": 1}},
    "niah_single_3": {"task": _NIAH, "args": {"type_haystack": "essay", "type_needle_k": "words",
                                             "type_needle_v": "uuids", "num_needle_k": 1, "num_needle_v": 1,
                                             "num_needle_q": 1}},
    "niah_multikey_1": {"task": _NIAH, "args": {"type_haystack": "essay", "type_needle_k": "words",
                                               "type_needle_v": "numbers", "num_needle_k": 4, "num_needle_v": 1,
                                               "num_needle_q": 1}},
    "niah_multikey_2": {"task": _NIAH, "args": {"type_haystack": "needle", "type_needle_k": "words",
                                               "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1,
                                               "num_needle_q": 1}},
    "niah_multikey_3": {"task": _NIAH, "args": {"type_haystack": "needle", "type_needle_k": "uuids",
                                               "type_needle_v": "uuids", "num_needle_k": 1, "num_needle_v": 1,
                                               "num_needle_q": 1}},
    "niah_multivalue": {"task": _NIAH, "args": {"type_haystack": "essay", "type_needle_k": "words",
                                               "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 4,
                                               "num_needle_q": 1}},
    "niah_multiquery": {"task": _NIAH, "args": {"type_haystack": "essay", "type_needle_k": "words",
                                               "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1,
                                               "num_needle_q": 4}},
    "vt": {"task": "variable_tracking", "args": {"num_chains": 1, "num_hops": 4}},
    "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
    "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
    "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
    "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
}

#: Task names in RULER's order.
TASKS: tuple[str, ...] = tuple(SYNTHETIC)

#: The "noise" haystack sentence of niah ``repeat`` (vt appends a newline to it).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def task_config(task: str) -> dict[str, Any]:
    """The merged configuration of one task, as ``prepare.py`` builds it (generator, args, template fields).

    Raises
    ------
    KeyError
        For a task that is not one of :data:`TASKS`.
    """
    if task not in SYNTHETIC:
        raise KeyError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")
    config = {"task": SYNTHETIC[task]["task"], "args": dict(SYNTHETIC[task]["args"])}
    config.update(TASK_TEMPLATES[config["task"]])
    return config


def tokens_to_generate(task: str) -> int:
    """RULER's ``tokens_to_generate`` for a task (128 niah, 30 vt, 120 cwe, 50 fwe, 32 qa)."""
    return int(task_config(task)["tokens_to_generate"])


def model_wrapper(template: str) -> str:
    """The model wrapper a template argument names: a key of :data:`MODEL_TEMPLATES`, or a wrapper string itself.

    A wrapper string (e.g. a tokenizer's chat template rendered around a placeholder, see
    :func:`kvfactory.benchmarks.ruler.runner.chat_wrapper`) must contain ``{task_template}`` exactly once and no
    other braces.

    Raises
    ------
    KeyError
        For a name that is not a model template.
    ValueError
        For a wrapper string with other braces or a repeated placeholder.
    """
    if template in MODEL_TEMPLATES:
        return MODEL_TEMPLATES[template]
    if "{task_template}" not in template:
        raise KeyError(f"unknown RULER model template {template!r}; accepted: {', '.join(MODEL_TEMPLATES)} or a "
                       "wrapper string containing {task_template}")
    rest = template.replace("{task_template}", "", 1)
    if "{" in rest or "}" in rest:
        raise ValueError(f"a RULER model wrapper may hold no braces besides one {{task_template}}: {template!r}")
    return template


def build_template(generator: str, template: str = "base") -> str:
    """The final template of ``prepare.py``: the model wrapper around the task template, then the answer prefix.

    Parameters
    ----------
    generator : str
        A key of :data:`TASK_TEMPLATES` (``niah``, ``variable_tracking``, ...).
    template : str
        A key of :data:`MODEL_TEMPLATES` (``base``, ``meta-chat``, ``meta-llama3``, ...) or a wrapper string
        (see :func:`model_wrapper`).
    """
    fields = TASK_TEMPLATES[generator]
    return model_wrapper(template).format(task_template=fields["template"]) + fields["answer_prefix"]
