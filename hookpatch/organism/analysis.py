"""Measurements behind the model card: held-out accuracy, logit differences and the IOI circuit.

Everything is computed on a loaded bridge (``load_model("organism")`` or a checkpoint
directory) with plain TransformerLens calls, so the numbers in ``MODEL_CARD.md`` can be
recomputed with ``python -m hookpatch.organism.analysis [DIR]``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from hookpatch.model._facts import hook_name, resid_entering
from hookpatch.organism import _corpus as corpus


def _tokens(model: Any, texts: Sequence[str]) -> torch.Tensor:
    from hookpatch.model._tokens import encode

    return torch.tensor([encode(model, t) for t in texts])


def _by_length(model: Any, texts: Sequence[str]) -> dict[int, list[int]]:
    """Indices of ``texts`` grouped by token length (each group runs as one batch)."""
    from hookpatch.model._tokens import encode

    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[len(encode(model, t))].append(i)
    return groups


def single_id(model: Any, word: str) -> int:
    from hookpatch.model._tokens import to_single_token

    return to_single_token(model, word)


@torch.no_grad()
def final_logits(model: Any, texts: Sequence[str]) -> torch.Tensor:
    """Logits at the last position of each prompt, ``[len(texts), d_vocab]``."""
    out = torch.empty(len(texts), model.cfg.d_vocab)
    for _, idx in _by_length(model, texts).items():
        out[idx] = model(_tokens(model, [texts[i] for i in idx]))[:, -1].float().cpu()
    return out


def _answer_scores(model: Any, texts: Sequence[str], right: Sequence[str], wrong: Sequence[str],
                   pair: str) -> dict[str, float]:
    """Top-1 accuracy of ``right``, accuracy of ``right`` over ``wrong`` (key ``{pair}_accuracy``)
    and the mean logit difference ``right - wrong`` at each text's last token."""
    logits = final_logits(model, list(texts))
    r = torch.tensor([single_id(model, a) for a in right])
    w = torch.tensor([single_id(model, a) for a in wrong])
    rows = torch.arange(len(texts))
    diff = logits[rows, r] - logits[rows, w]
    return {
        "top1_accuracy": (logits.argmax(-1) == r).float().mean().item(),
        f"{pair}_accuracy": (diff > 0).float().mean().item(),
        "mean_logit_diff": diff.mean().item(),
        "n": len(texts),
    }


def ioi_scores(model: Any, prompts: Sequence[corpus.IOIPrompt]) -> dict[str, float]:
    """Top-1 accuracy (IO is the argmax over the vocabulary), IO>S accuracy, mean logit diff."""
    return _answer_scores(model, [p.text for p in prompts], [p.io for p in prompts], [p.s for p in prompts],
                          "io_over_s")


def pronoun_scores(model: Any, prompts: Sequence[corpus.PronounPrompt]) -> dict[str, float]:
    """Top-1 accuracy, right-over-wrong accuracy and mean logit diff (right - wrong)."""
    return _answer_scores(model, [p.text for p in prompts], [p.answer for p in prompts],
                          [p.wrong for p in prompts], "right_over_wrong")


@torch.no_grad()
def ioi_dla(model: Any, prompts: Sequence[corpus.IOIPrompt]) -> dict[str, Any]:
    """Direct logit attribution of the IO-S logit difference at the final position.

    Each head's result and each MLP's output, scaled by the final LayerNorm of the full
    residual stream, dotted with ``W_U[:, IO] - W_U[:, S]``; averaged over ``prompts``.
    Returns ``{"heads": {"L2H1": x, ...}, "mlps": {"0": x, ...}, "embed": x, "logit_diff": x}``.
    """
    sums: dict[str, float] = defaultdict(float)
    for _, idx in _by_length(model, [p.text for p in prompts]).items():
        batch = [prompts[i] for i in idx]
        toks = _tokens(model, [p.text for p in batch])
        logits, cache = model.run_with_cache(toks)
        direction = model.W_U[:, [single_id(model, p.io) for p in batch]] - model.W_U[
            :, [single_id(model, p.s) for p in batch]
        ]  # [d_model, batch]
        heads, labels = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
        per_head = (heads * direction.T[None]).sum(-1)  # [n_heads_total, batch]
        for label, v in zip(labels, per_head.sum(-1).tolist(), strict=True):
            sums["head:" + label] += v
        comps, clabels = cache.decompose_resid(layer=-1, mode="all", apply_ln=True, pos_slice=-1,
                                               return_labels=True)
        per_comp = (comps * direction.T[None]).sum(-1)
        for label, v in zip(clabels, per_comp.sum(-1).tolist(), strict=True):
            sums["comp:" + label] += v
        rows = torch.arange(len(batch))
        io = torch.tensor([single_id(model, p.io) for p in batch])
        s = torch.tensor([single_id(model, p.s) for p in batch])
        sums["logit_diff"] += (logits[rows, -1, io] - logits[rows, -1, s]).sum().item()
    n = len(prompts)
    heads = {k[5:]: v / n for k, v in sums.items() if k.startswith("head:")}
    comps = {k[5:]: v / n for k, v in sums.items() if k.startswith("comp:")}
    return {
        "heads": heads,
        "mlps": {k.split("_")[0]: v for k, v in comps.items() if k.endswith("_mlp_out")},
        "attn": {k.split("_")[0]: v for k, v in comps.items() if k.endswith("_attn_out")},
        "embed": comps.get("embed", 0.0) + comps.get("pos_embed", 0.0),
        "logit_diff": sums["logit_diff"] / n,
    }


@torch.no_grad()
def ioi_position_patching(model: Any, prompts: Sequence[corpus.IOIPrompt]) -> dict[str, Any]:
    """Fraction of the clean IO-S logit difference restored by patching ``resid_pre`` per layer/position.

    The corrupted prompt replaces the second subject mention (S2) by the IO name, which flips
    the answer; patching the clean residual stream at one (layer, position) into the corrupted
    run shows where the information sits: at S2 early, at the final position late.
    Returns ``{"positions": [...], "restored": [[...] per layer + final resid]}`` with named
    positions IO, S1, S2, END (means over prompts of one template, all same length).
    """
    template = prompts[0].template
    prompts = [p for p in prompts if p.template == template]
    clean = _tokens(model, [p.text for p in prompts])
    # the corrupted prompt differs from the clean one in the S2 token only
    corrupt = clean.clone()
    s_ids = torch.tensor([single_id(model, p.s) for p in prompts])
    io_ids = torch.tensor([single_id(model, p.io) for p in prompts])
    s2_pos = []
    for i in range(len(prompts)):
        where = (clean[i] == s_ids[i]).nonzero().flatten().tolist()
        s2_pos.append(where[-1])
        corrupt[i, where[-1]] = io_ids[i]
    io_pos = [(clean[i] == io_ids[i]).nonzero().flatten().tolist()[0] for i in range(len(prompts))]
    s1_pos = [(clean[i] == s_ids[i]).nonzero().flatten().tolist()[0] for i in range(len(prompts))]
    end = clean.shape[1] - 1
    rows = torch.arange(len(prompts))

    def diff(logits: torch.Tensor) -> float:
        return (logits[rows, -1, io_ids] - logits[rows, -1, s_ids]).mean().item()

    _, clean_cache = model.run_with_cache(clean)
    clean_diff = diff(model(clean))
    corrupt_diff = diff(model(corrupt))
    names = {"IO": io_pos, "S1": s1_pos, "S2": s2_pos, "END": [end] * len(prompts)}
    restored = []
    for layer in range(model.cfg.n_layers + 1):
        hook = resid_entering(layer, model.cfg.n_layers)
        row = {}
        for pname, pos in names.items():
            def patch(act, hook, pos=pos):
                act[rows, pos] = clean_cache[hook.name][rows, pos]
                return act
            patched = diff(model.run_with_hooks(corrupt, fwd_hooks=[(hook, patch)]))
            row[pname] = (patched - corrupt_diff) / (clean_diff - corrupt_diff)
        restored.append({"hook": hook, **row})
    return {"template": template, "clean_logit_diff": clean_diff, "corrupt_logit_diff": corrupt_diff,
            "restored": restored}


@torch.no_grad()
def head_attention(model: Any, prompts: Sequence[corpus.IOIPrompt], heads: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Mean attention from the final position (and from S2) to IO, S1 and S2 for ``heads``."""
    template = prompts[0].template
    prompts = [p for p in prompts if p.template == template]
    toks = _tokens(model, [p.text for p in prompts])
    _, cache = model.run_with_cache(toks)
    s_ids = [single_id(model, p.s) for p in prompts]
    io_ids = [single_id(model, p.io) for p in prompts]
    out = {}
    for layer, head in heads:
        pat = cache[hook_name("pattern", layer)][:, head]  # [batch, q, k]
        rec: defaultdict[str, float] = defaultdict(float)
        for i in range(len(prompts)):
            s_where = (toks[i] == s_ids[i]).nonzero().flatten().tolist()
            io_where = (toks[i] == io_ids[i]).nonzero().flatten().tolist()[0]
            s1, s2 = s_where[0], s_where[-1]
            rec["END->IO"] += pat[i, -1, io_where].item()
            rec["END->S1"] += pat[i, -1, s1].item()
            rec["END->S2"] += pat[i, -1, s2].item()
            rec["S2->S1"] += pat[i, s2, s1].item()
            rec["S2->S1+1"] += pat[i, s2, s1 + 1].item()
        out[f"L{layer}H{head}"] = {k: v / len(prompts) for k, v in rec.items()}
    return out


def report(model: Any) -> dict[str, Any]:
    """Every measurement of the model card, on the held-out evaluation sets."""
    import random

    ioi = corpus.heldout_ioi_prompts(200)
    rng = random.Random(2)
    ioi_train_frames = [corpus.random_ioi(rng, corpus.TRAIN_IOI_TEMPLATES, corpus.HELDOUT_NAMES) for _ in range(200)]
    ioi_train = [corpus.random_ioi(rng, corpus.TRAIN_IOI_TEMPLATES, corpus.TRAIN_NAMES) for _ in range(200)]
    dla = ioi_dla(model, ioi)
    ranked = sorted(dla["heads"].items(), key=lambda kv: -abs(kv[1]))
    top = [(int(layer), int(head)) for layer, head in (k[1:].split("H") for k, _ in ranked[:4])]  # "L1H2" -> (1, 2)
    return {
        "ioi_heldout_names_heldout_frames": ioi_scores(model, ioi),
        "ioi_heldout_names_train_frames": ioi_scores(model, ioi_train_frames),
        "ioi_train_names_train_frames": ioi_scores(model, ioi_train),
        "pronoun_heldout": pronoun_scores(model, corpus.heldout_pronoun_prompts()),
        "object_it_heldout": pronoun_scores(model, corpus.heldout_object_prompts()),
        "dla": dla,
        "dla_ranked_heads": ranked,
        "position_patching": ioi_position_patching(model, corpus.heldout_ioi_prompts(40)),
        "attention": head_attention(model, corpus.heldout_ioi_prompts(40), top),
    }


def main(argv: list[str] | None = None) -> None:
    from hookpatch.model._loading import load_model

    argv = sys.argv[1:] if argv is None else argv
    model = load_model(argv[0] if argv else "organism", device="cpu")
    print(json.dumps(report(model), indent=1))


if __name__ == "__main__":
    main()
