"""Text a user hands critlayer: prompt files (``.txt``, one per line, or ``.jsonl``), and turning text into the
token ids a model reads (its special tokens, or its chat template)."""

from __future__ import annotations

import json
from pathlib import Path

from ..common.errors import CritlayerError
from ..models import LanguageModel


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` (field ``text`` or ``prompt``) file."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        if not path.exists() and not path.suffix:
            raise CritlayerError(f"unknown source {str(path)!r}: neither a built-in one nor a .txt/.jsonl file")
        raise CritlayerError(f"unsupported file type {path.suffix!r}; use .txt or .jsonl")
    if not path.is_file():
        raise CritlayerError(f"file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise CritlayerError(f"{path} is not UTF-8 text (byte {exc.start}); give a .txt file of text, one per line, "
                             "or a .jsonl file") from None
    lines = [line for line in lines if line]
    if path.suffix == ".txt":
        prompts = lines
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CritlayerError(f"{path}:{number}: not a JSON object") from None
            text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CritlayerError(f"{path}:{number}: no string field 'text' or 'prompt'")
            if text.strip():
                prompts.append(text.strip())
    if not prompts:
        raise CritlayerError(f"file is empty: {path}")
    return prompts


def tokenize(lm: LanguageModel, texts: list[str], max_tokens: int, chat_template: bool = False) -> list[list[int]]:
    """Token ids of each text with the model's special tokens (Gemma needs its BOS).

    ``max_tokens`` bounds the text; a chat template adds its own tokens around it.
    """
    tok = _tokenizer(lm)
    if not chat_template:
        return [list(ids[:max_tokens]) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    if not getattr(tok, "chat_template", None):
        raise CritlayerError(f"{lm.name} has no chat template")
    # cut the prompt, not the template: the last token stays the template's own ending
    cut = [tok.decode(ids[:max_tokens]) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    wrapped = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
               for t in cut]
    return [list(ids) for ids in tok(wrapped, add_special_tokens=False)["input_ids"]]


def _tokenizer(lm: LanguageModel):
    if lm.tokenizer is None:
        raise CritlayerError(f"{lm.name} has no tokenizer; use --probes random")
    return lm.tokenizer
