"""critlayer merge: a fine-tune's update scaled block by block, against the definition and mergekit."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import critlayer
from critlayer import CritlayerError
from critlayer.cli import main
from critlayer.use.merge import block_scales


@pytest.fixture
def tuned_folder(tiny_folder, tmp_path):
    """The tiny model with every weight moved: a stand-in for a fine-tune of it."""
    lm = critlayer.load(str(tiny_folder))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "tuned"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_depth_scales_run_from_shallow_to_whole_and_a_score_ranks_them():
    assert block_scales("depth", 5, 0.0, None) == [0.0, 0.25, 0.5, 0.75, 1.0]
    scan = type("Scan", (), {"ranking": lambda self, score, blocks: [3, 0, 4, 1, 2]})()
    assert block_scales("delta", 5, 0.2, scan) == [0.8, 0.4, 0.2, 1.0, 0.6]  # most critical (3) kept whole


def test_the_merge_is_the_base_plus_each_blocks_scaled_update(tiny_folder, tuned_folder, prompt_file, tmp_path):
    out = tmp_path / "merged"
    result = critlayer.merge(str(tiny_folder), str(tuned_folder), lens="depth", data=str(prompt_file),
                             also_data="wiki", n_eval=4, max_tokens=10, out=out, progress=False)
    base, tuned = load_file(tiny_folder / "model.safetensors"), load_file(tuned_folder / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    scales = result.scales["depth"]
    for name, value in merged.items():
        scale = scales[int(name.split(".")[2])] if name.startswith("model.layers.") else sum(scales) / len(scales)
        torch.testing.assert_close(value, base[name] + scale * (tuned[name] - base[name]))
    assert set(result.figures) == {"base", "depth", "uniform", "fine-tune"}
    assert result.figures["base"][str(prompt_file)]["kl"] == 0 and result.figures["fine-tune"]["wiki"]["kl"] > 0
    low, high = result.figures["uniform"]["wiki"]["ratio_to_chosen"]  # paired over the texts, against depth's
    ratio = result.figures["uniform"]["wiki"]["perplexity"] / result.figures["depth"]["wiki"]["perplexity"]
    assert low <= ratio * 1.0001 and ratio <= high * 1.0001 and "ratio_to_chosen" not in result.figures["depth"]["wiki"]
    assert critlayer.MergeResult.load(out).table() == result.table()
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = yaml.safe_load((out / "mergekit.yml").read_text())
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    assert set(theirs) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(theirs[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("argv, message", [
    (["--by", "nonsense"], "unknown rule"),
    (["--shallow", "1"], "--shallow must be below 1"),
    (["--data", "wiki", "--also-data", "wiki"], "is --data itself"),
])
def test_bad_input_is_one_line_and_nothing_on_disk(argv, message, tiny_folder, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", str(tiny_folder), str(tiny_folder), "--out", str(out), "--quiet", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_a_model_of_another_shape_is_refused(tiny_folder, tmp_path, prompt_file):
    from conftest import tiny_model, tiny_tokenizer

    other = tmp_path / "other"
    tiny_model("llama", layers=4).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(CritlayerError, match="not a fine-tune"):
        critlayer.merge(str(tiny_folder), str(other), lens="depth", data=str(prompt_file), also_data="wiki",
                        n_eval=4, progress=False)
