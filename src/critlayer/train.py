"""Causal-LM fine-tuning of chosen blocks only (full weights or LoRA), with held-out loss.

Frozen parameters never require gradients and the optimizer is built from trainable
parameters only, so frozen blocks hold neither gradients nor optimizer state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TextData, collate
from .layers import freeze_except, lora_config
from .measures.loss import batch_losses
from .memory import PeakMemory
from .models import LanguageModel


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float | None = None  # default: 1e-4 for full weights, 1e-3 for LoRA
    batch_size: int = 8
    eval_every: int = 20
    eval_batch_size: int = 8
    seed: int = 0
    lora: bool = False
    lora_r: int = 8

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora else 1e-4)


@dataclass
class TrainRun:
    """What one fine-tuning run did and measured."""

    layers: list[int]
    trainable_parameters: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    heldout_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds_per_step: float = 0.0
    peak_memory_mb: float = 0.0

    @property
    def loss_before(self) -> float:
        return self.heldout_loss[0][1]

    @property
    def loss_after(self) -> float:
        return self.heldout_loss[-1][1]

    def as_dict(self) -> dict:
        return {"layers": self.layers, "trainable_parameters": self.trainable_parameters,
                "heldout_loss_before": self.loss_before, "heldout_loss_after": self.loss_after,
                "train_loss": self.train_loss, "heldout_loss": self.heldout_loss,
                "seconds_per_step": self.seconds_per_step, "peak_memory_mb": self.peak_memory_mb}


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, sequences: list[list[int]], starts: list[int] | None = None,
                    batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's summed next-token loss and number of predicted tokens, in small batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    for first in range(0, len(sequences), batch_size):
        batch = collate(sequences[first:first + batch_size], device,
                        None if starts is None else starts[first:first + batch_size])
        loss, tokens = batch_losses(model, batch)
        sums.append(loss.double().cpu())
        counts.append(tokens.cpu())
    model.train(was_training)
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def heldout_loss(model: torch.nn.Module, sequences: list[list[int]], batch_size: int = 8,
                 starts: list[int] | None = None) -> float:
    """Mean next-token loss per predicted token."""
    sums, counts = sequence_losses(model, sequences, starts, batch_size)
    return float(sums.sum() / counts.sum())


def prepare(lm: LanguageModel, model: torch.nn.Module, layers: list[int], config: TrainConfig):
    """Freeze all but ``layers`` (or wrap them in LoRA); returns the model to train."""
    if config.lora:
        from peft import get_peft_model

        model.requires_grad_(False)
        return get_peft_model(model, lora_config(lm, layers, r=config.lora_r))
    freeze_except(model, lm, layers)
    return model


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: frozen ones never get optimizer state."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def finetune(lm: LanguageModel, model: torch.nn.Module, layers: list[int], data: TextData,
             config: TrainConfig, *, progress: bool = True, label: str = "") -> tuple[torch.nn.Module, TrainRun]:
    """Fine-tune ``model`` (a copy of ``lm.model``) on ``data.train``; returns it and its run record."""
    torch.manual_seed(config.seed)  # LoRA initialisation and dropout, like the data order, follow the seed
    model = prepare(lm, model, layers, config)
    params = [p for p in model.parameters() if p.requires_grad]
    run = TrainRun(layers, sum(p.numel() for p in params))

    def evaluate() -> float:
        return heldout_loss(model, data.heldout, config.eval_batch_size, data.heldout_starts)

    run.heldout_loss.append((0, evaluate()))
    if not params:
        return model, run
    optimizer = make_optimizer(model, config.learning_rate)
    order = _data_order(len(data.train), config.steps * config.batch_size, config.seed)
    device = next(model.parameters()).device
    model.train()
    elapsed = 0.0
    bar = tqdm(range(1, config.steps + 1), desc=f"tuning {label}".strip(), unit="step", disable=not progress)
    with PeakMemory(device) as peak:
        for step in bar:
            rows = order[(step - 1) * config.batch_size:step * config.batch_size]
            batch = collate([data.train[i] for i in rows], device,
                            None if data.train_starts is None else [data.train_starts[i] for i in rows])
            start = time.perf_counter()
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            value = float(loss.detach())
            run.train_loss.append((step, value))
            bar.set_postfix(loss=f"{value:.3f}")
            if step % config.eval_every == 0 or step == config.steps:
                run.heldout_loss.append((step, evaluate()))
    model.eval()
    run.seconds_per_step = round(elapsed / config.steps, 4)
    run.peak_memory_mb = peak.megabytes
    return model, run


def _data_order(n: int, needed: int, seed: int) -> np.ndarray:
    """A seeded order over the training texts, reshuffled each epoch."""
    rng = np.random.default_rng(seed)
    epochs = -(-needed // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:needed]
