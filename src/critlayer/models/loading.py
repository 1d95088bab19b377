"""Load any language model as (model, tokenizer, blocks) from a built-in name, folder, GGUF or hub id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..common.distributed import launched, main_first, state
from ..common.errors import CritlayerError, first_line
from .blocks import find_blocks
from .builtin import BUILTIN_MODELS, builtin_folder, builtin_gguf
from .gguf import cached_gguf_folder
from .language_model import LanguageModel

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 where the hardware computes in it natively, float32 elsewhere.

    That is GPUs that support bfloat16 and CPUs with AVX-512 BF16 or AMX, where it runs faster than float32 and
    chooses the same blocks (docs/performance.md). Elsewhere float32 stays: without those instructions bfloat16
    is converted in software, slower than float32.
    """
    if dtype not in DTYPES:
        raise CritlayerError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if computes_bfloat16(device) else torch.float32
    return getattr(torch, dtype)


def computes_bfloat16(device: str) -> bool:
    """Whether ``device`` has bfloat16 arithmetic: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX."""
    if device.startswith("cuda"):  # natively from compute capability 8 (Ampere) on; older GPUs emulate it
        index = torch.device(device).index or 0
        return index < torch.cuda.device_count() and torch.cuda.get_device_capability(index)[0] >= 8
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device.startswith("cpu") and any(check() for check in checks if check is not None)


def default_device() -> str:
    """This process's GPU under ``accelerate launch``, else the GPU if there is one, else the CPU."""
    if launched():
        return str(state().device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_folder(spec: str) -> tuple[str, str | Path]:
    """Map a model spec to a display name and something ``from_pretrained`` accepts."""
    if spec in BUILTIN_MODELS:
        with main_first():  # fetched and converted once, by the main process
            return spec, builtin_folder(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        with main_first():
            return path.stem, cached_gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CritlayerError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.name, path
    if _HUB_ID.match(spec) and not path.exists():
        return spec, spec
    names = ", ".join(BUILTIN_MODELS)
    raise CritlayerError(f"unknown model {spec!r}: not a built-in ({names}), a model folder, a .gguf file or a hub id")


def gguf_file(spec: str | None) -> Path | None:
    """The GGUF file a model spec was converted from (a built-in's verified source, or the user's file), if any."""
    if spec in BUILTIN_MODELS:
        with main_first():
            return builtin_gguf(spec)
    if spec is not None and Path(spec).suffix == ".gguf" and Path(spec).expanduser().is_file():
        return Path(spec).expanduser()
    return None


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM

    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    return AutoModelForCausalLM if causal else AutoModel


def load(spec: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None,
         trust_remote_code: bool = False, device_map: str | None = None, stream: bool = False) -> LanguageModel:
    """Load a model by built-in name, local folder, ``.gguf`` file or hub id.

    ``device_map="auto"`` lets accelerate spread the model over the GPUs and CPU there are;
    ``stream=True`` loads no block at all: a scan then reads one block at a time from the
    model folder's safetensors files (block-by-block mode, for models larger than memory).

    >>> lm = critlayer.load(model_folder)  # or "smollm2-135m", "gemma3-270m", a .gguf file, a hub id
    >>> lm.num_layers, lm.blocks_path, str(lm.dtype)
    (6, 'model.layers', 'torch.float32')
    """
    from transformers import AutoConfig, AutoTokenizer

    if stream and device_map:
        raise CritlayerError("choose block-by-block streaming or a device map, not both")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    name, source = model_folder(spec)
    if stream and not Path(source).is_dir():
        raise CritlayerError(f"block-by-block mode reads a local model folder; {spec!r} is not one")
    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if stream:
            from .stream import build_skeleton

            model, weights = build_skeleton(_model_class(config), config, Path(source), torch_dtype, device)
        else:
            placement = {"device_map": device_map} if device_map else {}
            model = _model_class(config).from_pretrained(source, config=config, dtype=torch_dtype, **placement,
                                                         **kwargs)
            model, weights = (model if device_map else model.to(device)).eval(), None
    except CritlayerError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unusable sources
        raise CritlayerError(f"cannot load model {spec!r}: {first_line(exc)}") from None
    path, blocks = find_blocks(model)
    return LanguageModel(name, model, tokenizer, blocks, path, weights, spec)


def float32_model(model: LanguageModel | str, device: str | None = None) -> LanguageModel:
    """The model given, or loaded with float32 weights: what fine-tuning trains (its ``dtype`` says what it computes
    in)."""
    return model if isinstance(model, LanguageModel) else load(model, dtype="float32", device=device)


def change_model(model: LanguageModel | str, dtype: str, device: str | None = None) -> LanguageModel:
    """The model given, or loaded with the weights pruning and quantization change: as the checkpoint stores them
    where it stores bfloat16 and the change computes in ``dtype`` bfloat16 (a float32 copy would double the memory
    and add nothing), else float32 (all a float32 checkpoint holds, and what computing in float32 needs)."""
    if isinstance(model, LanguageModel):
        return model
    device = device or default_device()
    narrow = resolve_dtype(dtype, device) == torch.bfloat16 and stored_dtype(model) == torch.bfloat16
    return load(model, dtype="bfloat16" if narrow else "float32", device=device)


def stored_dtype(spec: str) -> torch.dtype | None:
    """The dtype a model's config says its weights are stored in (None where it says none or cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder(spec)[1])
    except CritlayerError:
        raise
    except Exception:  # load() says what is wrong with the source, in one line
        return None
    stored = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)  # older releases
    return getattr(torch, stored) if isinstance(stored, str) else stored
