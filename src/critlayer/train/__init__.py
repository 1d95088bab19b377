"""Fine-tune chosen blocks only (full weights or LoRA) on accelerate: below ``use`` (tune, defend, prune's healing)
and ``prove`` (validate), which both train."""

from .finetune import TrainConfig, TrainRun, finetune
from .targets import freeze_except, lora_config, unfrozen_parameters

__all__ = ["TrainConfig", "TrainRun", "finetune", "freeze_except", "lora_config", "unfrozen_parameters"]
