"""Loading models: built-in names, folders, GGUF files and hub ids; finding their blocks."""

from .blocks import find_blocks
from .builtin import BUILTIN_MODELS, builtin_folder
from .load import DEFAULT_MODEL, LanguageModel, load

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LanguageModel", "builtin_folder", "find_blocks", "load"]
