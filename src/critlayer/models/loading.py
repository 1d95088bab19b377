"""Load any language model as (model, tokenizer, blocks) from a built-in name, folder, GGUF or hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..common.distributed import launched, main_first, state
from ..common.errors import CritlayerError, first_line
from .blocks import find_blocks
from .builtin import BUILTIN_MODELS, builtin_folder
from .gguf import cached_gguf_folder

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("auto", "float32", "bfloat16")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class LanguageModel:
    """A loaded model with its tokenizer and its stack of transformer blocks."""

    name: str
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    blocks_path: str
    weights: object = None  # a SafetensorsWeights when the blocks stay on disk (block-by-block mode)

    @property
    def streamed(self) -> bool:
        return self.weights is not None

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: object = None, name: str | None = None) -> "LanguageModel":
        """Wrap a model already in memory (for example one built from a config)."""
        path, blocks = find_blocks(model)
        return cls(name or type(model).__name__, model.eval(), tokenizer, blocks, path)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype if self.streamed else next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (the first of several under a device map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def is_causal(self) -> bool:
        """Whether the model generates text (what generated probes and the loss measures need)."""
        return hasattr(self.model, "generate") and self.model.can_generate()

    @cached_property
    def attends_causally(self) -> bool:
        """Whether every attention in the blocks is causal: then no real token sees a pad after it, and a
        right-padded batch needs no attention mask. (Asked every batch, so walked once.)"""
        flags = [m.is_causal for m in self.blocks.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        return bool(flags) and all(flags)

    @property
    def block_linears(self) -> list[str]:
        """Names of the linear layers inside a block (what LoRA adapts), e.g. ``self_attn.q_proj``."""
        return [name for name, module in self.blocks[0].named_modules() if isinstance(module, linear_types())]

    def describe(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "dtype": str(self.dtype).removeprefix("torch."),
                "blocks": self.blocks_path, "block_linears": self.block_linears}


def linear_types() -> tuple[type, ...]:
    """nn.Linear, and GPT-2's Conv1D where transformers has it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 where the hardware computes in it natively, float32 elsewhere.

    That is GPUs that support bfloat16 and CPUs with AVX-512 BF16 or AMX: on this project's 2-core
    Sapphire Rapids machine a bfloat16 forward of smollm2-135m ran 2-3 x faster than float32 and chose
    the same blocks. Elsewhere float32 stays: without those instructions bfloat16 is converted in software.
    """
    if dtype not in DTYPES:
        raise CritlayerError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if computes_bfloat16(device) else torch.float32
    return getattr(torch, dtype)


def computes_bfloat16(device: str) -> bool:
    """Whether ``device`` has bfloat16 arithmetic: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
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

    >>> lm = critlayer.load("smollm2-135m")          # doctest: +SKIP
    >>> lm.num_layers, lm.blocks_path
    (30, 'model.layers')
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
    return LanguageModel(name, model, tokenizer, blocks, path, weights)

