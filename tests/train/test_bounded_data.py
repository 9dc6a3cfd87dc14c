"""Data files in bounded memory and with clear errors: long texts are cut before tokenising (to
the very tokens the whole text gives), CSV fields over the csv module's 128 KiB default are read,
labels and templates are checked naming the file, line and field."""
import time

import pytest
from tests.train.tiny import tiny_config
from transformers import AutoTokenizer

from ptuning_fast.data import read_examples, sentiment_examples, write_examples
from ptuning_fast.train.data import cut_texts, encode_examples


class CountingTokenizer:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        texts_list = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest] + [len(t) for t in texts_list])
        return self.tokenizer(texts, **kwargs)


def _long_text(words: int) -> str:
    vocabulary = [w for e in sentiment_examples("train")[:50] for w in e["text"].split()]
    return " ".join(vocabulary[i % len(vocabulary)] for i in range(words))


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_long_texts_give_the_tokens_of_the_whole_text(tiny_bert, tiny_llama, task):
    model = tiny_bert if task == "classification" else tiny_llama
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = tiny_config(model, task=task, max_length=24)
    examples = [{"text": _long_text(n), "label": label} for n, label in ((3000, "positive"), (7, "negative"),
                                                                          (40, "negative"))]
    counting = CountingTokenizer(tokenizer)
    got = encode_examples(examples, ["negative", "positive"], counting, config)
    # The reference: the whole texts tokenised (what the job did before cutting).
    if task == "classification":
        whole = tokenizer([e["text"] for e in examples], truncation=True, max_length=24)["input_ids"]
        assert got.ids == whole
    else:
        prompts = tokenizer([config.template.format(text=e["text"]) for e in examples])["input_ids"]
        assert [ids[:n] for ids, n in zip(got.ids, got.prompt_lengths)] == [
            p[-n:] for p, n in zip(prompts, got.prompt_lengths)]
    assert counting.longest < 24 * 40  # the 3000-word text was never tokenised whole


def test_a_100_mb_text_is_encoded_in_bounded_time(tiny_bert):
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_bert))
    huge = "the film was good " * 5_600_000  # 100 MB
    start = time.perf_counter()
    encoded = encode_examples([{"text": huge, "label": "positive"}, {"text": "fine", "label": "negative"}],
                              ["negative", "positive"], tokenizer, tiny_config(tiny_bert, max_length=24))
    assert len(encoded.ids[0]) == 24 and tokenizer.longest < 24 * 40
    assert time.perf_counter() - start < 20


def test_cut_texts_widens_the_cut_until_enough_tokens():
    text = "a" * 5000 + " b" * 10_000  # one long word first: the first cuts hold too few tokens
    count = lambda parts: [len(p) // 100 for p in parts]  # noqa: E731  100 characters a token
    [cut] = cut_texts([text], 20, "start", count)
    assert text.startswith(cut) and 5000 < len(cut) < len(text) and count([cut])[0] >= 20 and cut.endswith("b")
    [cut] = cut_texts([text], 20, "end", count)
    assert text.endswith(cut) and len(cut) < len(text) and cut.startswith(" b")
    assert cut_texts(["short"], 20, "end", count) == ["short"]
    with pytest.raises(ValueError, match="`keep` must be 'start' or 'end'"):
        cut_texts([text], 20, "middle", count)


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    text = "word " * 60_000  # 300 KB
    path = write_examples([{"text": text, "label": "positive"}, {"text": "ok", "label": "negative"}],
                          tmp_path / "long.csv")
    assert read_examples(path)[0]["text"] == text


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "   "}\n', r"bad.jsonl:1: column 'label' must be a non-blank string or an int, got '   '"),
    ('{"text": "a", "label": 1.5}\n', r"bad.jsonl:1: column 'label' must be a non-blank string or an int, got 1.5"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "' + "y" * 2000 + '"}\n',
     r"bad.jsonl:2: column 'label' holds a label of 2000 characters \(at most 1000\)"),
    ('{"text": "", "label": "x"}\n', r"bad.jsonl:1: column 'text' must be a non-empty string, got ''"),
])
def test_labels_and_texts_are_checked_naming_file_line_and_column(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_examples(path)


@pytest.mark.parametrize("template, message", [
    ("{{text}} Sentiment:", "must contain the field {text}.*would drop every example's text"),
    ("{text} {label}", r"has the fields \['{label}'\]: only {text} is filled"),
    ("{text", "is not a valid format string"),
])
def test_templates_are_checked(tiny_llama, template, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tiny_llama, task="causal-lm", template=template)
