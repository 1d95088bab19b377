"""Probe sources and their errors."""

import json

import pytest

from critlayer import CritlayerError
from critlayer.find.probes import make_probes, read_prompt_file


def test_txt_and_jsonl_files(tmp_path, tiny_lm):
    txt = tmp_path / "p.txt"
    txt.write_text("w1 w2 w3\n\nw4 w5\n")
    assert read_prompt_file(txt) == ["w1 w2 w3", "w4 w5"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"prompt": "w3 w4 w5"}) + "\n")
    probes = make_probes(tiny_lm, str(jsonl), max_tokens=3)
    assert probes.token_ids == [[1, 5, 6], [1, 7, 8]]  # BOS added, truncated to max_tokens


@pytest.mark.parametrize("content,suffix,message", [
    (None, ".txt", "not found"), ("", ".txt", "empty"), ("a,b", ".csv", "unsupported"),
    ("{bad", ".jsonl", "not a JSON object"), ('{"other": 1}', ".jsonl", "no string field"),
])
def test_bad_probe_files(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CritlayerError, match=message):
        read_prompt_file(path)


def test_unknown_source_and_too_few_samples(tiny_lm):
    with pytest.raises(CritlayerError, match="unknown probe source"):
        make_probes(tiny_lm, "nonsense")
    with pytest.raises(CritlayerError, match="at least 2"):
        make_probes(tiny_lm, "random", n=1)


def test_generated_and_random_probes_are_seeded(tiny_lm):
    a = make_probes(tiny_lm, "generated", n=5, max_tokens=8, seed=3, progress=False)
    b = make_probes(tiny_lm, "generated", n=5, max_tokens=8, seed=3, progress=False)
    c = make_probes(tiny_lm, "generated", n=5, max_tokens=8, seed=4, progress=False)
    assert a.token_ids == b.token_ids != c.token_ids
    assert all(ids[0] == 1 and 2 <= len(ids) <= 8 for ids in a.token_ids)
    r = make_probes(tiny_lm, "random", n=4, max_tokens=6, seed=1)
    assert r.token_ids == make_probes(tiny_lm, "random", n=4, max_tokens=6, seed=1).token_ids
    assert all(len(ids) == 6 and ids[0] == 1 and not {0, 1, 2, 3} & set(ids[1:]) for ids in r.token_ids)
