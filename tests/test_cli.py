"""The command line: a full scan of a saved tiny model, compare, and one-line errors for bad input."""

import json

import pytest

from critlayer.cli import main

OUTPUTS = ("scan.json", "layers.csv", "cka.png", "profile.png", "report.html")


def _scan(folder, out, *extra):
    return main(["scan", str(folder), "--n", "12", "--probe-tokens", "12", "--out", str(out), "--quiet", *extra])


def test_scan_writes_every_output_and_compare_reads_them(tiny_folder, tmp_path, capsys, prompt_file):
    assert _scan(tiny_folder, tmp_path / "a") == 0
    assert _scan(tiny_folder, tmp_path / "b", "--probes", str(prompt_file), "--token-mode", "all", "--k", "2") == 0
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).stat().st_size > 0
    data = json.loads((tmp_path / "b" / "scan.json").read_text())
    for key in ("model", "probes", "layers", "cka", "scores", "critical", "selection", "timing", "versions"):
        assert key in data
    assert data["model"]["num_layers"] == 6 and len(data["cka"]) == 6
    assert len(data["critical"]) == 2 and data["selection"]["rule"] == "top-k"
    assert data["probes"]["token_mode"] == "all" and data["probes"]["source"] == str(prompt_file)
    assert "critical layers of" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "scan.json"), "--out", str(tmp_path / "c")]) == 0
    comparison = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert comparison["spearman"][0][0] == pytest.approx(1.0)
    assert (tmp_path / "c" / "compare.png").stat().st_size > 0


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("critlayer: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--probes", "missing.txt"], "not found"),
    (["--probes", "bad.csv"], "unsupported"),
    (["--n", "3"], "--n must be at least 4"),
    (["--max-n", "10"], "--max-n must be at least 64"),
    (["--k", "7"], "larger than the 6 layers"),
    (["--probe-tokens", "1"], "--probe-tokens must be at least 2"),
    (["--measures", "cka,nope"], "unknown measure"),
])
def test_bad_scan_options(tiny_folder, tmp_path, capsys, extra, message):
    (tmp_path / "bad.csv").write_text("x")
    err = _error(capsys, ["scan", str(tiny_folder), "--n", "4", "--out", str(tmp_path / "out"), "--quiet",
                          *[str(tmp_path / e) if e.endswith((".txt", ".csv")) else e for e in extra]])
    assert message in err
    short = tmp_path / "four.txt"
    short.write_text("one text\nanother text\na third\na fourth\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "p{i}", "reply": "r{i}"}}\n' for i in range(5)))
    for argv, message in [(["prune", "no-such-model", "--data", str(short), "--n-eval", "4"], "at least 5"),
                          (["quantize", "no-such-model", "--data", str(short), "--n-eval", "4"], "at least 5"),
                          (["defend", "no-such-model", "--data", str(pairs), "--n-eval", "5"], "hold out 5")]:
        assert message in _error(capsys, [*argv, "--out", str(tmp_path / "out")]), argv
    assert "--seed must be at least 0" in _error(capsys, ["export", str(tmp_path / "nowhere"), "--seed", "-1"])
    assert not (tmp_path / "out").exists()


def test_empty_probe_file_and_probes_without_variance(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "empty" in _error(capsys, ["scan", str(tiny_folder), "--probes", str(empty), "--out", str(tmp_path / "o")])
    same = tmp_path / "same.txt"
    same.write_text("\n".join(["w1 w2"] * 5))
    assert "identical" in _error(capsys, ["scan", str(tiny_folder), "--probes", str(same), "--out", str(tmp_path / "o"),
                                          "--quiet"])
    assert not (tmp_path / "o").exists()


def test_unknown_model_and_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRITLAYER_HOME", str(tmp_path / "home"))
    assert "unknown model" in _error(capsys, ["scan", "no-such-model", "--out", str(tmp_path / "o")])
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 13)
    assert "cannot read GGUF" in _error(capsys, ["scan", str(bad), "--out", str(tmp_path / "o")])
    assert "no such GGUF" in _error(capsys, ["scan", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    assert not any((tmp_path / "home" / "models").glob("gguf-*/config.json"))


def test_existing_scan_needs_force(tiny_folder, tmp_path, capsys):
    assert _scan(tiny_folder, tmp_path / "o") == 0
    before = (tmp_path / "o" / "scan.json").read_text()
    assert "--force" in _error(capsys, ["scan", str(tiny_folder), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "scan.json").read_text() == before
    assert _scan(tiny_folder, tmp_path / "o", "--force", "--seed", "1") == 0
    assert (tmp_path / "o" / "scan.json").read_text() != before


def test_usage_errors_and_unreadable_scans_are_one_line(tmp_path, capsys):
    assert "--seed" in _error(capsys, ["scan", "--seed", "-1"])
    assert "--window" in _error(capsys, ["scan", "--window", "0"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "scan.json").write_text("[1, 2]")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "scan.json").write_bytes(b"\xff\xfe\x00")
    assert "not a critlayer scan" in _error(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "no scan found" in _error(capsys, ["compare", str(tmp_path / "missing"), str(tmp_path / "b")])


def test_tune_and_validate_commands(tiny_folder, tmp_path, capsys, prompt_file):
    _scan(tiny_folder, tmp_path / "scan")
    common = ["--data", str(prompt_file), "--steps", "20", "--lr", "1e-2", "--batch-size", "4", "--n-eval", "4",
              "--max-tokens", "10", "--scan", str(tmp_path / "scan" / "scan.json"), "--quiet"]
    assert main(["tune", str(tiny_folder), "--layers", "critical:2", "--out", str(tmp_path / "t"), *common]) == 0
    tuned = json.loads((tmp_path / "t" / "tune.json").read_text())
    scan = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert len(tuned["run"]["layers"]) == 2 and (tmp_path / "t" / "model" / "model.safetensors").exists()
    assert set(tuned["run"]["layers"]) <= set(scan["selection"]["params"]["eligible"])
    assert main(["tune", str(tiny_folder), "--compare", "critical:1,random:1", "--lora",
                 "--out", str(tmp_path / "c"), *common]) == 0
    assert "held-out loss before tuning" in (tmp_path / "c" / "compare.txt").read_text()
    assert main(["validate", str(tiny_folder), "--tuned", str(tmp_path / "t" / "model"), "--out", str(tmp_path / "v"),
                 *common]) == 0
    assert json.loads((tmp_path / "v" / "validate.json").read_text())["train"]["tuned"] == "given checkpoint"
    assert "unknown block 9" in _error(capsys, ["tune", str(tiny_folder), "--layers", "1,9",
                                                "--out", str(tmp_path / "e"), *common])
    assert not (tmp_path / "e").exists()


def test_validate_refuses_a_diverging_finetune_in_one_line_and_writes_nothing(tiny_folder, tmp_path, capsys,
                                                                            prompt_file):
    _scan(tiny_folder, tmp_path / "scan")
    err = _error(capsys, ["validate", str(tiny_folder), "--data", str(prompt_file), "--steps", "3", "--lr", "1e30",
                          "--batch-size", "4", "--n-eval", "4", "--max-tokens", "10", "--quiet",
                          "--scan", str(tmp_path / "scan"), "--out", str(tmp_path / "v")])
    assert "fine-tuning diverged" in err and "--lr" in err
    assert not (tmp_path / "v").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v")]


def test_every_measure_from_the_cli_and_export_in_three_formats(tiny_folder, tmp_path, capsys, prompt_file):
    from peft import LoraConfig

    assert _scan(tiny_folder, tmp_path / "s", "--probes", str(prompt_file), "--measures", "all", "--ablate",
                 "block,mlp", "--score", "consensus", "--bootstrap", "10", "--text-n", "8") == 0
    data = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert {"ablation", "ablation_mlp", "gradient", "weight_snr", "token_nmi_drop", "consensus", "p_critical"} <= set(data["scores"])
    assert data["consensus"]["text"]["n"] == 8 and data["consensus"]["weights_read_from"] == "loaded parameters"
    assert (tmp_path / "s" / "measures.png").stat().st_size > 0
    capsys.readouterr()
    scan_file = str(tmp_path / "s" / "scan.json")
    assert main(["export", scan_file, "--layers", "critical:3"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top) == 3 and set(data["firmness"]["firm"]) <= set(top)  # firm blocks first
    assert main(["export", scan_file, "--layers", "critical:2", "--score", "ablation", "--format", "peft",
                 "--out", str(tmp_path / "adapter" / "adapter_config.json")]) == 0
    config = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    blocks = sorted({int(t.split(".")[2]) for t in config.target_modules})
    assert len(blocks) == 2 and len(config.target_modules) == 2 * 7 and config.task_type == "CAUSAL_LM"
    assert main(["export", scan_file, "--layers", "1,3", "--format", "axolotl"]) == 0
    yaml = capsys.readouterr().out
    assert "unfrozen_parameters:\n  - '^model\\.layers\\.1\\..*'\n  - '^model\\.layers\\.3\\..*'" in yaml
    assert main(["measures"]) == 0 and "needs text" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--measures", "cka,ablation", "--probes", "random"], "random probes have none"),
    (["--measures", "nope"], "unknown measure nope"),
    (["--data", "bbc"], "--data is only read by"),
    (["--measures", "ablation", "--ablate", "ffn"], "unknown part"),
    (["--measures", "gradient", "--data", "missing.txt"], "not found"),
])
def test_bad_measure_options_are_one_line(tiny_folder, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / e) if e.endswith(".txt") else e for e in extra]
    assert message in _error(capsys, ["scan", str(tiny_folder), "--n", "4", "--out", str(tmp_path / "o"), "--quiet", *extra])
    assert not (tmp_path / "o").exists()


def test_bad_input_is_refused_in_one_line_before_any_model_work(tiny_folder, tmp_path, capsys):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(256)) * 16)
    missing = str(tmp_path / "missing.txt")
    # a model that does not exist: had it been loaded first, the error would be about the model
    for argv, message in [(["prune", "no-such-model", "--data", str(noise)], "not UTF-8 text"),
                          (["prune", "no-such-model", "--data", missing], "file not found"),
                          (["tune", "no-such-model", "--data", missing], "file not found"),
                          (["validate", "no-such-model", "--data", missing], "file not found"),
                          (["defend", "no-such-model", "--data", str(tmp_path / "missing.jsonl")], "file not found"),
                          (["scan", "no-such-model", "--measures", "all", "--data", missing], "file not found"),
                          (["scan", "no-such-model", "--probes", str(noise)], "not UTF-8 text"),
                          (["scan", str(tiny_folder), "--window", "100"], "--window 100 does not fit the 6 blocks")]:
        assert message in _error(capsys, [*argv, "--out", str(tmp_path / "out")]), argv
    assert not (tmp_path / "out").exists()


def _flags(parser) -> dict[str, dict[str, tuple]]:
    """Every visible flag of every command: what kind of value it takes, and what its help says before its default
    and any ``;`` note of the command's own."""
    import argparse

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    out: dict[str, dict[str, tuple]] = {}
    for name, sub in commands.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings or action.dest == "help":
                continue
            kind = (type(action).__name__, action.nargs, getattr(action.type, "__name__", None),
                    tuple(action.choices or ()))
            meaning = action.help.split(" (default")[0].split(";")[0]
            out.setdefault(action.option_strings[0], {})[name] = (kind, meaning)
    return out


# Flags whose text names what the command itself reads or writes: the same kind of value, said in its own words.
CONTEXTUAL = {"--data", "--score", "--scan", "--measures", "--edges", "--batch-size", "--out", "--bits", "--widths",
              "--no-curve", "--also-data", "--by"}


def test_one_flag_one_meaning_across_commands():
    from critlayer.cli import build_parser

    for flag, by_command in _flags(build_parser()).items():
        kinds = {kind for kind, _ in by_command.values()}
        assert len(kinds) == 1, f"{flag} takes different values: {by_command}"
        if flag not in CONTEXTUAL:
            meanings = {meaning for _, meaning in by_command.values()}
            assert len(meanings) == 1, f"{flag} means different things: {by_command}"


def test_old_flag_spellings_still_work_with_a_warning(tiny_folder, tmp_path, capsys):
    assert main(["scan", str(tiny_folder), "--n", "12", "--max-tokens", "12", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert "--max-tokens is deprecated" in capsys.readouterr().err
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["probes"]["max_tokens"] == 12


def test_old_python_keywords_still_work_with_a_warning():
    from critlayer import QuantizeConfig

    with pytest.warns(DeprecationWarning, match="family"):
        assert QuantizeConfig(format="int", bits=3).family == "int"


def _planned(err: str, command: str) -> dict[str, int]:
    """The phases and forward tokens a command's plan line named."""
    import re

    line = next(line for line in err.splitlines() if line.startswith(f"critlayer: {command} of "))
    phases = [re.fullmatch(r"(.+?) (?:at most )?([\d,]+) in [\d,]+ \w+", part)
              for part in line[line.index("(") + 1:line.rindex(")")].split("; ")]
    return {m.group(1): int(m.group(2).replace(",", "")) for m in phases}


def test_every_long_command_says_what_it_will_cost_before_it_starts(tiny_folder, prompt_file, pair_file, tmp_path,
                                                                     capsys):
    import critlayer

    scanned = critlayer.scan(str(tiny_folder), probes=str(prompt_file), n=16, max_tokens=12, out=tmp_path / "s")
    assert _planned(capsys.readouterr().err, "scan")["capture"] == round(
        scanned.probes["n"] * scanned.probes["mean_tokens"])
    pruned = critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), scan=scanned, n_eval=4,
                             calibration=4, draws=2, max_tokens=10)
    planned = _planned(capsys.readouterr().err, "prune")
    longest = max(pruned.methods["sleb"].cost)
    assert planned["sleb"] == pruned.methods["sleb"].cost[longest]["forward_tokens"]
    quantized = critlayer.quantize(str(tiny_folder), bits=5, widths="Q4_0,Q5_0,Q8_0", data=str(prompt_file),
                                   scan=scanned, n_eval=4, calibration=4, draws=2, max_tokens=10)
    assert _planned(capsys.readouterr().err, "quantization")["sensitivity"] == quantized.sensitivity["cost"][
        "forward_tokens"]
    train = {"steps": 3, "batch_size": 4, "n_eval": 4, "max_tokens": 10, "eval_every": 2}
    critlayer.tune(str(tiny_folder), str(prompt_file), "1", scan=scanned, **train)
    assert {"training", "held-out loss"} <= set(_planned(capsys.readouterr().err, "tune"))
    critlayer.defend(str(tiny_folder), str(pair_file), "2-3", trigger="w1 w2", target="w3 w4", **train)
    assert {"training", "replies", "clean loss"} <= set(_planned(capsys.readouterr().err, "defence"))
