"""Block-by-block streaming and device maps give the scan of the model loaded whole."""

import numpy as np
import pytest

import critlayer
from critlayer.cli import main
from critlayer import CritlayerError

from conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2", "gpt2-without-prefix"])
def folder(request, tmp_path_factory):
    """Tiny checkpoints; the last names its tensors without the base model's prefix, like the hub's GPT-2."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = tiny_model(request.param.removesuffix("-without-prefix"), layers=5)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if request.param.endswith("-without-prefix"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("token_mode", ["last", "all"])
def test_streaming_gives_the_same_scan(folder, token_mode):
    options = dict(n=24, max_tokens=12, batch_size=7, token_mode=token_mode, max_rows=100, progress=False)
    whole = critlayer.scan(critlayer.load(str(folder)), probes="random", **options)
    streamed_lm = critlayer.load(str(folder), stream=True)
    assert streamed_lm.streamed and all(p.is_meta for p in streamed_lm.blocks.parameters())
    streamed = critlayer.scan(streamed_lm, probes="random", **options)
    assert streamed.critical == whole.critical
    np.testing.assert_allclose(streamed.cka, whole.cka, atol=1e-5)
    for name, values in whole.scores.items():
        np.testing.assert_allclose(streamed.scores[name], values, atol=1e-5, err_msg=name)
    assert all(p.is_meta for p in streamed_lm.blocks.parameters())  # every block went back to disk


def test_device_map_auto_gives_the_same_scan(tiny_folder):
    whole = critlayer.scan(critlayer.load(str(tiny_folder)), probes="random", n=16, max_tokens=10, progress=False)
    mapped = critlayer.scan(critlayer.load(str(tiny_folder), device_map="auto"), probes="random", n=16, max_tokens=10,
                            progress=False)
    np.testing.assert_allclose(mapped.scores["delta"], whole.scores["delta"], atol=1e-6)


def test_streaming_refuses_what_needs_the_whole_model(tiny_folder, tmp_path, capsys):
    lm = critlayer.load(str(tiny_folder), stream=True)
    for kwargs, message in [({"probes": "generated"}, "need the whole model"),
                            ({"probes": "random", "measures": "ablation", "data": "wiki"}, "need the whole model"),
                            ({"probes": "random", "token_mode": "mean"}, "token-mode last or all")]:
        with pytest.raises(CritlayerError, match=message):
            critlayer.scan(lm, n=8, max_tokens=8, progress=False, **kwargs)
    assert main(["scan", str(tiny_folder), "--stream", "--probes", "random", "--n", "8", "--out",
                 str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["scan", "smollm2-135m", "--stream", "--device-map", "auto", "--out", str(tmp_path / "e")]) == 2
    assert "not both" in capsys.readouterr().err
