"""Every supported architecture, built tiny from its config, scans end to end and reloads."""

import numpy as np
import pytest
import torch

from critlayer import LanguageModel, ScanResult, scan
from critlayer.models.loading import resolve_dtype
from critlayer.find.probes import Probes, random_probes

from conftest import TINY, tiny_model

EXPECTED_BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "bert": "encoder.layer"}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_scan_end_to_end(arch, tmp_path):
    lm = LanguageModel.wrap(tiny_model(arch), name=f"tiny-{arch}")
    assert lm.blocks_path == EXPECTED_BLOCKS.get(arch, "model.layers")
    probes = Probes("random", random_probes(lm, 12, 16, 0))
    result = scan(lm, probes=probes, token_mode="all", progress=False, batch_size=5)
    L = lm.num_layers
    assert result.cka.shape == (L, L)
    np.testing.assert_allclose(np.diag(result.cka), 1.0, atol=1e-5)
    assert set(result.scores) == {"delta", "block_influence", "angular_distance",
                                  "spectral_k1", "spectral_k3", "spectral_k10", "consensus"}  # no bootstrap by default
    assert all(len(v) == L and np.isfinite(v).all() for v in result.scores.values())
    assert all(0 <= i < L for i in result.selection.critical) and result.selection.reason
    result.save(tmp_path / "out")
    for name in ("scan.json", "layers.csv", "cka.png", "profile.png", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    again = ScanResult.load(tmp_path / "out")
    assert again.critical == result.critical
    np.testing.assert_allclose(again.cka, result.cka, atol=1e-7)
    np.testing.assert_allclose(again.scores["delta"], result.scores["delta"], atol=1e-7)


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_in_it(monkeypatch):
    monkeypatch.undo()  # the suite pins auto to float32; this test asks the hardware checks themselves
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                        (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert resolve_dtype("auto", "cpu") == expected
        assert resolve_dtype("float32", "cpu") == torch.float32  # float32 on request
        assert resolve_dtype("auto", "mps") == torch.float32
