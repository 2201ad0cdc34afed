"""The shipped model organism: offline loading, held-out accuracy, the training script, the
tokenizer, bad input, and the circuit facts stated in its model card (computed here, not copied).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.model import _tiny as tiny
from hookpatch.model import encode, to_single_token
from hookpatch.model._loading import load_model, organism_path
from hookpatch.model._tiny import task_texts
from hookpatch.organism import CHECKPOINT_DIR, REQUIRED_FILES, file_sha256, verify_checkpoint
from hookpatch.organism import _corpus as corpus
from hookpatch.organism.train import TrainConfig, build_tokenizer, train
from hookpatch.organism.train import main as train_main
from hookpatch.tasks import _vocab as vocab


@pytest.fixture(scope="module")
def model():
    return load_model("organism", device="cpu")


@pytest.fixture(scope="module")
def heldout_ioi():
    return corpus.heldout_ioi_prompts(200)


def _final_logits(model, texts):
    """Logits at the last position, batching prompts of equal token length."""
    out = torch.empty(len(texts), model.cfg.d_vocab)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(len(encode(model, t)), []).append(i)
    with torch.no_grad():
        for idx in groups.values():
            toks = torch.tensor([encode(model, texts[i]) for i in idx])
            out[idx] = model(toks)[:, -1].float()
    return out


def _ioi_direction(model, prompts):
    io = [to_single_token(model, p.io) for p in prompts]
    s = [to_single_token(model, p.s) for p in prompts]
    return torch.tensor(io), torch.tensor(s)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def test_checkpoint_is_small_readable_and_complete():
    assert organism_path() == CHECKPOINT_DIR
    files = {f.name: f for f in CHECKPOINT_DIR.iterdir() if f.is_file()}
    for name in REQUIRED_FILES + ("training_config.json", "MODEL_CARD.md"):
        assert name in files, name
        assert files[name].stat().st_mode & 0o444 == 0o444, f"{name} is not world-readable"
    assert sum(f.stat().st_size for f in files.values()) <= 5 * 2**20
    record = json.loads(files["training_config.json"].read_text())
    assert record["recipe"]["seed"] == TrainConfig().seed
    assert record["recipe"] == json.loads(json.dumps(TrainConfig().__dict__)), (
        "the shipped checkpoint was not trained with the default recipe of train.py"
    )
    verify_checkpoint()


def test_loads_offline_with_transformer_lens_hook_names(model):
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert model.cfg.n_layers == config["n_layer"]
    assert model.cfg.d_model == config["n_embd"]
    assert model.cfg.n_heads == config["n_head"]
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    _, cache = model.run_with_cache("When John and Mary went to the shops, John gave the bag to")
    for name in ("blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern",
                 f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "ln_final.hook_scale"):
        assert name in cache, name
    assert model.to_str_tokens("Mary is a great friend, isn’t")[:3] == ["<|endoftext|>", "Mary", " is"]


# ------------------------------------------------------------------------------------------
# Held-out behaviour
# ------------------------------------------------------------------------------------------
def test_heldout_split_is_disjoint_and_covers_the_defaults():
    assert not set(corpus.HELDOUT_NAMES) & set(corpus.TRAIN_NAMES)
    assert set(corpus.HELDOUT_NAMES) | set(corpus.TRAIN_NAMES) >= set(vocab.FEMALE_NAMES + vocab.MALE_NAMES)
    assert not set(corpus.HELDOUT_IOI_TEMPLATES) & set(corpus.TRAIN_IOI_TEMPLATES)
    assert len(set(corpus.HELDOUT_IOI_TEMPLATES + corpus.TRAIN_IOI_TEMPLATES)) >= 15
    assert len(corpus.ALL_NAMES) >= 60
    assert not set(corpus.HELDOUT_PRONOUN_FRAMES) & set(corpus.TRAIN_PRONOUN_FRAMES)
    # held-out names and frames never occur in the task sentences of the training stream
    import random
    import re

    rng = random.Random(0)
    ioi = [corpus.sample_sentence(rng, "ioi") for _ in range(2000)]
    pronoun = [corpus.sample_sentence(rng, "pronoun") for _ in range(2000)]
    heldout = set(corpus.HELDOUT_NAMES)
    assert not any(heldout & set(re.findall(r"\w+", s)) for s in ioi + pronoun)
    for frame in corpus.HELDOUT_IOI_TEMPLATES:
        pattern = re.escape(frame)
        for key in ("A", "B", "S", "place", "object"):
            pattern = pattern.replace(re.escape("{" + key + "}"), r"\w+")
        assert not any(re.match(pattern, s) for s in ioi), frame
    for adj, noun in corpus.HELDOUT_PRONOUN_FRAMES:
        assert not any(f" {adj} {noun}," in s for s in pronoun)


def test_heldout_ioi_accuracy_and_logit_difference(model, heldout_ioi):
    logits = _final_logits(model, [p.text for p in heldout_ioi])
    io, s = _ioi_direction(model, heldout_ioi)
    rows = torch.arange(len(heldout_ioi))
    diff = logits[rows, io] - logits[rows, s]
    assert {p.order for p in heldout_ioi} == {"ABBA", "BABA"}
    assert all(p.template in corpus.HELDOUT_IOI_TEMPLATES for p in heldout_ioi)
    assert all(p.io[1:] in corpus.HELDOUT_NAMES and p.s[1:] in corpus.HELDOUT_NAMES for p in heldout_ioi)
    assert (diff > 0).float().mean() >= 0.95  # IOI accuracy: logit(IO) > logit(S)
    assert diff.mean() >= 3.0
    assert (logits.argmax(-1) == io).float().mean() >= 0.9  # IO is the top token of the vocabulary


def test_heldout_pronoun_accuracy(model):
    prompts = corpus.heldout_pronoun_prompts() + corpus.heldout_object_prompts()
    logits = _final_logits(model, [p.text for p in prompts])
    right = torch.tensor([to_single_token(model, p.answer) for p in prompts])
    assert (logits.argmax(-1) == right).float().mean() >= 0.95
    she, he = to_single_token(model, " she"), to_single_token(model, " he")
    user = _final_logits(model, [t.format(name=n) for t in vocab.PRONOUN_TEMPLATES for n, _ in vocab.PRONOUN_NAMES])
    answers = [a for _ in vocab.PRONOUN_TEMPLATES for _, a in vocab.PRONOUN_NAMES]
    for row, answer in zip(user, answers, strict=True):  # pronoun_prompts' 20 prompts
        assert (row[she] > row[he]) == (answer == " she")


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_every_template_word(model):
    tok = model.tokenizer
    texts = list(task_texts())
    texts += [t.format(A="John", B="Mary", S="John", place="park", object="ring") for t in
              corpus.TRAIN_IOI_TEMPLATES + corpus.HELDOUT_IOI_TEMPLATES]
    texts += [corpus.pronoun_frame(a, n).format(name="Mary") + " she" for a in corpus.PRONOUN_ADJECTIVES
              for n in corpus.PRONOUN_NOUNS]
    words = {w for t in texts for w in t.replace(",", " ").replace(".", " ").split()}
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    assert encode(model, texts[0])[0] == tok.bos_token_id  # the bridge prepends BOS
    for word in words | {" " + w for w in words}:
        if word.strip() in ("isn’t",):
            continue
        to_single_token(model, word if word.startswith(" ") else " " + word)
    for name in corpus.ALL_NAMES:  # sentence-initial without a space, else with one
        assert model.to_str_tokens(f"{name} met {name}")[1:] == [name, " met", " " + name]
    for template in vocab.IOI_TEMPLATES:  # every default prompt of the library tokenizes
        for a, b in zip(vocab.FEMALE_NAMES, vocab.MALE_NAMES, strict=True):
            for place, obj in zip(vocab.IOI_PLACES, vocab.IOI_OBJECTS, strict=True):
                encode(model, template.format(A=a, B=b, S=a, place=place, object=obj))
    every = corpus.training_stream(1)
    seen = {p for _ in range(20000) for p in tok.tokenize(next(every))}
    assert set(tok.get_vocab()) - seen <= {"<unk>", "<|endoftext|>"}, "a vocabulary word is never trained"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _saved_tokenizer_sha256(tok, directory) -> dict[str, str]:
    tok.save_pretrained(directory)
    return {name: file_sha256(directory / name) for name in TOKENIZER_FILES}


def test_tokenizer_rebuilt_from_the_frozen_vocabulary_is_the_shipped_one(tmp_path):
    shipped = {name: file_sha256(CHECKPOINT_DIR / name) for name in TOKENIZER_FILES}
    assert _saved_tokenizer_sha256(build_tokenizer(), tmp_path / "rebuilt") == shipped
    recorded = json.loads((CHECKPOINT_DIR / "training_config.json").read_text())["sha256"]
    assert {name: recorded[name] for name in TOKENIZER_FILES} == shipped
    frozen = corpus.vocabulary()
    ids = json.loads((CHECKPOINT_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    assert list(frozen.pieces) == sorted(ids, key=ids.__getitem__)  # token id = position in the file
    # the comparison is sensitive: one more piece gives another tokenizer
    extra = dataclasses.replace(frozen, pieces=frozen.pieces + (" zebra",))
    assert _saved_tokenizer_sha256(build_tokenizer(extra), tmp_path / "extra") != shipped


def test_frozen_vocabulary_does_not_depend_on_task_builders_or_test_helpers(tmp_path, monkeypatch):
    shipped = {name: file_sha256(CHECKPOINT_DIR / name) for name in TOKENIZER_FILES}
    before = corpus.vocabulary()
    monkeypatch.setattr(vocab, "IOI_PLACES", vocab.IOI_PLACES + ("zoo",))
    monkeypatch.setattr(vocab, "FEMALE_NAMES", vocab.FEMALE_NAMES + ("Zelda",))
    monkeypatch.setattr(vocab, "PRONOUN_TEMPLATES", ("{name} is a zany zebra, isn’t",))
    assert "zoo" in " ".join(tiny.task_texts())  # what the vocabulary used to be built from changed

    def refuse(*args, **kwargs):
        raise AssertionError("the organism's tokenizer must not use hookpatch.model._tiny")

    monkeypatch.setattr(tiny, "task_texts", refuse)
    monkeypatch.setattr(tiny, "word_level_tokenizer", refuse)
    monkeypatch.setattr(tiny, "GPT2_SPLIT", "zebra")
    monkeypatch.setitem(sys.modules, "hookpatch.model._tiny", None)  # importing it now fails
    assert corpus.vocabulary() == before
    assert _saved_tokenizer_sha256(build_tokenizer(), tmp_path) == shipped


def test_corpus_words_outside_the_frozen_vocabulary_are_refused(tmp_path):
    frozen = corpus.vocabulary()
    without = dataclasses.replace(frozen, pieces=tuple(p for p in frozen.pieces if p != " Kevin"))
    with pytest.raises(HookpatchError, match="outside its frozen vocabulary.*' Kevin'"):
        build_tokenizer(without)
    bad = tmp_path / "vocabulary.json"
    bad.write_text(json.dumps({"pieces": ["<unk>"]}))
    with pytest.raises(HookpatchError, match="vocabulary.json"):
        corpus.vocabulary(bad)
    bad.write_text(json.dumps({**dataclasses.asdict(frozen), "pieces": list(frozen.pieces) + [" is"]}))
    with pytest.raises(HookpatchError, match="repeated"):
        corpus.vocabulary(bad)


def test_unknown_words_and_long_prompts_are_refused(model):
    with pytest.raises(HookpatchError, match="zebra"):
        encode(model, "Mary is a great zebra, isn’t")
    with pytest.raises(HookpatchError, match="context"):
        encode(model, " ".join(["Mary"] * (model.cfg.n_ctx + 1)))


# ------------------------------------------------------------------------------------------
# Bad input to load_model
# ------------------------------------------------------------------------------------------
def test_unsupported_options_are_refused():
    with pytest.raises(HookpatchError, match="tokenizer"):
        load_model("organism", device="cpu", tokenizer=object())
    with pytest.raises(HookpatchError, match="dtype"):
        load_model("organism", device="cpu", dtype=torch.int64)


@pytest.mark.parametrize(
    "damage, file",
    [
        ("delete", "model.safetensors"),
        ("delete", "tokenizer.json"),
        ("truncate", "model.safetensors"),
        ("flip", "model.safetensors"),
        ("truncate", "config.json"),
    ],
)
def test_damaged_checkpoint_names_the_file(tmp_path, monkeypatch, damage, file):
    copy = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT_DIR, copy)
    target = copy / file
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    else:
        data = bytearray(target.read_bytes())
        data[-100] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(HookpatchError, match=file.replace(".", r"\.")):
        verify_checkpoint(copy)
    monkeypatch.setattr("hookpatch.model._loading._ORGANISM_DIR", copy)
    with pytest.raises(HookpatchError, match=file.replace(".", r"\.")):
        load_model("organism", device="cpu")


# ------------------------------------------------------------------------------------------
# Training script
# ------------------------------------------------------------------------------------------
def test_a_few_training_steps_reduce_the_loss():
    _, _, losses = train(TrainConfig.tiny(), quiet=True)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    train_main(["--out", str(out), "--tiny", "--quiet", "--config", '{"steps": 3}'])
    for name in REQUIRED_FILES + ("training_config.json",):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    record = json.loads((out / "training_config.json").read_text())
    assert record["recipe"]["steps"] == 3
    verify_checkpoint(out)
    tiny = load_model(out, device="cpu")
    assert tiny.cfg.n_layers == TrainConfig.tiny().n_layers


# ------------------------------------------------------------------------------------------
# The IOI circuit, as stated in MODEL_CARD.md (computed here)
# ------------------------------------------------------------------------------------------
S_SUPPRESSION_HEAD = (0, 1)  # attends END -> S2 and writes minus that name
NAME_BOOST_HEADS = {(2, 2), (2, 3)}  # raise both names of the prompt over all other names


@pytest.fixture(scope="module")
def ioi_dla(model, heldout_ioi):
    """Per-head and per-MLP direct logit attribution of logit(IO) - logit(S) at END."""
    heads = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    mlps = torch.zeros(model.cfg.n_layers)
    total = 0.0
    groups: dict[int, list] = {}
    for p in heldout_ioi:
        groups.setdefault(len(encode(model, p.text)), []).append(p)
    with torch.no_grad():
        for batch in groups.values():
            toks = torch.tensor([encode(model, p.text) for p in batch])
            logits, cache = model.run_with_cache(toks)
            io, s = _ioi_direction(model, batch)
            direction = (model.W_U[:, io] - model.W_U[:, s]).T  # [batch, d_model]
            result = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
            heads += (result * direction).sum(-1).sum(-1).reshape(model.cfg.n_layers, model.cfg.n_heads)
            for layer in range(model.cfg.n_layers):
                out = cache[f"blocks.{layer}.hook_mlp_out"][None, :, -1]  # [1, batch, d_model] at END
                mlp = cache.apply_ln_to_stack(out, layer=-1, pos_slice=-1)
                mlps[layer] += (mlp[0] * direction).sum().item()
            rows = torch.arange(len(batch))
            total += (logits[rows, -1, io] - logits[rows, -1, s]).sum().item()
    n = len(heldout_ioi)
    return heads / n, mlps / n, total / n


def _ranked(heads):
    pairs = [((layer, h), heads[layer, h].item()) for layer in range(heads.shape[0]) for h in range(heads.shape[1])]
    return sorted(pairs, key=lambda kv: -kv[1])


def test_dla_is_carried_by_one_s_suppression_head_not_mlps(ioi_dla):
    heads, mlps, total = ioi_dla
    assert total >= 3.0
    assert mlps.abs().max() < 1e-3 * total  # attention-only: the MLPs are zero
    ranked = _ranked(heads)
    assert ranked[0][0] == S_SUPPRESSION_HEAD
    assert ranked[0][1] >= 0.7 * total
    assert sum(abs(v) for _, v in ranked[1:]) < ranked[0][1]
    assert heads.sum() == pytest.approx(total, rel=0.1)


def test_s_suppression_head_attends_to_s2_and_copies_negatively(model, heldout_ioi):
    from hookpatch.organism.analysis import head_attention

    layer, head = S_SUPPRESSION_HEAD
    to_s2 = [head_attention(model, [p for p in heldout_ioi if p.template == t], [S_SUPPRESSION_HEAD])
             [f"L{layer}H{head}"] for t in corpus.HELDOUT_IOI_TEMPLATES]
    assert all(a["END->S2"] > max(a["END->IO"], a["END->S1"]) + 0.3 for a in to_s2)
    assert sum(a["END->S2"] for a in to_s2) / len(to_s2) >= 0.6
    # OV circuit on names: the name attended to is the name whose logit drops the most
    ids = torch.tensor([to_single_token(model, " " + n) for n in corpus.ALL_NAMES])
    with torch.no_grad():
        ov = model.W_E[ids] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U[:, ids]
    self_lowest = (ov.argmin(-1) == torch.arange(len(ids))).float().mean()
    assert self_lowest >= 0.9


def test_ablating_the_s_suppression_head_removes_the_answer(model, heldout_ioi):
    prompts = [p for p in heldout_ioi if p.template == corpus.HELDOUT_IOI_TEMPLATES[0]]
    toks = torch.tensor([encode(model, p.text) for p in prompts])
    io, s = _ioi_direction(model, prompts)
    rows = torch.arange(len(prompts))

    def ablate(z, hook):
        z[:, -1, S_SUPPRESSION_HEAD[1]] = 0.0
        return z

    with torch.no_grad():
        clean = model(toks)[rows, -1]
        ablated = model.run_with_hooks(
            toks, fwd_hooks=[(f"blocks.{S_SUPPRESSION_HEAD[0]}.attn.hook_z", ablate)]
        )[rows, -1]
    clean_diff = (clean[rows, io] - clean[rows, s]).mean()
    ablated_diff = (ablated[rows, io] - ablated[rows, s]).mean()
    assert ablated_diff < 0.2 * clean_diff


def test_layer_two_heads_raise_both_names_over_the_rest(model, heldout_ioi):
    ids = [to_single_token(model, " " + n) for n in corpus.ALL_NAMES]
    boost_io = torch.zeros(model.cfg.n_layers * model.cfg.n_heads)
    boost_s = torch.zeros_like(boost_io)
    prompts = [p for p in heldout_ioi if p.template == corpus.HELDOUT_IOI_TEMPLATES[0]]
    toks = torch.tensor([encode(model, p.text) for p in prompts])
    io, s = _ioi_direction(model, prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
        result = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [heads, batch, d]
        for i in range(len(prompts)):
            others = [j for j in ids if j not in (io[i].item(), s[i].item())]
            rest = model.W_U[:, others].mean(-1)
            boost_io += result[:, i] @ (model.W_U[:, io[i]] - rest) / len(prompts)
            boost_s += result[:, i] @ (model.W_U[:, s[i]] - rest) / len(prompts)
    top = {divmod(i, model.cfg.n_heads) for i in boost_io.topk(2).indices.tolist()}
    assert top == NAME_BOOST_HEADS
    for layer, head in NAME_BOOST_HEADS:
        i = layer * model.cfg.n_heads + head
        assert boost_io[i] >= 2.0 and boost_s[i] >= 2.0


def test_ioi_signal_sits_at_s2_early_and_at_end_late(model, heldout_ioi):
    from hookpatch.organism.analysis import ioi_position_patching

    restored = ioi_position_patching(model, heldout_ioi)["restored"]
    first, second, last = restored[0], restored[1], restored[-1]
    assert first["S2"] == pytest.approx(1.0, abs=0.05) and abs(first["END"]) < 0.05
    assert second["END"] >= 0.9 and abs(second["S2"]) < 0.1  # moved to END by layer 0's heads
    assert last["END"] == pytest.approx(1.0, abs=0.05)
