"""Fixtures of the training-job tests: tiny models on disk (a BERT and a Llama over a word-level
vocabulary of the embedded dataset) and small data files, so that every run is a few steps of
milliseconds."""
import pytest
import torch

from ptuning_fast.data import LABELS, sentiment_examples, write_examples


def _vocabulary() -> list[str]:
    words = set()
    for split in ("train", "test"):
        for e in sentiment_examples(split):
            words.update(e["text"].replace(".", " ").replace(",", " ").replace("!", " ").replace(":", " ")
                         .replace("?", " ").split())
    words.update(LABELS)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", ":", "?"] + sorted(words) + ["sentiment"]


def _save_tokenizer(folder):
    from transformers import BertTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(_vocabulary())})
    assert tokenizer("the film")["input_ids"][1] != tokenizer.unk_token_id
    tokenizer.save_pretrained(folder)
    return tokenizer


def _tiny_model(tmp_path_factory, name: str, build) -> str:
    """A folder with the tokenizer and ``build(tokenizer)``'s model, initialised from seed 0."""
    folder = tmp_path_factory.mktemp(name)
    tokenizer = _save_tokenizer(folder)
    torch.manual_seed(0)
    build(tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel
    return _tiny_model(tmp_path_factory, "tiny_bert", lambda tokenizer: BertModel(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _tiny_model(tmp_path_factory, "tiny_llama", lambda tokenizer: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """160 train / 64 eval examples: evaluation stays cheap."""
    folder = tmp_path_factory.mktemp("data")
    write_examples(sentiment_examples("train")[:160], folder / "train.jsonl")
    write_examples(sentiment_examples("test")[:64], folder / "test.csv")
    return str(folder / "train.jsonl"), str(folder / "test.csv")
