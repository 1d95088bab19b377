"""Models: loading them (built-in names, folders, GGUF files, hub ids), finding their blocks, running those
blocks (``running``), cutting them (``surgery``), streaming them from disk, and their next-token loss."""

from .blocks import find_blocks
from .builtin import BUILTIN_MODELS, builtin_folder
from .language_model import LanguageModel
from .loading import DEFAULT_MODEL, load

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LanguageModel", "builtin_folder", "find_blocks", "load"]
