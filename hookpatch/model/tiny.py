"""Small random models for offline tests and demos, loaded through the real bridge path.

Each builder writes a HuggingFace checkpoint (random weights, a tokenizer over the built-in
tasks' words) to a directory and loads it with :func:`~hookpatch.model.loading.load_model`,
so a test model is a real ``TransformerBridge`` in compatibility mode, exactly as GPT-2 or
Qwen would be. Two families: ``"gpt2"`` (LayerNorm, learned positions, multi-head) and
``"llama"`` (RMSNorm, rotary, gated MLP, grouped-query attention, no biases). Built in
about a second. (A Qwen2 config is not offered: TransformerLens reloads a custom tokenizer
through AutoTokenizer, which swaps in Qwen2's own tokenizer class for that model type.)
"""

from __future__ import annotations

import functools
import itertools
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hookpatch.errors import HookpatchError
from hookpatch.model.loading import load_model
from hookpatch.tasks import vocab

BOS = "<|endoftext|>"
UNK = "<unk>"
# GPT-2's pre-tokenization: contractions, words and numbers with their leading space.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""



def task_texts() -> list[str]:
    """Sentences that use every word of the built-in tasks, in both leading-space forms."""
    names = vocab.FEMALE_NAMES + vocab.MALE_NAMES
    texts = [t.format(name=n) + p for t in vocab.PRONOUN_TEMPLATES for n in names for p in (" she", " he")]
    for template, place, obj in zip(
        vocab.IOI_TEMPLATES,
        itertools.cycle(vocab.IOI_PLACES),
        itertools.cycle(vocab.IOI_OBJECTS),
    ):
        texts.append(template.format(A="X", B="Y", S="Z", place=place, object=obj) + " W")
    texts.append(" " + " ".join(vocab.IOI_PLACES + vocab.IOI_OBJECTS))
    texts += [" ".join(names), " " + " ".join(names), " it"]
    for template, _, _ in vocab.TL_DEMO_IOI:
        texts.append(template.format(" John"))
    return texts


def word_level_tokenizer(texts: Iterable[str] | None = None) -> Any:
    """A word-level tokenizer (GPT-2 pre-tokenization, one id per piece) with BOS and UNK.

    Every piece of ``texts`` (default :func:`task_texts`) gets an id; anything else maps to
    ``<unk>``, which :func:`hookpatch.model.tokens.encode` refuses.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated")
    pieces: dict[str, int] = {BOS: 0, UNK: 1}
    for text in texts if texts is not None else task_texts():
        for piece, _ in split.pre_tokenize_str(text):
            pieces.setdefault(piece, len(pieces))
    tok = Tokenizer(models.WordLevel(vocab=pieces, unk_token=UNK))
    tok.pre_tokenizer = split
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=UNK, pad_token=BOS
    )


def byte_bpe_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1200) -> Any:
    """A byte-level BPE tokenizer trained like GPT-2's (leading-space tokens ``Ġword``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts if texts is not None else task_texts())
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS)


def write_tiny_checkpoint(
    directory: str | Path,
    family: str = "gpt2",
    *,
    tokenizer: str = "word",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    n_ctx: int = 64,
    vocab_size: int | None = None,
    init_std: float | None = 0.2,
    seed: int = 0,
) -> Path:
    """Save a random ``family`` model and its tokenizer as a HuggingFace checkpoint.

    ``vocab_size`` widens the embedding beyond the tokenizer (e.g. 50257 for a model with
    GPT-2 small's FLOPs); the extra ids are never produced by the tokenizer. Matrices are
    drawn with std ``init_std`` (larger than HF's 0.02, so a small random model makes sharp
    choices); ``None`` keeps HuggingFace's initialisation.
    """
    import transformers

    if tokenizer not in ("word", "bpe"):
        raise HookpatchError(f"unknown tokenizer kind {tokenizer!r}; expected 'word' or 'bpe'.")
    tok = word_level_tokenizer() if tokenizer == "word" else byte_bpe_tokenizer()
    common = dict(
        vocab_size=max(len(tok), vocab_size or 0), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    config: transformers.PretrainedConfig
    build: Callable[[], transformers.PreTrainedModel]  # the family's model class on its config
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            n_inner=d_mlp, **common,
        )
        build = functools.partial(transformers.GPT2LMHeadModel, config)
    elif family == "llama":
        if n_heads % n_kv_heads:
            raise HookpatchError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}.")
        config = transformers.LlamaConfig(
            hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
            max_position_embeddings=n_ctx, tie_word_embeddings=False, **common,
        )
        build = functools.partial(transformers.LlamaForCausalLM, config)
    else:
        raise HookpatchError(f"unknown family {family!r}; expected 'gpt2' or 'llama'.")
    torch.manual_seed(seed)
    model = build()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, init_std)
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_model(family: str = "gpt2", *, device: str = "cpu", **kwargs: Any) -> Any:
    """A random ``family`` bridge in compatibility mode, built offline in about a second.

    Example:
        >>> model = tiny_model("llama", n_heads=4, n_kv_heads=2)   # grouped-query attention
    """
    with tempfile.TemporaryDirectory(prefix="hookpatch-tiny-") as tmp:
        write_tiny_checkpoint(tmp, family, **kwargs)
        return load_model(tmp, device=device)
