"""The package's promises: no import cycle, every public function's example runs, the Python call writes what its
CLI command writes, and training runs on several processes under accelerate."""

import ast
import doctest
import inspect
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import critlayer
from critlayer.cli import main

PACKAGE = Path(critlayer.__file__).parent
FUNCTIONS = [name for name in critlayer.__all__ if inspect.isfunction(getattr(critlayer, name))]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every critlayer module ``path`` imports, at its top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_counting_imports_inside_functions():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert graph["critlayer.find.result"] and "critlayer.report" in graph["critlayer.find.result"]  # the walk sees calls


# The packages from the bottom up: a module imports from its own package or one below it, never above. ``report``
# draws results it is handed and imports nothing of critlayer's but ``common``; ``version`` sits with ``common``.
LAYERS = ["common", "report", "models", "data", "find", "train", "use", "prove", "cli"]
LAYER_OF = {"critlayer.version": "common", "critlayer.cli": "cli", "critlayer.__main__": "cli", "critlayer": "cli"}


def _layer(module: str) -> int:
    return LAYERS.index(LAYER_OF.get(module) or module.split(".")[1])


def test_packages_import_only_from_below_them():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert {LAYER_OF.get(m) or m.split(".")[1] for m in files} == set(LAYERS)  # every package has its place
    upward = [f"{name} imports {other}" for name, path in files.items() for other in _imports(path, set(files))
              if _layer(other) > _layer(name)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_public_function_has_an_example_that_runs(name, tiny_folder, prompt_file, pair_file):
    examples = doctest.DocTestFinder().find(getattr(critlayer, name), name, globs={
        "critlayer": critlayer, "model_folder": str(tiny_folder), "text_file": str(prompt_file),
        "pair_file": str(pair_file)})
    assert examples and examples[0].examples, f"critlayer.{name} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for example in examples:
        runner.run(example)
    assert runner.summarize(verbose=False).failed == 0


def _comparable(data):
    """JSON without what differs between two runs of the same work: times, memory, where it was written."""
    if isinstance(data, dict):
        return {k: _comparable(v) for k, v in data.items()
                if k not in ("timing", "seconds_per_step", "peak_memory_mb", "seconds", "speed")}
    if isinstance(data, list):
        return [_comparable(v) for v in data]
    return data


def _round_trips(result, kind, folder: Path) -> None:
    """``kind.load(folder)`` gives back the result that was saved there, as its JSON says it."""
    again = kind.load(folder)
    assert type(again) is type(result)
    saved = json.dumps(json.loads((folder / kind.FILE).read_text()))
    assert json.dumps(json.loads(json.dumps(again.to_json()))) == saved, kind.__name__
    assert again.table() == result.table(), kind.__name__
    again.save(folder.parent / f"{folder.name}-again")  # what was read back saves again, weights aside
    assert (folder.parent / f"{folder.name}-again" / kind.FILE).read_text() == (folder / kind.FILE).read_text()


def _same_outputs(cli: Path, api: Path) -> None:
    assert sorted(p.name for p in cli.iterdir()) == sorted(p.name for p in api.iterdir())
    for path in cli.rglob("*"):
        twin = api / path.relative_to(cli)
        if path.suffix == ".json" and path.name not in ("config.json", "generation_config.json"):
            assert _comparable(json.loads(path.read_text())) == _comparable(json.loads(twin.read_text())), path.name
        elif path.suffix == ".safetensors":
            theirs = load_file(twin)
            assert all(torch.equal(value, theirs[key]) for key, value in load_file(path).items()), path.name


def test_each_python_call_writes_what_its_command_writes(tiny_folder, prompt_file, pair_file, tmp_path, capsys):
    train = {"steps": 20, "lr": 1e-2, "batch_size": 4, "n_eval": 4, "max_tokens": 10, "eval_every": 10}
    flags = ["--steps", "20", "--lr", "1e-2", "--batch-size", "4", "--n-eval", "4", "--max-tokens", "10",
             "--eval-every", "10", "--quiet"]
    scan = {"probes": str(prompt_file), "n": 16, "max_tokens": 10}
    assert main(["scan", str(tiny_folder), "--probes", str(prompt_file), "--n", "16", "--probe-tokens", "10",
                 "--out", str(tmp_path / "cli-scan"), "--quiet"]) == 0
    critlayer.scan(str(tiny_folder), out=tmp_path / "api-scan", progress=False, **scan)
    _same_outputs(tmp_path / "cli-scan", tmp_path / "api-scan")
    scanned = str(tmp_path / "cli-scan")
    runs = {
        "tune": (["tune", str(tiny_folder), "--data", str(prompt_file), "--layers", "critical:2", "--scan", scanned],
                 lambda out: critlayer.tune(str(tiny_folder), str(prompt_file), "critical:2", scan=scanned, out=out,
                                            progress=False, **train)),
        "tune-compare": (["tune", str(tiny_folder), "--data", str(prompt_file), "--compare", "1,random:2", "--lora"],
                         lambda out: critlayer.tune(str(tiny_folder), str(prompt_file), compare="1,random:2",
                                                    lora=True, out=out, progress=False, **train)),
        "tune-sample": (["tune", str(tiny_folder), "--data", str(prompt_file), "--sample", "2", "--every", "5"],
                        lambda out: critlayer.tune(str(tiny_folder), str(prompt_file), sample=2, every=5, out=out,
                                                   progress=False, **train)),
        "merge": (["merge", str(tiny_folder), str(tmp_path / "cli-tune" / "model"), "--lens", "depth", "--data",
                   str(prompt_file), "--n-eval", "4", "--max-tokens", "10", "--quiet"],
                  lambda out: critlayer.merge(str(tiny_folder), str(tmp_path / "cli-tune" / "model"), lens="depth",
                                              data=str(prompt_file), n_eval=4, max_tokens=10, out=out,
                                              progress=False)),
        "validate": (["validate", str(tiny_folder), "--data", str(prompt_file), "--scan", scanned,
                      "--permutations", "50"],
                     lambda out: critlayer.validate(str(tiny_folder), str(prompt_file), scan=scanned, permutations=50,
                                                    out=out, progress=False, **train)),
        "defend": (["defend", str(tiny_folder), "--data", str(pair_file), "--compare", "none,2-3", "--trigger",
                    "w1 w2", "--target", "w3 w4"],
                   lambda out: critlayer.defend(str(tiny_folder), str(pair_file), compare="none,2-3",
                                                trigger="w1 w2", target="w3 w4", out=out, progress=False, **train)),
        "prune": (["prune", str(tiny_folder), "--data", str(prompt_file), "--scan", scanned, "--remove", "2",
                   "--n-eval", "4", "--calibration", "4", "--draws", "2", "--max-tokens", "10", "--quiet"],
                  lambda out: critlayer.prune(str(tiny_folder), remove=2, data=str(prompt_file), scan=scanned,
                                              n_eval=4, calibration=4, draws=2, max_tokens=10, out=out,
                                              progress=False)),
        "quantize": (["quantize", str(tiny_folder), "--data", str(prompt_file), "--scan", scanned, "--n-eval", "4",
                      "--calibration", "4", "--draws", "2", "--max-tokens", "10", "--no-curve", "--quiet"],
                     lambda out: critlayer.quantize(str(tiny_folder), data=str(prompt_file), scan=scanned, n_eval=4,
                                                    calibration=4, draws=2, max_tokens=10, curve=False, out=out,
                                                    progress=False)),
        "kv": (["kv", str(tiny_folder), "--data", str(prompt_file), "--scan", scanned, "--bits", "5.5", "--n-eval",
                "2", "--calibration", "2", "--draws", "2", "--max-tokens", "64", "--group", "16", "--residual", "8",
                "--chunk", "8", "--no-curve", "--quiet"],
               lambda out: critlayer.kv(str(tiny_folder), bits=5.5, data=str(prompt_file), scan=scanned, n_eval=2,
                                        calibration=2, draws=2, max_tokens=64, group=16, residual=8, chunk=8,
                                        curve=False, out=out, progress=False)),
        "compare": (["compare", scanned, str(tmp_path / "api-scan")],
                    lambda out: critlayer.compare([scanned, str(tmp_path / "api-scan")], out=out)),
    }
    reloads = {"tune": critlayer.TuneResult, "tune-compare": critlayer.TuneComparison,
               "validate": critlayer.Validation, "defend": critlayer.DefendResult, "prune": critlayer.PruneResult,
               "quantize": critlayer.QuantizeResult, "kv": critlayer.KVResult, "merge": critlayer.MergeResult,
               "tune-sample": critlayer.TuneResult}
    for name, (argv, call) in runs.items():
        extra = {"compare": [], "prune": [], "quantize": [], "kv": [], "merge": [],
                 "defend": [f.replace("--max-tokens", "--turn-tokens") for f in flags]}.get(name, flags)
        assert main([*argv, *extra, "--out", str(tmp_path / f"cli-{name}")]) == 0, name
        result = call(tmp_path / f"api-{name}")
        _same_outputs(tmp_path / f"cli-{name}", tmp_path / f"api-{name}")
        if name in reloads:
            _round_trips(result, reloads[name], tmp_path / f"api-{name}")
    _round_trips(critlayer.ScanResult.load(scanned), critlayer.ScanResult, tmp_path / "cli-scan")
    capsys.readouterr()
    assert main(["export", scanned, "--layers", "critical:2", "--format", "peft", "--out",
                 str(tmp_path / "cli-peft" / "adapter_config.json")]) == 0
    text = critlayer.export(scanned, layers="critical:2", format="peft", out=tmp_path / "api-peft" / "adapter_config.json")
    assert (tmp_path / "cli-peft" / "adapter_config.json").read_text() == text
    capsys.readouterr()
    assert main(["export", scanned, "--layers", "critical:3"]) == 0
    assert capsys.readouterr().out == critlayer.export(scanned, layers="critical:3")


def _launch_two(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """``arguments`` (a script, or ``-m critlayer ...``) on two processes. accelerate's ``--cpu`` launches one process unless mpirun is there;
    ``--multi_gpu`` starts two through torchrun, which critlayer runs over gloo on a machine without GPUs."""
    launcher = Path(sys.executable).parent / "accelerate"
    with socket.socket() as free:  # a port of its own: the default one may still be held by the last launch
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    return subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                           *arguments],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize("data, layers", [("file", "1"), ("bbc", "1"), ("file", "sample:2")])
def test_tune_on_two_processes_equals_one_process_on_the_same_batches(data, layers, tiny_folder, prompt_file,
                                                                       tmp_path):
    """A sampled run re-wraps the model for DDP at each draw: the blocks it switches to are reduced too."""
    source = str(prompt_file) if data == "file" else "bbc"
    options = ["--data", source, "--layers", layers, "--steps", "2", "--every", "1", "--lr", "1e-4", "--schedule",
               "constant", "--batch-size", "4", "--n-eval", "4", "--max-tokens", "10", "--dtype", "float32", "--quiet"]
    done = _launch_two("-m", "critlayer", "tune", str(tiny_folder), *options, "--out", str(tmp_path / "runs" / "two"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("s/step") == 1  # the main process alone reports
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two"]  # and writes: nothing else, nothing half-done
    run = json.loads((tmp_path / "runs" / "two" / "tune.json").read_text())["run"]
    assert run["processes"] == 2 and run["replicas_identical"]
    first, second = run["texts_seen"]
    assert len(first) == len(second) == 4 and not set(first) & set(second)  # two halves of each batch of 4
    assert main(["tune", str(tiny_folder), *options, "--out", str(tmp_path / "runs" / "one")]) == 0
    one, two = (load_file(tmp_path / "runs" / name / "model" / "model.safetensors") for name in ("one", "two"))
    original = load_file(tiny_folder / "model.safetensors")
    trained = tuple(f"model.layers.{block}." for block in run["layers"])
    assert layers != "sample:2" or run["draws"][0] != run["draws"][1]  # the blocks switch: DDP is wrapped again
    for key, value in original.items():  # Adam's steps are about 1e-4 here: it amplifies gradients' rounding near 0
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
        assert torch.equal(two[key], value) != key.startswith(trained), key  # the trained blocks alone changed
    for block in run["layers"]:
        name = f"model.layers.{block}.mlp.up_proj.weight"
        assert (two[name] - original[name]).abs().max() > 1e-5
    single = json.loads((tmp_path / "runs" / "one" / "tune.json").read_text())["run"]
    assert [loss for _, loss in run["heldout_loss"]] == pytest.approx([loss for _, loss in single["heldout_loss"]],
                                                                      abs=1e-5)


def test_an_error_in_work_done_on_the_main_process_ends_both(tmp_path):
    """What the main process does once (a scan for ``critical:K``) may fail there alone: the other process hears it
    and stops with the same line instead of waiting for a result that never comes."""
    script = tmp_path / "fails_on_main.py"
    script.write_text("import sys\n"
                      "from critlayer.common.distributed import is_main, on_main\n"
                      "def work():\n"
                      "    raise ValueError('no scan here')\n"
                      "try:\n"
                      "    on_main(work)\n"
                      "except Exception as error:\n"
                      "    line = f\"{'main' if is_main() else 'other'} stopped: {error}\\n\"\n"
                      "    sys.stdout.write(line)\n"  # one write: two processes share the pipe
                      "    sys.stdout.flush()\n"
                      "    raise SystemExit(2)\n")
    done = _launch_two(str(script), cwd=tmp_path)
    assert done.returncode != 0
    assert sorted(line for line in done.stdout.splitlines() if "stopped" in line) == [
        "main stopped: no scan here", "other stopped: no scan here"]
