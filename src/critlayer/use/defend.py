"""``critlayer defend``: does freezing the critical blocks blunt a backdoor planted by fine-tuning?

Every policy fine-tunes all blocks except the ones its spec freezes (``none`` freezes nothing),
from the same pre-trained weights, on the same poisoned data in the same order. Each tuned model
then answers held-out prompts greedily, with and without the trigger: the attack success rate
is the share of triggered prompts whose reply shows the target, the false-trigger rate the same
on clean prompts, and the clean held-out loss on the held-out replies measures utility.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common.distributed import is_main
from ..common.cost import Plan
from ..common.errors import CritlayerError
from ..common.options import option, override
from ..common.folders import SavedResult, check_output_folder
from ..common.stats import bootstrap_ratio_interval, wilson_interval
from ..data.text import TextData
from ..find.result import ScanResult
from ..models import DEFAULT_MODEL, LanguageModel
from ..models.loss import sequence_losses
from ..models.loading import float32_model, resolve_dtype
from ..models.running import computing_in
from ..train.finetune import TrainConfig, TrainRun, finetune, plan_finetune
from .backdoor import DEFAULT_TARGET, TRIGGERS, Attack, Pair, load_pairs, poison, shows_target, split_pairs
from .layers import Lens, ranked_by, resolve_layers

DEFAULT_COMPARE = "none,critical:4,noncritical:4,random:4"
PRETRAINED = "pre-trained"


@dataclass
class DefendConfig(TrainConfig):
    """A defence: its fine-tuning (a ``TrainConfig`` with defaults of its own: fewer steps, more held-out prompts,
    prompts and replies each cut to ``max_tokens``, ``n_train`` one pass of the steps) and its attack:
    ``poison_rate`` of the training pairs get ``trigger`` (rare, sudo, or any string) at ``trigger_at`` (suffix or
    prefix; default the preset's place) and the attacker's reply ``target``."""

    steps: int = override(TrainConfig, "steps", 60)
    n_eval: int = override(TrainConfig, "n_eval", 100)
    max_tokens: int = option(48, "tokens per prompt and per reply at most", minimum=2, flag="--turn-tokens",
                             old_flag="--max-tokens")
    poison_rate: float = option(0.1, "share of training pairs poisoned, in (0, 1]")  # checked by Attack
    trigger: str = option("rare", ", ".join(f"{k} ({v[0]!r}, {v[1]})" for k, v in TRIGGERS.items())
                          + ", or any string")
    trigger_at: str | None = option(None, "where a --trigger string goes (default: suffix, or the preset's place)",
                                    choices=("suffix", "prefix"))
    target: str = option(DEFAULT_TARGET, "the attacker's reply")

    def __post_init__(self):
        super().__post_init__()
        self.require_whole_blocks("defend fine-tunes the blocks it does not freeze, whole")
        self.attack  # checked now, before any work

    @property
    def attack(self) -> Attack:
        return Attack.named(self.trigger, target=self.target, rate=self.poison_rate, position=self.trigger_at)


@dataclass
class Outcome:
    """One policy's fine-tuned model on the held-out prompts."""

    spec: str
    frozen: list[int]
    attack_success: float
    attack_success_ci: tuple[float, float]
    false_trigger: float
    false_trigger_ci: tuple[float, float]
    clean_loss: float
    clean_loss_ci: tuple[float, float]
    examples: list[dict]
    run: TrainRun | None = None

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "run"}
        return {**out, "run": None if self.run is None else self.run.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Outcome":
        run = d["run"]
        return cls(**{k: tuple(v) if k.endswith("_ci") else v for k, v in d.items() if k != "run"},
                   run=None if run is None else TrainRun.from_dict(run))


@dataclass
class DefendResult(SavedResult, file="defend.json", kind="defence"):
    """Each freezing policy's fine-tuned model on the held-out prompts, after the pre-trained model's."""

    settings: dict
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # the pre-trained model first

    def table(self) -> str:
        s = self.settings
        width = max(len(spec) for spec in self.outcomes)
        lines = [f"{s['model']['name']} fine-tuned {s['train']['steps']} steps on {s['data']['n_train']} {s['data']['source']} "
                 f"pairs, {s['data']['n_poisoned']} poisoned ({s['attack']['poison_rate']:.0%}); "
                 f"{s['data']['n_eval']} held-out prompts; 95% intervals",
                 f"{'frozen':<{width}}  {'attack success':>22}  {'false triggers':>22}  {'clean loss':>24}  blocks frozen"]
        for spec, o in self.outcomes.items():
            lines.append(f"{spec:<{width}}  {_percent(o.attack_success, o.attack_success_ci):>22}  "
                         f"{_percent(o.false_trigger, o.false_trigger_ci):>22}  "
                         f"{o.clean_loss:>8.4f} [{o.clean_loss_ci[0]:.4f}, {o.clean_loss_ci[1]:.4f}]  "
                         f"{'-' if spec == PRETRAINED else o.frozen}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**self.settings, "outcomes": {spec: o.as_dict() for spec, o in self.outcomes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "DefendResult":
        return cls({k: v for k, v in data.items() if k != "outcomes"},
                   {spec: Outcome.from_dict(o) for spec, o in data["outcomes"].items()})

    def write_files(self, folder: Path) -> None:
        from ..report.defence import write_defence_report

        (folder / "defend.txt").write_text(self.table() + "\n")
        write_defence_report(self, folder)


def defend(model: LanguageModel | str = DEFAULT_MODEL, data: str = "sharegpt", freeze: str = "critical:4", *,
           compare: str | list[str] | bool | None = None, scan: ScanResult | str | Path | None = None,
           score: str | None = None, validation=None,
           config: DefendConfig | None = None, out: str | Path | None = None,
           force: bool = False, progress: bool = True, device: str | None = None, **options) -> DefendResult:
    """Fine-tune on poisoned prompt-reply pairs with the blocks ``freeze`` names frozen (or, with ``compare``, once
    per policy: specs, a comma list, or True for none, critical:4, noncritical:4 and random:4), and measure the
    backdoor: attack success with the trigger, false triggers without it, and the clean loss.

    ``data`` is sharegpt or a .jsonl file of prompt and reply fields; ``config`` a ``DefendConfig``, its fields
    also taken as keywords (``poison_rate=0.02``, ``trigger="sudo"``, ``steps=30``, ...). Ranked specs use
    ``score`` of ``scan``, or of a default scan run now, or with ``validation`` (a ``Validation`` or its folder) the
    lens it found best. With ``out`` the result is saved.

    >>> result = critlayer.defend(model_folder, data=pair_file, freeze="2-3", trigger="w1 w2", target="w3 w4",
    ...                           steps=2, batch_size=4, n_eval=6, max_tokens=8, progress=False)
    >>> list(result.outcomes), result.outcomes["2-3"].frozen
    (['pre-trained', '2-3'], [2, 3])
    """
    config = replace(config, **options) if config is not None else DefendConfig(**options)
    chosen = DEFAULT_COMPARE if compare is True else compare or freeze
    specs = [s.strip() for s in chosen.split(",") if s.strip()] if isinstance(chosen, str) else list(chosen)
    if not specs or len(set(specs)) != len(specs):
        raise CritlayerError(f"need distinct freezing policies, got {','.join(specs) or 'none'}")
    if out is not None:
        check_output_folder(out, DefendResult.FILE, force)
    pairs = load_pairs(data)  # a missing, unreadable or too short file ends here, before the model loads
    split_pairs(pairs, config.n_eval)
    lm = float32_model(model, device)
    scan_result, lens = ranked_by(lm, specs, scan=scan, validation=validation, score=score, progress=progress)
    result = _defend(lm, data, pairs, specs, config, scan_result, lens, progress)
    if out is not None:
        result.save(out, force=force)
    return result


def _defend(lm: LanguageModel, source: str, pairs: list[Pair], specs: list[str], config: DefendConfig,
            scan_result: ScanResult | None, lens: Lens | None, progress: bool) -> DefendResult:
    """Fine-tune on poisoned pairs once per freezing policy in ``specs``; measure the backdoor each time."""
    frozen = {spec: resolve_layers(lm.num_layers, spec, lens, seed=config.seed) for spec in specs}
    for spec, blocks in frozen.items():
        if len(blocks) == lm.num_layers:
            raise CritlayerError(f"freezing {spec} leaves no block to fine-tune")
    tokens, attack = config.max_tokens, config.attack
    train_pairs, heldout_pairs = split_pairs(_cut_prompts(lm, pairs, tokens), config.n_eval)
    train_pairs = _cut_replies(lm, train_pairs[:config.n_train or config.steps * config.batch_size], tokens)
    heldout_pairs = _cut_replies(lm, heldout_pairs, tokens)
    if len(heldout_pairs) < 2 or not train_pairs:
        raise CritlayerError(f"{source!r} leaves {len(train_pairs)} training and {len(heldout_pairs)} held-out pairs "
                             "with text once cut to length; need at least 1 and 2")
    poisoned, is_poisoned = poison(train_pairs, attack, config.seed)
    data = _encode(lm, source, poisoned, heldout_pairs)
    settings = {"model": lm.describe(), "attack": attack.describe(), "train": config.describe(),
                "limits": {"n_train": config.n_train, "n_eval": config.n_eval, "prompt_tokens": tokens,
                           "reply_tokens": tokens},
                "scan_critical": None if scan_result is None else scan_result.critical,
                "lens": None if lens is None else lens.to_json(),
                "data": {"source": source, "n_train": len(poisoned), "n_poisoned": sum(is_poisoned),
                         "n_eval": len(heldout_pairs)}}
    _plan(lm, data, heldout_pairs, len(frozen), config).announce(progress)
    dtype = resolve_dtype(config.dtype, str(lm.device))
    result = DefendResult(settings)
    result.outcomes[PRETRAINED] = _evaluate(lm, lm.model, PRETRAINED, [], heldout_pairs, data, attack, dtype, progress)
    for spec, blocks in frozen.items():
        trained = [i for i in range(lm.num_layers) if i not in blocks]
        model, run = finetune(lm, copy.deepcopy(lm.model), trained, data, config, progress=progress,
                              label=f"frozen {spec}")
        outcome = _evaluate(lm, model, spec, blocks, heldout_pairs, data, attack, dtype, progress)
        outcome.run = run
        result.outcomes[spec] = outcome
        del model
    return result


def _plan(lm: LanguageModel, data: TextData, heldout: list[Pair], policies: int, config: DefendConfig) -> Plan:
    """The forward tokens a defence plans: one fine-tune per policy, and for the pre-trained model and each tuned
    one the replies to every held-out prompt with and without the trigger (prompt and reply written token by token;
    a reply stops at the target's length and 8 more) and the clean loss."""
    plan = Plan(f"defence of {lm.name}")
    for _ in range(policies):
        plan_finetune(plan, data, config)
    prompts = [prompt_ids(lm, config.attack.insert(p)) for p, _ in heldout] + [prompt_ids(lm, p) for p, _ in heldout]
    reply = len(lm.tokenizer(config.attack.target, add_special_tokens=False)["input_ids"]) + 8
    plan.add("replies", policies + 1, sum(map(len, prompts)) + reply * len(prompts), at_most=True)
    return plan.add("clean loss", policies + 1, sum(map(len, data.heldout)))


def _evaluate(lm: LanguageModel, model: torch.nn.Module, spec: str, frozen: list[int], heldout: list[Pair],
              data: TextData, attack: Attack, dtype: torch.dtype, progress: bool) -> Outcome:
    prompts = [prompt for prompt, _ in heldout]
    target_tokens = len(lm.tokenizer(attack.target, add_special_tokens=False)["input_ids"])
    with computing_in(model, dtype):
        replies = greedy_replies(lm, model, [attack.insert(p) for p in prompts] + prompts, target_tokens + 8,
                                 progress=progress, label=spec)
        sums, counts = sequence_losses(model, data.heldout, data.heldout_starts)
    triggered, clean = replies[:len(prompts)], replies[len(prompts):]
    hits = sum(shows_target(r, attack.target) for r in triggered)
    false_hits = sum(shows_target(r, attack.target) for r in clean)
    examples = [{"prompt": p, "triggered_reply": t, "clean_reply": c} for p, t, c in zip(prompts[:3], triggered, clean)]
    return Outcome(spec, frozen, hits / len(prompts), wilson_interval(hits, len(prompts)), false_hits / len(prompts),
                   wilson_interval(false_hits, len(prompts)), float(sums.sum() / counts.sum()),
                   bootstrap_ratio_interval(sums, counts), examples)


@torch.no_grad()
def greedy_replies(lm: LanguageModel, model: torch.nn.Module, prompts: list[str], max_new_tokens: int, *,
                   batch_size: int = 25, progress: bool = True, label: str = "") -> list[str]:
    """The model's greedy continuation of each prompt (in its chat format), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [prompt_ids(lm, p) for p in prompts]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    replies = []
    for first in tqdm(range(0, len(encoded), batch_size), desc=f"answering {label}".strip(), unit="batch",
                      disable=not (progress and is_main())):
        batch = encoded[first:first + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(seq)) + seq for seq in batch], device=device)
        mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in batch], device=device)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        replies += lm.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return replies


def prompt_ids(lm: LanguageModel, prompt: str) -> list[int]:
    """Token ids that ask for a reply: the chat template where the tokenizer has one, else the prompt and a newline."""
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt + "\n", add_special_tokens=True)["input_ids"]


def _encode(lm: LanguageModel, source: str, train: list[Pair], heldout: list[Pair]) -> TextData:
    """Prompt-then-reply sequences whose loss counts the reply (and its end-of-turn token) only."""
    eos = lm.tokenizer.eos_token_id
    sequences, starts = [], []
    for prompt, reply in train + heldout:
        asked = prompt_ids(lm, prompt)
        answer = lm.tokenizer(reply, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        sequences.append(asked + answer)
        starts.append(len(asked))
    n = len(train)
    return TextData(source, sequences[:n], sequences[n:], starts[:n], starts[n:])


def _cut_prompts(lm: LanguageModel, pairs: list[Pair], tokens: int) -> list[Pair]:
    """Prompts cut to ``tokens`` (before any trigger goes in, so triggers stay whole), then made distinct:
    prompts that differ only after the cut must not straddle the train / held-out split."""
    prompts = _cut(lm, [prompt for prompt, _ in pairs], tokens)
    distinct = dict(zip(prompts, (reply for _, reply in pairs)))
    return [(prompt, reply) for prompt, reply in distinct.items() if prompt]


def _cut_replies(lm: LanguageModel, pairs: list[Pair], tokens: int) -> list[Pair]:
    replies = _cut(lm, [reply for _, reply in pairs], tokens)
    return [(prompt, reply) for (prompt, _), reply in zip(pairs, replies) if reply]


def _cut(lm: LanguageModel, texts: list[str], tokens: int) -> list[str]:
    tok = lm.tokenizer
    if tok is None:
        raise CritlayerError(f"{lm.name} has no tokenizer; defend needs one to read prompts and replies")
    return [tok.decode(ids[:tokens]).strip() for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _percent(value: float, interval: tuple[float, float]) -> str:
    return f"{value:6.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
