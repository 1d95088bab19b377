"""critlayer: find the critical layers of any Hugging Face language model, without task data."""

__version__ = "0.1.0"

from .compare import compare  # noqa: E402
from .errors import CritlayerError  # noqa: E402
from .models import LanguageModel, load  # noqa: E402
from .probes import Probes, make_probes  # noqa: E402
from .result import ScanResult  # noqa: E402
from .scan import scan  # noqa: E402

__all__ = ["CritlayerError", "LanguageModel", "Probes", "ScanResult", "compare", "load", "make_probes", "scan"]
