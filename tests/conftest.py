"""Tiny random models built from configs (no downloads), a saved model folder with a tokenizer, and text files.

``auto`` dtype is pinned to float32 in every test: bfloat16 rounds differently on every CPU and GPU, so a test
that wants bfloat16 asks for it by name.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from critlayer import LanguageModel

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 4)]

TINY = {
    "llama": lambda: transformers.LlamaConfig(num_attention_heads=2, num_key_value_heads=1),
    "gemma3": lambda: transformers.Gemma3TextConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                    sliding_window=8, layer_types=None),
    "qwen2": lambda: transformers.Qwen2Config(num_attention_heads=2, num_key_value_heads=1),
    "mistral": lambda: transformers.MistralConfig(num_attention_heads=2, num_key_value_heads=1),
    "phi3": lambda: transformers.Phi3Config(num_attention_heads=2, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=6, n_head=2, n_positions=128),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(num_attention_heads=2),
    "bert": lambda: transformers.BertConfig(num_attention_heads=2, max_position_embeddings=128),
}


def tiny_config(arch: str, layers: int = 6):
    config = TINY[arch]()
    for name, value in {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": layers, "max_position_embeddings": 128}.items():
        if hasattr(config, name) and arch != "gpt2":
            setattr(config, name, value)
    config.vocab_size = VOCAB
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    if arch == "gpt2":
        config.n_layer = layers
    if getattr(config, "layer_types", None):  # set for the default depth; keep it consistent with ours
        config.layer_types = config.layer_types[:layers]
    return config


def tiny_model(arch: str = "llama", layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch, layers)
    cls = transformers.BertModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = cls(config) if arch == "bert" else cls.from_config(config)
    return model.eval()


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def auto_dtype_is_float32(monkeypatch):
    monkeypatch.setattr("critlayer.models.loading.computes_bfloat16", lambda device: False)


@pytest.fixture
def tiny_lm():
    return LanguageModel.wrap(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder (safetensors) with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompt_lines()))
    return path


def prompt_lines(n: int = 40) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 7)) for i in range(n)]


def pairs(n: int = 60) -> list[tuple[str, str]]:
    """Prompt-reply pairs of tiny-vocabulary words."""
    return [(" ".join(WORDS[(i * 7 + j) % 50 + 6] for j in range(3 + i % 4)),
             " ".join(WORDS[(i + j) % 50 + 6] for j in range(4))) for i in range(n)]


@pytest.fixture
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in pairs()))
    return path
