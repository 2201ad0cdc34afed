"""hookpatch's edge attribution (EAP) against TransformerLens 4.3's ``attribution_patch`` at
``granularity="edge"`` (``transformer_lens.tools.analysis.attribution_patching``), to 1e-4.

What TransformerLens computes (read from its source; the tests below check it number by number):

* Sources (writers): ``hook_embed`` (the token embedding), each head's ``attn.hook_result``
  (``z_h W_O[h]``, without ``b_O``) and each ``hook_mlp_out``. hookpatch's input sender is
  ``blocks.0.hook_resid_pre`` (token plus positional embedding) and its head sender a head's
  ``z_h W_O[h]``; both runs share the positional embedding and ``b_O``, so the clean − corrupt
  differences Δ are the same.
* Destinations (readers): each head's split ``attn.hook_q_input`` / ``hook_k_input`` /
  ``hook_v_input`` separately (three destinations per head, not summed), ``hook_mlp_in``, and
  the logits at ``blocks.{n_layers-1}.hook_resid_post``: hookpatch's ``L1H2.q`` / ``.k`` /
  ``.v``, ``MLP1`` and ``logits``. Same-layer heads feed the MLP; every writer feeds the logits.
* Score: ``Δ_writer · ∂metric/∂(reader input)``, the gradient read by backward hooks on the
  *corrupt* run (the one passed as ``corrupt``), through every LayerNorm / RMSNorm (nothing
  frozen), with ``Δ = clean − corrupt``: the denoising convention. Noising is the same call with
  the two token tensors swapped.
* One key per position ``(Node(writer, position), Node(reader, position))``: hookpatch sums
  over positions unless ``per_position=True``, which is what is compared here.
* Per-example loop: each pair runs alone (batch 1) with ``metric_fn`` on its own logits (a
  scalar), and ``edge_scores`` is the mean over pairs; hookpatch keeps one value per prompt.
* Refused: grouped-query / multi-query attention (``n_key_value_heads != n_heads``: K/V inputs
  are not per query head) and blocks that normalise or scale the attention output before the
  residual add (Gemma 2's post-attention norm); hookpatch scores both (per KV head; through
  its head deltas). EAP-IG (``ig_steps > 1``) raises ``NotImplementedError``, so only EAP is
  comparable. Where TransformerLens runs, the definitions coincide and no mapping beyond
  relabelling is needed.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

from hookpatch import LogitDiff, pronoun_prompts, tiny_model
from hookpatch.circuits import edge_attribution, graph

EDGE = EdgeAttributionConfig(granularity="edge")


def sender_label(node) -> str:
    return {"embed": "input", "attn_head_out": f"L{node.layer}H{node.head}", "mlp_out": f"MLP{node.layer}"}[node.kind]


def receiver_label(node) -> str:
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"L{node.layer}H{node.head}.{node.kind[0]}"
    return f"MLP{node.layer}" if node.kind == "mlp_in" else "logits"


def tl_scores(edge_scores, labels, n_pos) -> torch.Tensor:
    """TransformerLens' ``{(writer, reader): score}`` as ``[edge, pos]`` in hookpatch's edge
    order, checking that the keys cover every (edge, position) exactly once."""
    index = {label: i for i, label in enumerate(labels)}
    out = torch.full((len(labels), n_pos), float("nan"), dtype=torch.float64)
    for (writer, reader), value in edge_scores.items():
        assert writer.position == reader.position
        i = index[f"{sender_label(writer)}->{receiver_label(reader)}"]
        assert out[i, writer.position].isnan()
        out[i, writer.position] = value
    assert not out.isnan().any(), "TransformerLens left some edge or position unscored"
    return out


def logit_diff(prompts, i):
    """The metric of prompt ``i`` on its own batch-1 logits, by hand."""
    end, good, bad = int(prompts.end[i]), int(prompts.correct_tokens[i]), int(prompts.incorrect_tokens[i])
    return lambda logits: logits[0, end, good] - logits[0, end, bad]


_MHA: dict[str, object] = {}


def mha_model(family: str):
    """``family`` with as many KV heads as query heads (TransformerLens refuses grouped
    queries) and random norm weights; built once."""
    if family not in _MHA:
        _MHA[family] = tiny_model(family, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_mlp=128,
                                  norm_std=0.2, seed=21)
    return _MHA[family]


@pytest.fixture(params=["gpt2", "gpt2_variant", "llama_mha", "qwen3_mha"])
def tl_model(request, gpt2_model, gpt2_variant_model):
    name = request.param
    if name == "gpt2":
        return gpt2_model
    if name == "gpt2_variant":  # random LayerNorm weights and biases
        return gpt2_variant_model
    return mha_model(name.removesuffix("_mha"))


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_eap_matches_transformer_lens_per_prompt_and_position(tl_model, direction):
    model = tl_model
    prompts = pronoun_prompts(model, n=3, seed=0)
    ours = edge_attribution(model, prompts, LogitDiff(prompts), direction=direction, per_position=True,
                            progress=False)  # [edge, pos, batch]
    g = graph(model)
    labels = ours.labels["edge"]
    assert labels == tuple(e.label for e in g.edges)
    clean, corrupted = prompts.clean_tokens, prompts.corrupted_tokens
    if direction == "noising":  # TransformerLens' gradient run is its `corrupt` argument
        clean, corrupted = corrupted, clean
    for i in range(len(prompts)):
        res = attribution_patch(model, clean[i : i + 1], corrupted[i : i + 1], logit_diff(prompts, i), EDGE)
        theirs = tl_scores(res.edge_scores, labels, prompts.n_pos)
        torch.testing.assert_close(ours.values[:, :, i].double(), theirs, atol=1e-4, rtol=0)
    # not vacuous: every receiver class carries scores well above the tolerance
    for kind in ("q", "k", "v", "mlp", "logits"):
        rows = [j for j, e in enumerate(g.edges) if e.receiver.input == kind]
        assert ours.values[rows].abs().max() > 1e-2, kind


def test_batch_mean_matches_transformer_lens(gpt2_model):
    """TransformerLens loops over pairs and averages; a metric that is the same callable for
    every pair (the last position's logit difference of two fixed tokens) lets one batched call
    be compared with hookpatch's mean over prompts (positions summed)."""
    prompts = pronoun_prompts(gpt2_model, n=3, seed=1)
    good, bad = int(prompts.correct_tokens[0]), int(prompts.incorrect_tokens[0])
    ours = edge_attribution(gpt2_model, prompts, lambda logits: logits[..., -1, good] - logits[..., -1, bad],
                            progress=False)
    res = attribution_patch(gpt2_model, prompts.clean_tokens, prompts.corrupted_tokens,
                            lambda logits: logits[0, -1, good] - logits[0, -1, bad], EDGE)
    theirs = tl_scores(res.edge_scores, ours.labels["edge"], prompts.n_pos).sum(-1)
    assert theirs.abs().max() > 1e-2
    torch.testing.assert_close(ours.mean().double(), theirs, atol=1e-4, rtol=0)


def test_transformer_lens_refuses_what_hookpatch_scores(llama_model, gemma2_model):
    """Grouped-query attention and post-attention norms: TransformerLens refuses the edge graph;
    hookpatch scores it (finite, one value per edge), so there is nothing to compare there."""
    for model, why in ((llama_model, "GQA/MQA"), (gemma2_model, "normalized or scaled")):
        prompts = pronoun_prompts(model, n=2, seed=0)
        with pytest.raises(ValueError, match=why):
            attribution_patch(model, prompts.clean_tokens[:1], prompts.corrupted_tokens[:1],
                              logit_diff(prompts, 0), EDGE)
        ours = edge_attribution(model, prompts, LogitDiff(prompts), progress=False)
        assert ours.values.shape == (graph(model).n_edges, 2) and ours.values.isfinite().all()
    with pytest.raises(NotImplementedError):  # no EAP-IG in TransformerLens 4.3
        EdgeAttributionConfig(granularity="edge", ig_steps=5)
