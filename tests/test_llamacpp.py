"""llama.cpp as an engine: what ``--llamacpp`` and llama.cpp's own types refuse, in one line, without writing
anything; and with the llamacpp extra (``make test-llamacpp`` builds it) llama.cpp's quantizer, and the GGUFs prune
and quantize write (K-quants among them), run by llama.cpp against transformers on the same weights."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import critlayer
from critlayer.common.errors import CritlayerError
from critlayer.data.text import load_data
from critlayer.models.llamacpp import quantize_rows
from critlayer.use.llamacpp_check import check_in_llamacpp
from critlayer.use.prune import PruneConfig
from critlayer.use.quantizers import width

# llama.cpp rounds activations to 8 bits in its quantized dot products; measured here: KL 0.004-0.005, top-1 0.94-0.96,
# perplexity within 1.1% of transformers on the same weights; the test shows other weights fall far outside them.
KL_TOLERANCE, TOP1_TOLERANCE, PERPLEXITY_TOLERANCE = 0.02, 0.9, 0.03
needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="the llamacpp extra is not installed (make test-llamacpp)")


def test_without_the_extra_llamacpp_ends_in_one_line_naming_it(monkeypatch, tiny_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the extra imports
    with pytest.raises(CritlayerError, match=r"pip install 'critlayer\[llamacpp\]'"):
        critlayer.prune(tiny_folder, remove=1, llamacpp=True, out=tmp_path / "pruned", progress=False)
    assert not (tmp_path / "pruned").exists()


def test_without_the_extra_llama_cpps_own_types_end_in_one_line_naming_it(monkeypatch, tiny_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(CritlayerError, match=r"pip install 'critlayer\[llamacpp\]'"):
        critlayer.quantize(tiny_folder, bits=4.5, widths="Q3_K/Q8_0,Q4_0", out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_llama_cpps_quantizer_is_never_called_on_what_it_would_write_past_or_abort_on():
    with pytest.raises(CritlayerError, match="blocks of 256"):
        quantize_rows(np.zeros((2, 576)), "Q2_K")
    with pytest.raises(CritlayerError, match="importance matrix of shape"):
        quantize_rows(np.zeros((2, 512)), "Q2_K", np.ones(256))
    with pytest.raises(CritlayerError, match="only with an importance matrix"):
        quantize_rows(np.zeros((2, 512)), "IQ2_XS")


@pytest.mark.llamacpp
@needs_llamacpp
def test_llama_cpps_quantizer_stores_what_its_types_say():
    import gguf

    torch.manual_seed(0)
    rows = torch.randn(16, 512)
    for kind in ("Q4_0", "Q8_0"):  # both are llama.cpp's rule: the same bytes from either
        assert np.array_equal(quantize_rows(rows.numpy(), kind),
                              gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType[kind]))
    errors = [float((width(k).roundtrip(rows) - rows).pow(2).mean()) for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert errors == sorted(errors, reverse=True)
    importance = torch.rand(512) ** 4  # a few inputs matter most

    def weighted_error(name: str) -> float:
        return float(((width(name).roundtrip(rows, importance) - rows).pow(2) * importance).sum())

    assert weighted_error("Q3_K-imatrix") < weighted_error("Q3_K")
    with pytest.raises(CritlayerError, match="measure one first"):
        width("Q3_K-imatrix").roundtrip(rows)


def test_llamacpp_is_refused_where_no_gguf_is_written(tiny_folder):
    with pytest.raises(CritlayerError, match="whole blocks go without healing"):
        PruneConfig(llamacpp=True, parts="attn")
    with pytest.raises(CritlayerError, match="choose --family gguf"):
        critlayer.quantize(tiny_folder, bits=3.3, llamacpp=True, progress=False)


@pytest.mark.llamacpp
@pytest.mark.integration
@needs_llamacpp
def test_written_ggufs_compute_in_llamacpp_as_in_transformers(tmp_path):
    smollm2 = critlayer.load("smollm2-135m", dtype="float32")
    scanned = critlayer.scan(smollm2, probes="wiki", n=16, max_tokens=32, progress=False, measures="influence")
    common = {"n_eval": 8, "calibration": 4, "baselines": False, "dtype": "float32", "scan": scanned,
              "llamacpp": True, "progress": False}
    pruned = critlayer.prune(smollm2, remove=3, candidates=0, out=tmp_path / "pruned", **common)
    quantized = critlayer.quantize(smollm2, bits=4.5, score="block_influence", curve=False, out=tmp_path / "q",
                                   **common)
    k_quants = critlayer.quantize(smollm2, bits=4.0, widths="Q2_K-imatrix/MXFP4,MXFP4,Q4_0", score="block_influence",
                                  curve=False, out=tmp_path / "k", **common)
    assert k_quants.exports["tensor_types"]["types"]["Q2_K"] > 0  # the 1,536-wide ffn_down of blocks at Q2_K
    assert "hold their planned types" in k_quants.exports["gguf"]["read_back"]
    saved = (json.loads((tmp_path / "pruned" / "prune.json").read_text())["gguf"]["llamacpp"],
             json.loads((tmp_path / "q" / "quantize.json").read_text())["exports"]["gguf"]["llamacpp"],
             json.loads((tmp_path / "k" / "quantize.json").read_text())["exports"]["gguf"]["llamacpp"])
    checks = (pruned.gguf["llamacpp"], quantized.exports["gguf"]["llamacpp"], k_quants.exports["gguf"]["llamacpp"])
    for check, reloaded in zip(checks, saved):
        assert check == reloaded and check["texts"] == 8 and check["tokens"] > 500
        assert check["kl"] < KL_TOLERANCE and check["top1"] > TOP1_TOLERANCE
        assert abs(check["perplexity"] / check["transformers_perplexity"] - 1) < PERPLEXITY_TOLERANCE
    assert quantized.exports["gguf"]["llamacpp"]["transformers_perplexity"] == pytest.approx(
        quantized.methods["block_influence"].perplexity[4.5][0], rel=1e-3)
    heldout = load_data(smollm2, "wiki", n_eval=8, max_tokens=128).heldout
    unpruned = check_in_llamacpp(smollm2, heldout, tmp_path / "pruned" / "model.gguf")  # not the same weights
    assert unpruned["kl"] > 10 * KL_TOLERANCE and unpruned["top1"] < TOP1_TOLERANCE
