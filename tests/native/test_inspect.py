"""``ptuning-fast inspect``: plots and nearest vocabulary tokens of an adapter folder, ours or
PEFT's, v1 prompts and deep prompts."""
import json
import os

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from tests.tiny_models import VOCAB, build, prompt_configs, random_ids, randomize_
from transformers import BertConfig, BertModel

import ptuning_fast
from ptuning_fast import get_ptuning_model, init_prompts_from_text, inspect_adapter
from ptuning_fast.cli import main as cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    """A real picture: PNG signature, a non-trivial size, decodes to more than one colour."""
    from matplotlib.image import imread

    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 5_000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert float(pixels[..., :3].std()) > 0.05


def check_nearest(entries, count, space, top_k):
    assert [entry["index"] for entry in entries] == list(range(count))
    for entry in entries:
        assert entry["space"] == space and len(entry["tokens"]) == top_k
        scores = [token["score"] for token in entry["tokens"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
        assert all(isinstance(token["token"], str) and isinstance(token["id"], int) for token in entry["tokens"])


def save_tiny_model(folder, name="llama"):
    """A tiny model saved with its config and a word-level tokenizer ("w0".."w60"), reloaded from the
    folder so that adapters record it as their base model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    base, task = build(name)
    base.save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w0").save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), task


@pytest.fixture(scope="module")
def default_job_checkpoint(tmp_path_factory):
    """The adapter of a three-step default job (MiniLM-L6 on the built-in data)."""
    output = tmp_path_factory.mktemp("job")
    cli(["train", "--steps", "3", "--output-dir", str(output), "--no-progress"])
    return output / "checkpoint-3"


def test_inspect_the_default_job_checkpoint(default_job_checkpoint, tmp_path, capsys):
    from transformers import AutoTokenizer

    from ptuning_fast.train import default_model_path

    assert cli(["inspect", str(default_job_checkpoint), "--output", str(tmp_path)]) == 0
    for picture in ("similarity.png", "norms.png"):
        check_png(tmp_path / picture)
    with open(tmp_path / "nearest_tokens.json") as handle:
        entries = json.load(handle)
    check_nearest(entries, 10, "input_embeddings", 5)

    # the scores are the cosine similarity of the saved prompt to the named token's embedding
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    prompts = load_file(default_job_checkpoint / "adapter_model.safetensors")["prompt_embeddings"]
    weights = load_file(default_model_path() / "model.safetensors")
    table = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))
    for entry in (entries[0], entries[7]):
        for token in entry["tokens"]:
            assert token["token"] == tokenizer.convert_ids_to_tokens(token["id"])
            cosine = torch.nn.functional.cosine_similarity(prompts[entry["index"]], table[token["id"]], dim=0)
            assert token["score"] == pytest.approx(float(cosine), abs=1e-5)
    printed = capsys.readouterr().out
    assert "10 virtual tokens" in printed and len([l for l in printed.splitlines() if l[:5].strip().isdigit()]) == 10


def test_a_v1_prompt_from_a_text_is_nearest_to_its_words(tmp_path):
    base, task = build("llama", 3)
    model = get_ptuning_model(base.eval(), prompt_configs(5)["lstm"](task))
    words = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(4))[:5] + 3
    init_prompts_from_text(model, words)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer = type("Names", (), {"convert_ids_to_tokens": lambda self, ids: [f"w{i}" for i in ids]})()

    result = inspect_adapter(tmp_path / "adapter", tmp_path / "out", model=base, tokenizer=tokenizer, top_k=3)

    assert result.kind == "v1" and result.num_virtual_tokens == 5
    check_nearest(result.nearest, 5, "input_embeddings", 3)
    assert [entry["tokens"][0]["id"] for entry in result.nearest] == words.tolist()
    assert all(entry["tokens"][0]["score"] > 0.999 for entry in result.nearest)
    assert [entry["tokens"][0]["token"] for entry in result.nearest] == [f"w{i}" for i in words.tolist()]


def test_inspect_a_peft_deep_prompt_adapter_next_to_its_model(tmp_path, capsys):
    base, task = save_tiny_model(tmp_path / "base")
    peft = ptuning_fast.accelerate(get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=6)))
    words = random_ids(1, 3, 5)[0]
    init_prompts_from_text(peft, words)
    peft.save_pretrained(tmp_path / "adapter")  # PEFT's own save: the config names tmp_path/base

    assert cli(["inspect", str(tmp_path / "adapter"), "-o", str(tmp_path / "out"), "--top-k", "4"]) == 0
    for picture in ("similarity.png", "norms.png"):
        check_png(tmp_path / "out" / picture)
    with open(tmp_path / "out" / "nearest_tokens.json") as handle:
        entries = json.load(handle)
    check_nearest(entries, 6, "layer0_values", 4)
    # Llama's layer-0 values of a token depend on the token only: each virtual token finds its word
    expected = (words.tolist() * 2)[:6]
    assert [entry["tokens"][0]["id"] for entry in entries] == expected
    assert [entry["tokens"][0]["token"] for entry in entries] == [f"w{i}" for i in expected]
    assert all(entry["tokens"][0]["score"] > 0.999 for entry in entries)
    assert "deep prompts (PREFIX_TUNING), 6 virtual tokens" in capsys.readouterr().out


def test_without_a_base_model_only_the_plots_are_written(tmp_path):
    base, task = build("gpt2")  # built from a config: no folder to find it in
    model = get_ptuning_model(base, prompt_configs(7)["prefix_proj"](task))
    randomize_(model.prompt_encoder, 8)
    model.save_pretrained(tmp_path / "adapter")

    result = inspect_adapter(tmp_path / "adapter", tmp_path / "out")

    assert result.kind == "deep" and result.nearest is None and result.nearest_tokens is None
    assert sorted(os.listdir(tmp_path / "out")) == ["norms.png", "similarity.png"]
    check_png(result.similarity)
    check_png(result.norms)


def test_inspect_errors_name_the_argument(tmp_path):
    base, task = build("llama")
    model = get_ptuning_model(base, prompt_configs(4)["mlp"](task))
    model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        inspect_adapter(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(TypeError, match="`checkpoint`"):
        inspect_adapter(3, tmp_path / "out")
    with pytest.raises(TypeError, match="`output_dir`"):
        inspect_adapter(adapter, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`output_dir`.*is a file"):
        inspect_adapter(adapter, tmp_path / "file")
    with pytest.raises(ValueError, match="`top_k` must be > 0"):
        inspect_adapter(adapter, tmp_path / "out", top_k=0)
    with pytest.raises(TypeError, match="`model` must be"):
        inspect_adapter(adapter, tmp_path / "out", model=3)
    with pytest.raises(ValueError, match="`model` .* is not a local model folder"):
        inspect_adapter(adapter, tmp_path / "out", model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="`tokenizer` is needed"):
        inspect_adapter(adapter, tmp_path / "out", model=base)
    with pytest.raises(TypeError, match="`tokenizer` must be"):
        inspect_adapter(adapter, tmp_path / "out", model=base, tokenizer=5)
    names = type("Names", (), {"convert_ids_to_tokens": lambda self, ids: [str(i) for i in ids]})()
    with pytest.raises(ValueError, match=r"`top_k` \(62\) is larger than the vocabulary \(61 tokens\)"):
        inspect_adapter(adapter, tmp_path / "out", model=base, tokenizer=names, top_k=62)
    wider = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=40, num_attention_heads=4, num_hidden_layers=1,
                                 intermediate_size=20))
    with pytest.raises(ValueError, match="does not fit this model"):
        inspect_adapter(adapter, tmp_path / "out", model=wider, tokenizer=names)
    assert not os.path.exists(tmp_path / "out")  # nothing written before the arguments are checked
    with pytest.raises(SystemExit) as exit_info:
        cli(["inspect", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
