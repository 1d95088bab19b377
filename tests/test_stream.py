"""Block-by-block streaming and device maps give the scan of the model loaded whole."""

import numpy as np
import pytest

import critlayer
from critlayer.cli import main
from critlayer.errors import CritlayerError

from conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_model(request.param, layers=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_streaming_gives_the_same_scan(folder, mode):
    whole = critlayer.scan(critlayer.load(str(folder)), "random", n=24, max_tokens=12, token_mode=mode,
                           batch_size=7, progress=False)
    streamed_lm = critlayer.load(str(folder), stream=True)
    assert streamed_lm.streamed and all(p.is_meta for p in streamed_lm.blocks.parameters())
    streamed = critlayer.scan(streamed_lm, "random", n=24, max_tokens=12, token_mode=mode, batch_size=7,
                              progress=False)
    assert streamed.critical == whole.critical
    np.testing.assert_allclose(streamed.cka, whole.cka, atol=1e-5)
    for name, values in whole.scores.items():
        np.testing.assert_allclose(streamed.scores[name], values, atol=1e-5, err_msg=name)
    assert all(p.is_meta for p in streamed_lm.blocks.parameters())  # every block went back to disk


def test_device_map_auto_gives_the_same_scan(tiny_folder):
    whole = critlayer.scan(critlayer.load(str(tiny_folder)), "random", n=16, max_tokens=10, progress=False)
    mapped = critlayer.scan(critlayer.load(str(tiny_folder), device_map="auto"), "random", n=16, max_tokens=10,
                            progress=False)
    np.testing.assert_allclose(mapped.scores["delta"], whole.scores["delta"], atol=1e-6)


def test_streaming_refuses_what_needs_the_whole_model(tiny_folder, tmp_path, capsys):
    lm = critlayer.load(str(tiny_folder), stream=True)
    for kwargs, message in [({"probes": "generated"}, "need the whole model"),
                            ({"probes": "random", "measures": "ablation", "data": "wiki"}, "need the whole model"),
                            ({"probes": "random", "token_mode": "all"}, "last or mean")]:
        with pytest.raises(CritlayerError, match=message):
            critlayer.scan(lm, n=8, max_tokens=8, progress=False, **kwargs)
    assert main(["scan", str(tiny_folder), "--stream", "--probes", "random", "--n", "8", "--out",
                 str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["scan", "smollm2-135m", "--stream", "--device-map", "auto", "--out", str(tmp_path / "e")]) == 2
    assert "not both" in capsys.readouterr().err
