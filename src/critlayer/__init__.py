"""critlayer: find the critical layers of any Hugging Face language model, without task data, and put them to work.

One call per command of the CLI: ``load``, ``scan``, ``compare``, ``export``, ``tune``, ``validate``, ``defend``,
``prune``, ``quantize``, ``kv`` (and ``kv_cache``, a planned cache for ``generate``), ``merge``.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):  # torchao, imported by transformers too, warns of GPU kernels
    logging.getLogger(_name).setLevel(logging.ERROR)

from .common.errors import CritlayerError
from .find.config import ScanConfig
from .find.probes import Probes, make_probes
from .find.result import ScanResult
from .find.scan import scan
from .models import LanguageModel, load
from .prove.compare import Comparison, compare
from .prove.validate import Validation, validate
from .train.finetune import TrainConfig
from .use.defend import DefendConfig, DefendResult, defend
from .use.export import export
from .use.kv import KVConfig, KVResult, kv, kv_cache
from .use.merge import MergeConfig, MergeResult, merge
from .use.prune import PruneConfig, PruneResult, prune
from .use.quantize import QuantizeConfig, QuantizeResult, quantize
from .use.tune import TuneComparison, TuneResult, tune
from .version import __version__

__all__ = ["Comparison", "CritlayerError", "DefendConfig", "DefendResult", "KVConfig", "KVResult", "LanguageModel",
           "MergeConfig", "MergeResult", "Probes", "PruneConfig", "PruneResult", "QuantizeConfig", "QuantizeResult",
           "ScanConfig", "ScanResult", "TrainConfig", "TuneComparison", "TuneResult", "Validation", "__version__",
           "compare", "defend", "export", "kv", "kv_cache", "load", "make_probes", "merge", "prune", "quantize", "scan",
           "tune", "validate"]
