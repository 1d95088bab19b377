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


def test_the_two_step_draw_samples_the_inverse_cdf_over_the_whole_vocabulary():
    """Chunk sums, then the chunk: the token a float64 cumulative sum over the whole vocabulary finds, but where u
    falls within the float32 rounding of a chunk's sum of a boundary (vocabularies that are and are not a
    multiple of the chunk), and never a token that cannot be drawn."""
    import torch

    from critlayer.find.sampler import draw

    generator = torch.Generator().manual_seed(0)
    for vocab in (3000, 4096):
        logits = 3 * torch.randn(32, vocab, generator=generator)
        logits[:, 100:200] = float("-inf")
        same = 0
        for _ in range(20):
            u = torch.rand(32, dtype=torch.float64, generator=generator)
            cdf = torch.softmax(logits, -1).double().cumsum(-1)
            expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            drawn = draw(logits, u)
            assert not ((drawn >= 100) & (drawn < 200)).any() and drawn.max() < vocab
            same += int((drawn == expected).sum())
        assert same >= 0.99 * 20 * 32
