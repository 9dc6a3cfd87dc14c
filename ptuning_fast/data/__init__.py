"""Training data: the embedded sentiment dataset and (text, label) JSONL/CSV files.

``python -m ptuning_fast.data OUT_DIR`` writes the embedded dataset as ``train.jsonl`` and
``test.jsonl``, the file format the training job reads.
"""
from .files import read_examples, write_examples
from .sentiment import LABELS, sentiment_examples

__all__ = ["LABELS", "read_examples", "sentiment_examples", "write_examples"]
