"""Small random models for offline tests and demos, loaded through the real bridge path.

Each builder writes a HuggingFace checkpoint (random weights, a tokenizer over the built-in
tasks' words) to a directory and loads it with :func:`~hookpatch.model._loading.load_model`,
so a test model is a real ``TransformerBridge`` in compatibility mode, exactly as GPT-2 or
Qwen would be. Six families, one per architecture variant the library supports:
``"gpt2"`` (LayerNorm, learned positions, multi-head), ``"llama"`` (RMSNorm, rotary, gated
MLP, grouped-query attention), ``"qwen2"`` (Llama's block with q/k/v biases), ``"qwen3"``
(per-head q/k RMSNorm, heads wider than ``d_model / n_heads``), ``"gemma2"`` (offset
RMSNorm before and after each sublayer, soft-capped attention and final logits, sliding
window on alternate layers) and ``"mistral"`` (Llama's block, optional sliding window).
Matrices are drawn with a large std and norm weights and biases are randomised, so a wrong
fold or a dropped term changes the numbers. Each builds in well under a second.
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
from hookpatch.model._loading import load_model, record_load_spec
from hookpatch.tasks import _vocab as vocab

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
    ``<unk>``, which :func:`hookpatch.model._tokens.encode` refuses.
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


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gemma2", "mistral")
# Qwen2's model type makes AutoTokenizer swap in Qwen2Tokenizer, which mangles a word-level
# tokenizer.json and keeps a byte-level BPE one; Qwen models ship byte-level BPE anyway.
_BPE_FAMILIES = ("qwen2", "qwen3")
_WORD_REFUSED = ("qwen2",)
_WINDOWED = ("gemma2", "mistral")  # families with a sliding_window setting


def _family_model(
    family: str,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    n_ctx: int,
    head_dim: int | None,
    sliding_window: int | None,
    common: dict[str, Any],
) -> Callable[[], Any]:
    """A builder of ``family``'s HuggingFace model class on its config (random init)."""
    import transformers

    config: Any
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, **common
        )
        return functools.partial(transformers.GPT2LMHeadModel, config)
    if n_heads % n_kv_heads:
        raise HookpatchError(
            f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} (each KV head serves "
            "an equal group of query heads); choose n_kv_heads among the divisors of n_heads."
        )
    gqa: dict[str, Any] = dict(
        hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=n_ctx,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**gqa, tie_word_embeddings=False, **common)
        return functools.partial(transformers.LlamaForCausalLM, config)
    if family == "qwen2":  # Llama's block with biases on q, k and v
        config = transformers.Qwen2Config(**gqa, tie_word_embeddings=False, use_sliding_window=False, **common)
        return functools.partial(transformers.Qwen2ForCausalLM, config)
    if family == "qwen3":  # RMSNorm on each head's q and k; heads wider than d_model / n_heads
        config = transformers.Qwen3Config(
            **gqa, head_dim=head_dim or 2 * d_model // n_heads, tie_word_embeddings=False,
            use_sliding_window=False, **common,
        )
        return functools.partial(transformers.Qwen3ForCausalLM, config)
    if family == "mistral":  # Llama's block; a window over every layer when one is given
        config = transformers.MistralConfig(
            **gqa, sliding_window=sliding_window, tie_word_embeddings=False, **common
        )
        return functools.partial(transformers.MistralForCausalLM, config)
    if family == "gemma2":
        head_dim = head_dim or d_model // n_heads + 8
        config = transformers.Gemma2Config(
            **gqa, head_dim=head_dim, query_pre_attn_scalar=head_dim + 8,  # scale is not 1/sqrt(head_dim)
            sliding_window=4 if sliding_window is None else sliding_window,  # shorter than any task prompt
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
            attn_logit_softcapping=5.0, final_logit_softcapping=8.0,  # low caps, so tanh bends the logits
            tie_word_embeddings=True, pad_token_id=common["bos_token_id"], **common,
        )
        return functools.partial(transformers.Gemma2ForCausalLM, config)
    raise HookpatchError(
        f"unknown family {family!r}; expected one of {', '.join(repr(f) for f in FAMILIES)}."
    )


def _randomize(model: Any, init_std: float | None, norm_std: float | None) -> None:
    """Redraw matrices with std ``init_std`` and perturb norm weights and biases by ``norm_std``.

    HuggingFace initialises norm weights to one (zero for Gemma's offset norms, which scale by
    ``1 + weight``) and biases to zero; such trivial values would hide a wrongly folded norm or
    a dropped bias, so they are moved by ``N(0, norm_std)`` noise.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and init_std is not None:
                p.normal_(0.0, init_std)
            elif p.ndim == 1 and norm_std:
                p.add_(torch.randn_like(p) * norm_std)


def write_tiny_checkpoint(
    directory: str | Path,
    family: str = "gpt2",
    *,
    tokenizer: str | None = None,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    n_ctx: int = 64,
    head_dim: int | None = None,
    sliding_window: int | None = None,
    vocab_size: int | None = None,
    init_std: float | None = 0.2,
    norm_std: float | None = 0.1,
    seed: int = 0,
) -> Path:
    """Save a random ``family`` model and its tokenizer as a HuggingFace checkpoint.

    Families (each a real HuggingFace model class, so ``load_model`` reads it like a hub
    checkpoint):

    - ``"gpt2"``: LayerNorm, learned positions, multi-head attention, biases everywhere.
    - ``"llama"``: RMSNorm, rotary, gated MLP, grouped-query attention, no biases.
    - ``"qwen2"``: Llama's block with biases on the q, k and v projections.
    - ``"qwen3"``: Llama's block with an RMSNorm on each head's q and k, and heads wider than
      ``d_model / n_heads`` (``head_dim``, default ``2 * d_model // n_heads``).
    - ``"gemma2"``: offset RMSNorm (scale ``1 + w``) before and after each sublayer, a scaled
      embedding, attention-logit and final-logit soft-capping (caps 5 and 8, low enough to
      bend the logits), a query scale other than ``1/sqrt(head_dim)``, tied embeddings, and
      sliding-window attention on even layers (``sliding_window``, default 4 tokens: shorter
      than the task prompts, so the window changes the numbers).
    - ``"mistral"``: Llama's block. HuggingFace's ``MistralConfig`` defaults to a 4096-token
      window, which no short prompt reaches; here the default is no window (as Mistral 7B
      v0.2 and later ship), and ``sliding_window=`` sets one on every layer.

    Args:
        directory: where to write ``config.json``, the weights and the tokenizer files.
        family: one of :data:`FAMILIES`.
        tokenizer: ``"word"`` (one id per word of the built-in tasks) or ``"bpe"`` (byte-level
            BPE, GPT-2's scheme). Default ``"bpe"`` for the Qwen families (their real
            tokenizers are byte-level BPE; for ``"qwen2"`` AutoTokenizer swaps in Qwen2's own
            class, which mangles a word-level file), ``"word"`` for the others.
        n_layers, d_model, n_heads, n_kv_heads, d_mlp, n_ctx: sizes (``n_kv_heads`` is
            ignored by GPT-2, which has one KV head per query head).
        head_dim: width of one head (Qwen3 and Gemma 2 only; they default to wider heads).
        sliding_window: attention window in tokens (Gemma 2 and Mistral only).
        vocab_size: widen the embedding beyond the tokenizer (e.g. 50257 for a model with
            GPT-2 small's FLOPs); the extra ids are never produced by the tokenizer.
        init_std: std of every matrix (larger than HF's 0.02, so a small random model makes
            sharp choices); ``None`` keeps HuggingFace's initialisation.
        norm_std: std of the noise added to every norm weight and bias (0 keeps HF's ones
            and zeros); nonzero values make a wrong fold or a dropped bias visible.
        seed: torch seed for the weights.

    Returns:
        ``directory`` as a ``Path``.
    """
    if family not in FAMILIES:
        raise HookpatchError(
            f"unknown family {family!r}; expected one of {', '.join(repr(f) for f in FAMILIES)}."
        )
    tokenizer = tokenizer or ("bpe" if family in _BPE_FAMILIES else "word")
    if tokenizer not in ("word", "bpe"):
        raise HookpatchError(f"unknown tokenizer kind {tokenizer!r}; expected 'word' or 'bpe'.")
    if tokenizer == "word" and family in _WORD_REFUSED:
        raise HookpatchError(
            f"tokenizer='word' does not survive loading for family {family!r}: AutoTokenizer "
            "replaces it by the family's own tokenizer class. Use tokenizer='bpe'."
        )
    if head_dim is not None and family not in ("qwen3", "gemma2"):
        raise HookpatchError(
            f"head_dim= is for the 'qwen3' and 'gemma2' families; {family!r} heads are "
            "d_model / n_heads wide. Drop head_dim= or choose one of those families."
        )
    if sliding_window is not None and family not in _WINDOWED:
        raise HookpatchError(
            f"sliding_window= is for the 'gemma2' and 'mistral' families, not {family!r}; "
            "drop it or choose one of those families."
        )
    tok = word_level_tokenizer() if tokenizer == "word" else byte_bpe_tokenizer()
    common: dict[str, Any] = dict(
        vocab_size=max(len(tok), vocab_size or 0), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    build = _family_model(
        family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_mlp=d_mlp, n_ctx=n_ctx, head_dim=head_dim, sliding_window=sliding_window, common=common,
    )
    torch.manual_seed(seed)
    model = build()
    _randomize(model, init_std, norm_std)
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_model(family: str = "gpt2", *, device: str = "cpu", **kwargs: Any) -> Any:
    """A random ``family`` bridge in compatibility mode, built offline in about a second.

    Example:
        >>> model = tiny_model("llama", n_heads=4, n_kv_heads=2)   # grouped-query attention
        >>> model = tiny_model("gemma2", sliding_window=4)         # window shorter than a prompt

    Args:
        family: one of :data:`FAMILIES` (see :func:`write_tiny_checkpoint` for what each has).
        device: where to put the model.
        **kwargs: sizes, tokenizer and initialisation, as in :func:`write_tiny_checkpoint`.

    Returns:
        A ``TransformerBridge`` loaded by :func:`~hookpatch.model._loading.load_model`.
    """
    with tempfile.TemporaryDirectory(prefix="hookpatch-tiny-") as tmp:
        write_tiny_checkpoint(tmp, family, **kwargs)
        model = load_model(tmp, device=device)
    record_load_spec(model, "tiny_model", family, "write_tiny_checkpoint", device=device, **kwargs)
    return model
