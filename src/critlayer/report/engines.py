"""A written file checked in another engine (llama.cpp), in one line for a command's table and page."""

from __future__ import annotations


def llamacpp_text(check: dict) -> str:
    """One line for a command's table."""
    if "why" in check:
        return f"in llama.cpp: {check['file']} not run: {check['why']}"
    return (f"in llama.cpp: {check['file']} perplexity {check['perplexity']:.3f} against transformers' "
            f"{check['transformers_perplexity']:.3f} on the same weights (ratio {check['ratio_95'][0]:.3f}–"
            f"{check['ratio_95'][1]:.3f}); per token KL {check['kl']:.4f}, top-1 agreement {check['top1']:.3f}")
