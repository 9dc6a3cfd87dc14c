"""Data files as people write them: CSV from spreadsheets (a UTF-8 byte-order mark in front),
and files in another encoding, which are refused with the file and the byte named."""
import codecs

import pytest

from ptuning_fast.data import read_examples

EXAMPLES = [{"text": "déjà vu, très bien", "label": "positive"}, {"text": "naïve plot", "label": "negative"}]


@pytest.mark.parametrize("suffix, content", [
    (".csv", "text,label\r\n\"déjà vu, très bien\",positive\r\nnaïve plot,negative\r\n"),
    (".jsonl", '{"text": "déjà vu, très bien", "label": "positive"}\n'
               '{"text": "naïve plot", "label": "negative"}\n'),
])
def test_a_byte_order_mark_is_skipped(tmp_path, suffix, content):
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_bytes(content.encode("utf-8"))
    marked.write_bytes(codecs.BOM_UTF8 + content.encode("utf-8"))
    assert read_examples(plain) == read_examples(marked) == EXAMPLES


def test_non_utf8_files_are_refused_naming_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,positive\nnaïve plot,negative\n".encode("latin-1"))
    offset = len("text,label\nfine,positive\nna".encode("latin-1"))  # the 0xEF of "ï"
    with pytest.raises(ValueError, match=rf"latin1\.csv: not UTF-8 text: byte {offset} \(line 3\) is b'\\xef'"):
        read_examples(path)
    marked = tmp_path / "marked.jsonl"  # the offset counts the mark's 3 bytes too
    marked.write_bytes(codecs.BOM_UTF8 + b'{"text": "a\xff", "label": 1}\n')
    with pytest.raises(ValueError, match=r"marked\.jsonl: not UTF-8 text: byte 14 \(line 1\) is b'\\xff'"):
        read_examples(marked)
