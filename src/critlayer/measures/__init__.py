"""Measures of layer importance: what each one computes, what it costs, and which way is critical."""

from dataclasses import dataclass

from .cka import cka_matrix, delta_scores, linear_cka
from .sample import RowSample, resample_rows
from .similarity import BlockSimilarity, similarity_scores
from .spectral import KS, spectral_scores


@dataclass(frozen=True)
class Measure:
    """A lens on layer importance. ``scores`` enter the consensus; ``extra`` scores are only reported.

    ``cost`` says what it runs; ``capture`` that it reads the one shared pass of the probes through the
    blocks; ``needs_text`` that it needs text with real next tokens (the probe texts or ``--data``).
    """

    description: str
    scores: tuple[str, ...]
    cost: str
    capture: bool = False
    needs_text: bool = False
    extra: tuple[str, ...] = ()


_SHARED = "shares one forward pass of the probes through the blocks (no logits)"
MEASURES = {
    "cka": Measure("linear CKA between block outputs (the L x L matrix) and delta, its mean over a window",
                   ("delta",), _SHARED, capture=True),
    "influence": Measure("block influence (1 - cosine of block input and output) and angular distance",
                         ("block_influence", "angular_distance"), _SHARED, capture=True),
    "spectral": Measure("mean canonical correlation of top-K principal components with blocks l+-1, l+-2 "
                        "(K = 1, 3, 10)", tuple(f"spectral_k{k}" for k in KS), _SHARED + "; one small eigendecomposition per block",
                        capture=True),
    "clusters": Measure("NMI of k-means token clusters at each block with those at the embeddings, and its drop "
                        "across the block", ("token_nmi_drop",), _SHARED + "; k-means per block", capture=True,
                        extra=("token_nmi",)),
    "ablation": Measure("rise of next-token loss when a block (or, with --ablate, its attention or MLP) is skipped",
                        ("ablation", "ablation_attn", "ablation_mlp"),
                        "about L/2 forwards with logits over the text, per part skipped", needs_text=True),
    "gradient": Measure("RMS of the language-modelling loss gradient over each block's parameters", ("gradient",),
                        "one forward and backward over the text", needs_text=True),
    "weights": Measure("signal-to-noise of each block's weight matrices against the Marchenko-Pastur bound",
                       ("weight_snr",), "one SVD per weight matrix (read block by block with --stream); no forward"),
}
DEFAULT_MEASURES = ("cka", "influence", "spectral")  # data-oblivious and cheap: one pass, no logits

# +1: a high score marks a critical block; -1: a low score does.
DIRECTION = {"delta": -1, "block_influence": 1, "angular_distance": 1, **{f"spectral_k{k}": -1 for k in KS},
             "token_nmi": -1, "token_nmi_drop": 1, "ablation": 1, "ablation_attn": 1, "ablation_mlp": 1,
             "gradient": 1, "weight_snr": 1, "consensus": 1, "p_critical": 1}

__all__ = ["DEFAULT_MEASURES", "DIRECTION", "KS", "MEASURES", "BlockSimilarity", "Measure", "RowSample",
           "cka_matrix", "delta_scores", "linear_cka", "resample_rows", "similarity_scores", "spectral_scores"]
