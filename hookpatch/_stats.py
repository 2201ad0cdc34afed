"""Statistics over prompts: bootstrap intervals, sign-flip p-values, multiple-testing correction.

Model-free and vectorized over any leading cell axes ``[*cells, batch]``. The bootstrap and
the permutation test are TransformerLens' own (``transformer_lens.utilities.statistics``),
seeded the way TransformerLens' ``PatchingResult`` seeds them —
``derive_generator(seed, "bootstrap", "mean")`` and ``derive_generator(seed, "permutation")`` —
so the same per-prompt numbers and seed give the same interval and p-value in both libraries.

Cost: the bootstrap draws ``n_resamples × batch`` indices once for all cells; the p-value
enumerates all ``2**batch`` sign patterns when ``batch <= 12`` (exact and deterministic; done
a block of cells at a time to bound memory), else draws ``n_permutations`` random patterns.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_count, as_int
from hookpatch.errors import HookpatchError

ALTERNATIVES = ("two-sided", "greater", "less")
CORRECTIONS = (None, "holm", "bh")
EXACT_MAX_N = 12  # TransformerLens' default: up to 2**12 sign patterns are enumerated
EXACT_BLOCK = 2**24  # floats per block of cells in the exact test (64 MB)


def check_bootstrap(level: float, n_resamples: IntLike) -> int:
    """``n_resamples`` as an int; raise a :class:`HookpatchError` unless ``level`` is in (0, 1)
    and ``n_resamples`` a positive integer (any integer type)."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise HookpatchError(f"level={level!r} must be in (0, 1): a confidence level such as 0.95.")
    return as_count(n_resamples, "n_resamples", "bootstrap resamples, e.g. 1000")


def check_correction(correction: str | None) -> None:
    """Raise a :class:`HookpatchError` unless ``correction`` is None, ``"holm"`` or ``"bh"``."""
    if correction not in CORRECTIONS:
        raise HookpatchError(f"correction={correction!r}: expected one of {CORRECTIONS}.")


def mean_ci(
    values: Float[Tensor, "*cells batch"], level: float = 0.95, n_resamples: IntLike = 1000, seed: IntLike = 0
) -> tuple[Float[Tensor, "*cells"], Float[Tensor, "*cells"]]:
    """Percentile bootstrap interval of the mean over the last axis, per cell.

    Prompts are resampled with replacement; every cell uses the same resampled prompts, so
    the interval of a per-prompt difference (an effect) is a paired interval.

    Args:
        values: ``[*cells, batch]`` per-prompt values.
        level: the confidence level, e.g. 0.95.
        n_resamples: bootstrap resamples.
        seed: the seed (derived as TransformerLens' ``PatchingResult.bootstrap_ci`` does).

    Returns:
        ``(low, high)``, each ``[*cells]``.
    """
    from transformer_lens.utilities.statistics import bootstrap_ci, derive_generator

    n_resamples, seed = check_bootstrap(level, n_resamples), as_int(seed, "seed")
    return bootstrap_ci(
        values.detach().float().cpu(),
        dim=-1,
        statistic="mean",
        confidence=level,
        n_resamples=n_resamples,
        generator=derive_generator(seed, "bootstrap", "mean"),
    )


def sign_flip_pvalue(
    effects: Float[Tensor, "*cells batch"],
    n_permutations: IntLike = 1000,
    seed: IntLike = 0,
    alternative: str = "two-sided",
) -> Float[Tensor, "*cells"]:
    """Paired sign-flip permutation p-value that each cell's mean effect is zero.

    Under the null each prompt's effect is symmetric about zero, so flipping its sign is as
    likely as not. Exact (all ``2**batch`` patterns) for 12 prompts or fewer, else Monte Carlo
    with ``(hits + 1) / (n_permutations + 1)``.

    Args:
        effects: ``[*cells, batch]`` per-prompt effects.
        n_permutations: random sign patterns when ``batch > 12``.
        seed: the seed (derived as TransformerLens' ``PatchingResult.permutation_pvalue`` does).
        alternative: ``"two-sided"``, ``"greater"`` (mean effect > 0) or ``"less"``.

    Returns:
        ``[*cells]`` p-values.
    """
    from transformer_lens.utilities.statistics import derive_generator, sign_flip_permutation_pvalue

    if alternative not in ALTERNATIVES:
        raise HookpatchError(f"alternative={alternative!r}: expected one of {ALTERNATIVES}.")
    n_permutations = as_count(n_permutations, "n_permutations", "random sign patterns, e.g. 1000")
    seed = as_int(seed, "seed")
    x = effects.detach().float().cpu()
    n = x.shape[-1]

    def test(block: Tensor) -> Tensor:
        return sign_flip_permutation_pvalue(
            block, dim=-1, n_permutations=n_permutations, generator=derive_generator(seed, "permutation"),
            alternative=alternative, exact_max_n=EXACT_MAX_N,
        )

    if n > EXACT_MAX_N:  # one call: the random patterns are shared by all cells, as in TransformerLens
        return test(x)
    flat = x.reshape(-1, n)  # [cell, batch]; the exact test is deterministic, so blocks change nothing
    step = max(1, EXACT_BLOCK // (2**n * n))
    return torch.cat([test(flat[i:i + step]) for i in range(0, len(flat), step)]).reshape(x.shape[:-1])


def adjust_pvalues(p: Float[Tensor, "*cells"], correction: str | None) -> Float[Tensor, "*cells"]:
    """P-values corrected for testing every cell: Holm (family-wise error) or Benjamini–Hochberg (FDR).

    Args:
        p: ``[*cells]`` p-values, one family.
        correction: ``None`` (returned unchanged), ``"holm"`` or ``"bh"``.

    Returns:
        ``[*cells]`` adjusted p-values, capped at 1.
    """
    check_correction(correction)
    if correction is None or p.numel() == 0:
        return p.clone()
    flat = p.reshape(-1).double()
    m = flat.numel()
    order = flat.argsort()
    ordered = flat[order]
    rank = torch.arange(1, m + 1, dtype=torch.float64)  # 1-based rank of each sorted p-value
    if correction == "holm":  # step-down: (m - i + 1) p_(i), kept monotone from the smallest up
        scaled = torch.cummax((m - rank + 1) * ordered, 0).values
    else:  # step-up: m / i p_(i), kept monotone from the largest down
        scaled = torch.cummin(((m / rank) * ordered).flip(0), 0).values.flip(0)
    out = torch.empty_like(flat)
    out[order] = scaled.clamp(max=1.0)
    return out.to(p.dtype).reshape(p.shape)
