"""The commands on a GPU, against the same work on the CPU: skipped where there is no CUDA device (as on the CI
machines), run wherever there is one."""

import numpy as np
import pytest
import torch

import critlayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SCAN = {"n": 16, "max_tokens": 12, "progress": False}


def test_a_scan_on_the_gpu_measures_what_the_cpu_measures(tiny_folder, prompt_file):
    gpu = critlayer.scan(str(tiny_folder), probes=str(prompt_file), device="cuda", dtype="float32", **SCAN)
    cpu = critlayer.scan(str(tiny_folder), probes=str(prompt_file), device="cpu", dtype="float32", **SCAN)
    assert np.allclose(gpu.scores["delta"], cpu.scores["delta"], atol=1e-4)
    assert gpu.critical == cpu.critical


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_default_scan_writes_and_captures_its_probes_on_the_gpu(tiny_folder, dtype):
    result = critlayer.scan(str(tiny_folder), device="cuda", dtype=dtype, max_n=128, progress=False)
    assert result.probes["source"] == "generated" and np.isfinite(result.scores["delta"]).all()
    assert result.firmness is not None and len(result.firmness.replication) == len(result.layers)


def test_prune_and_quantize_on_the_gpu(tiny_folder, prompt_file, tmp_path):
    scanned = critlayer.scan(str(tiny_folder), probes=str(prompt_file), device="cuda", **SCAN)
    pruned = critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), scan=scanned, n_eval=4,
                             calibration=4, draws=2, max_tokens=10, device="cuda", progress=False,
                             out=tmp_path / "pruned")
    assert np.isfinite(pruned.reference["perplexity"]) and len(pruned.kept) == 4
    quantized = critlayer.quantize(str(tiny_folder), bits=5, widths="Q4_0,Q5_0,Q8_0", data=str(prompt_file),
                                   scan=scanned, n_eval=4, calibration=4, draws=2, max_tokens=10, device="cuda",
                                   progress=False)
    assert np.isfinite(quantized.reference["perplexity"]) and quantized.bits_per_weight <= 5


def test_tune_and_defend_on_the_gpu(tiny_folder, prompt_file, pair_file):
    train = {"steps": 4, "batch_size": 4, "n_eval": 6, "max_tokens": 10, "eval_every": 2, "device": "cuda",
             "progress": False}
    tuned = critlayer.tune(str(tiny_folder), str(prompt_file), "1,3", lr=1e-3, **train)
    assert tuned.run.layers == [1, 3] and np.isfinite(tuned.run.loss_after)
    defended = critlayer.defend(str(tiny_folder), str(pair_file), "2-3", trigger="w1 w2", target="w3 w4", **train)
    assert list(defended.outcomes) == ["pre-trained", "2-3"]
