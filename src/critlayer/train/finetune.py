"""Causal-LM fine-tuning of chosen blocks only (full weights or LoRA), on accelerate, with held-out loss.

Frozen parameters never require gradients and the optimizer is built from trainable parameters
only, so frozen blocks hold neither gradients nor optimizer state; a sampled run (``LayerSchedule``) switches
its blocks as it goes, keeping state for the active ones only (see ``sampling``). The loop runs through
accelerate: under ``accelerate launch`` every process takes its share of each batch (the batch
size is global, split as evenly as it goes) and the loss stays the mean over the batch's tokens
across processes, so N processes train as one process on the same batches would. Every process
evaluates the held-out text on its own copy of the weights; only the main process writes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..common.cost import Plan
from ..common.distributed import accelerator, gather, is_main
from ..common.errors import CritlayerError
from ..common.memory import PeakMemory
from ..common.options import DTYPE_HELP, SEED_HELP, check_options, option
from ..common.stats import paired_difference_interval
from ..data.text import TextData
from ..models import LanguageModel
from ..models.loading import DTYPES, resolve_dtype
from ..models.loss import batch_losses, collate, sequence_losses
from ..models.running import computing_in
from .sampling import LayerSchedule, switch_blocks
from .targets import LORA_R, block_parameters, freeze_except, lora_config

DEFAULT_LR = 3e-5
DEFAULT_LORA_LR = 1e-3
SCHEDULES = ("cosine", "linear", "constant")
_SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # transformers'


@dataclass
class TrainConfig:
    """How to fine-tune (each field is the CLI flag of that name).

    ``steps`` of AdamW at ``lr`` (default ``DEFAULT_LR``, or ``DEFAULT_LORA_LR`` for LoRA) on batches of
    ``batch_size`` texts in all (split across processes under ``accelerate launch``), the rate rising linearly over
    the first ``warmup`` share of the steps and then following ``schedule`` (cosine or linear decay to zero, or
    constant); held-out loss every ``eval_every`` steps. The data:
    texts of at most ``max_tokens`` tokens, ``n_eval`` held out, at most ``n_train`` trained on (default: all
    the rest). ``lora`` trains LoRA adapters of rank ``lora_r`` on the chosen blocks instead of their weights.
    ``dtype`` is what the model computes in: ``auto`` is bfloat16 where the hardware computes in it natively
    and float32 elsewhere; the weights trained stay float32 (bfloat16 is mixed precision).
    """

    steps: int = option(100, "optimizer steps", minimum=1)
    lr: float | None = option(None, f"peak learning rate (default {DEFAULT_LR:g}, or {DEFAULT_LORA_LR:g} with --lora)",
                              positive=True)
    batch_size: int = option(8, "texts per step in all: under accelerate launch they are split across the processes",
                             minimum=1)
    max_tokens: int = option(128, "tokens per text at most: the context", minimum=2)
    n_eval: int = option(32, "held-out texts", minimum=2)
    n_train: int | None = option(None, "training texts at most (default: all the rest)", minimum=1)
    eval_every: int = option(20, "steps between held-out evaluations", minimum=1)
    seed: int = option(0, SEED_HELP, minimum=0)
    lora: bool = option(False, "train LoRA adapters (PEFT) on the chosen blocks")
    embeddings: bool = option(False, "also train what lies outside the blocks (embeddings, final norm, output "
                                     "head), as LISA does; full weights only")
    every: int = option(10, "steps between re-draws of a sampled spec (sample:K)", minimum=1)
    lora_r: int = option(LORA_R, "LoRA rank", minimum=1)
    warmup: float = option(0.1, "share of the steps the rate rises over", minimum=0, below=1)
    schedule: str = option("cosine", "the rate after warm-up: cosine or linear decay to zero, or constant",
                           choices=SCHEDULES)
    dtype: str = option("auto", DTYPE_HELP + "; the weights trained stay float32 (bfloat16 runs as mixed precision)",
                        choices=DTYPES)

    def __post_init__(self):
        check_options(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (DEFAULT_LORA_LR if self.lora else DEFAULT_LR)

    def describe(self) -> dict:
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__}, "lr": self.learning_rate}

    def require_whole_blocks(self, why: str) -> None:
        """Refuse, saying ``why``, what trains other than whole blocks (LoRA, or the weights outside the blocks)."""
        for flag in ("lora", "embeddings"):
            if getattr(self, flag):
                raise CritlayerError(f"{why}; drop {flag}")


@dataclass
class TrainRun:
    """What one fine-tuning run did and measured."""

    layers: list[int]
    trainable_parameters: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    heldout_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds_per_step: float = 0.0
    peak_memory_mb: float = 0.0
    compute_dtype: str = "float32"
    processes: int = 1
    texts_seen: list[list[int]] | None = None  # per process, with several: the training texts each one took
    replicas_identical: bool | None = None  # with several: whether every process ended with the same weights
    loss_drop_interval: tuple[float, float] | None = None  # 95% bootstrap over held-out texts, paired
    draws: list[list[int]] | None = None  # a sampled run's blocks, draw after draw (``layers``: all it drew)

    @property
    def loss_before(self) -> float:
        return self.heldout_loss[0][1]

    @property
    def loss_after(self) -> float:
        return self.heldout_loss[-1][1]

    @property
    def lowered_loss(self) -> bool:
        """Did fine-tuning lower the held-out loss by more than its noise (the drop's 95% interval above zero)?"""
        return self.loss_drop_interval is not None and self.loss_drop_interval[0] > 0

    def did_not_help(self) -> str | None:
        """A one-line account of a fine-tune that did not lower the held-out loss beyond its noise, else None."""
        if self.loss_drop_interval is None:
            return None
        return unhelpful(self.loss_before, self.loss_after, self.loss_drop_interval)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainRun":
        """A run as ``as_dict`` saved it."""
        interval = d["loss_drop_interval"]
        return cls(d["layers"], d["trainable_parameters"], [tuple(x) for x in d["train_loss"]],
                   [tuple(x) for x in d["heldout_loss"]], d["seconds_per_step"], d["peak_memory_mb"],
                   d["compute_dtype"], d["processes"], d.get("texts_seen"), d.get("replicas_identical"),
                   None if interval is None else tuple(interval), d.get("draws"))

    def as_dict(self) -> dict:
        out = {"layers": self.layers, "trainable_parameters": self.trainable_parameters,
               "heldout_loss_before": self.loss_before, "heldout_loss_after": self.loss_after,
               "loss_drop_interval": self.loss_drop_interval, "lowered_loss": self.lowered_loss,
               "train_loss": self.train_loss, "heldout_loss": self.heldout_loss,
               "seconds_per_step": self.seconds_per_step, "peak_memory_mb": self.peak_memory_mb,
               "compute_dtype": self.compute_dtype, "processes": self.processes}
        if self.processes > 1:
            out |= {"texts_seen": self.texts_seen, "replicas_identical": self.replicas_identical}
        if self.draws is not None:
            out["draws"] = self.draws
        return out


def unhelpful(before: float, after: float, drop_interval: tuple[float, float]) -> str | None:
    """A one-line account of held-out loss that did not fall beyond its noise (the drop's 95% interval reaching
    zero), else None."""
    low, high = drop_interval
    if low > 0:
        return None
    if not np.isfinite(after):
        return f"fine-tuning diverged: the held-out loss went from {before:.4f} to {after}"
    return (f"fine-tuning did not lower the held-out loss beyond its noise ({before:.4f} -> {after:.4f}; "
            f"95% interval of the drop {low:+.4f} to {high:+.4f})")




def prepare(lm: LanguageModel, model: torch.nn.Module, layers: list[int], config: TrainConfig):
    """Freeze all but ``layers`` (or wrap them in LoRA); returns the model to train."""
    if config.lora:
        from peft import get_peft_model

        model.requires_grad_(False)
        return get_peft_model(model, lora_config(lm, layers, r=config.lora_r))
    freeze_except(model, lm, layers, outside=config.embeddings)
    return model


def make_optimizer(model: torch.nn.Module, lr: float, also: list[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters and those ``also`` names (a sampled run's blocks that wait their turn):
    a parameter gets state at its first gradient, so frozen ones never hold any."""
    waiting = {id(p) for p in also}
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad or id(p) in waiting], lr=lr,
                             weight_decay=0.0)


def finetune(lm: LanguageModel, model: torch.nn.Module, layers: list[int] | LayerSchedule, data: TextData,
             config: TrainConfig, *, progress: bool = True, label: str = "") -> tuple[torch.nn.Module, TrainRun]:
    """Fine-tune ``model`` (a copy of ``lm.model``) on ``data.train``, the blocks ``layers`` names or, for a
    ``LayerSchedule``, those of each draw in turn; returns it and its run record."""
    acc = accelerator()
    processes, rank = acc.num_processes, acc.process_index
    if config.batch_size < processes:
        raise CritlayerError(f"--batch-size {config.batch_size} is smaller than the {processes} processes")
    torch.manual_seed(config.seed)  # LoRA initialisation and dropout, like the data order, follow the seed
    schedule = layers if isinstance(layers, LayerSchedule) else None
    model = prepare(lm, model, schedule.active(1) if schedule else layers, config)
    groups = block_parameters(model, lm, schedule.blocks) if schedule else {}
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = resolve_dtype(config.dtype, str(lm.device))
    run = TrainRun(schedule.blocks if schedule else layers, _most_trainable(params, groups, schedule),
                   compute_dtype=str(dtype).removeprefix("torch."), processes=processes,
                   draws=schedule.draws if schedule else None)

    before: list[np.ndarray] = []  # each held-out text's summed loss before any step

    def evaluate(step: int) -> None:
        with computing_in(model, dtype):
            text_sums, counts = sequence_losses(model, data.heldout, starts=data.heldout_starts)
        run.heldout_loss.append((step, float(text_sums.sum() / counts.sum())))
        if step:
            run.loss_drop_interval = paired_difference_interval(before[0], text_sums, counts, seed=config.seed)
        else:
            before.append(text_sums)

    evaluate(0)
    if not params:
        return model, run
    waiting = [p for block in groups.values() for p in block if not p.requires_grad]  # a sampled run's later draws
    adamw = make_optimizer(model, config.learning_rate, waiting)
    rate = get_scheduler(_SCHEDULE_NAMES[config.schedule], adamw,
                         num_warmup_steps=round(config.warmup * config.steps), num_training_steps=config.steps)
    # on one process the model stays where it was loaded (--device); on several, accelerate puts each process's
    # copy on that process's device, as its DDP wrapper needs
    placement = [False, False] if processes == 1 else None
    trained, optimizer = acc.prepare(model, adamw, device_placement=placement)
    order = _data_order(len(data.train), config.steps * config.batch_size, config.seed)
    starts = data.train_starts or [0] * len(data.train)
    seen: list[int] = []
    device = next(model.parameters()).device
    trained.train()
    elapsed = 0.0
    bar = tqdm(range(1, config.steps + 1), desc=f"tuning {label}".strip(), unit="step",
               disable=not (progress and is_main()))
    with PeakMemory(device) as peak:
        for step in bar:
            if schedule and schedule.redraws_at(step):  # part of the step's time: on several processes, a new wrap
                switched = time.perf_counter()
                switch_blocks(adamw, groups, schedule.active(step))
                if processes > 1:  # DDP reduces the gradients of the parameters trainable when it wrapped the model
                    model = acc.unwrap_model(trained, keep_fp32_wrapper=False)  # no wrapper on top of the last one
                    del trained, optimizer
                    acc.free_memory()
                    trained, optimizer = acc.prepare(model, adamw, device_placement=placement)
                elapsed += time.perf_counter() - switched
            rows = order[(step - 1) * config.batch_size:step * config.batch_size]
            tokens = sum(_predicted(data.train[i], starts[i]) for i in rows)  # the whole batch's, on every process
            mine = np.array_split(rows, processes)[rank]
            seen += mine.tolist()
            batch = collate([data.train[i] for i in mine], device, [starts[i] for i in mine])
            start = time.perf_counter()
            with computing_in(model, dtype):
                loss = batch_losses(trained, batch)[0].sum() / tokens
            acc.backward(loss * processes)  # gradients are averaged over processes: undo it, the sum is the mean
            optimizer.step()
            rate.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            value = float(sum(gather(float(loss.detach())))) if processes > 1 else float(loss.detach())
            run.train_loss.append((step, value))
            bar.set_postfix(loss=f"{value:.3f}")
            if step % config.eval_every == 0 or step == config.steps:
                evaluate(step)
    model.eval()
    acc.free_memory()  # the accelerator forgets the model and optimizer: each run starts afresh
    run.seconds_per_step = round(elapsed / config.steps, 4)
    run.peak_memory_mb = peak.megabytes
    if processes > 1:
        run.texts_seen = gather(seen)
        run.replicas_identical = len(set(gather(_digest(params + waiting)))) == 1
    return model, run


def plan_finetune(plan: Plan, data: TextData, config: TrainConfig) -> Plan:
    """Add one fine-tune to ``plan``: its training steps (the very batches its seed draws) and its held-out
    evaluations (before the first step, every ``eval_every`` steps and after the last)."""
    order = _data_order(len(data.train), config.steps * config.batch_size, config.seed)
    evaluations = 1 + config.steps // config.eval_every + (config.steps % config.eval_every != 0)
    plan.add_tokens("training", config.steps, int(sum(len(data.train[i]) for i in order)), unit="step")
    return plan.add("held-out loss", evaluations, sum(map(len, data.heldout)))


def _most_trainable(params: list[torch.nn.Parameter], groups: dict[int, list[torch.nn.Parameter]],
                    schedule: LayerSchedule | None) -> int:
    """The most parameters trainable at once: for a sampled run, those outside its blocks with its largest draw."""
    if schedule is None:
        return sum(p.numel() for p in params)
    sizes = {block: sum(p.numel() for p in block_params) for block, block_params in groups.items()}
    drawn = {id(p) for block_params in groups.values() for p in block_params}
    outside = sum(p.numel() for p in params if id(p) not in drawn)
    return outside + max(sum(sizes[b] for b in draw) for draw in schedule.draws)


def _predicted(sequence: list[int], start: int) -> int:
    """How many of a sequence's tokens are predicted in the loss (from ``start``, never the first token)."""
    return len(sequence) - max(start, 1)


def _digest(params: list[torch.Tensor]) -> str:
    """A fingerprint of the trained weights, to check that every process ended with the same ones."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _data_order(n: int, needed: int, seed: int) -> np.ndarray:
    """A seeded order over the training texts, reshuffled each epoch."""
    rng = np.random.default_rng(seed)
    epochs = -(-needed // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:needed]
