"""Train the model organism: ``python -m hookpatch.organism.train --out DIR [--quiet] [--tiny]``.

A fixed seed, one CPU thread and a seeded corpus stream make the run deterministic: rerunning
the default recipe writes bit-identical weights. The checkpoint directory is a standard
HuggingFace one (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) plus ``training_config.json`` (this recipe, the library versions
and the final losses), with files readable by everyone (mode 0644).

``--tiny`` runs a few steps of a very small model, for tests of the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hookpatch.errors import HookpatchError
from hookpatch.organism import HASHED_FILES, file_sha256
from hookpatch.organism import _corpus as corpus


@dataclass
class TrainConfig:
    """The training recipe; stored as ``training_config.json`` beside the weights."""

    seed: int = 0
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 4  # GPT-2 blocks always have an MLP; with attn_only it is zero and frozen
    attn_only: bool = True  # the MLPs are zero and frozen: an attention-only model
    n_ctx: int = 64
    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 150
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    threads: int = 1
    init_std: float = 0.02
    save_dtype: str = "float32"  # or "float16" (load_model casts to float32)
    mixture: list = field(default_factory=lambda: [list(kw) for kw in corpus.MIXTURE])
    prefix_probability: float = corpus.PREFIX_PROBABILITY

    @classmethod
    def tiny(cls) -> TrainConfig:
        """A few steps of a very small model: for tests of the script, not a useful model."""
        return cls(n_layers=1, d_model=32, n_heads=2, d_mlp=32, attn_only=False, steps=30, batch_size=16,
                   lr=3e-3, warmup_steps=5)


def build_tokenizer(vocabulary: corpus.Vocabulary | None = None, *, check_corpus: bool = True) -> Any:
    """The organism's word-level tokenizer, built from the frozen vocabulary alone.

    ``vocabulary`` defaults to :func:`hookpatch.organism._corpus.vocabulary` (the file
    ``hookpatch/organism/vocabulary.json``): one id per piece, in the file's order, GPT-2
    pre-tokenization by the file's regex, BOS ``<|endoftext|>`` (also EOS and padding) and UNK
    ``<unk>``. Saved with ``save_pretrained`` it is byte-identical to the shipped checkpoint's
    tokenizer files. With ``check_corpus``, raises a :class:`~hookpatch.errors.HookpatchError`
    if a sentence of :func:`~hookpatch.organism._corpus.sample_texts` has a word outside the
    vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    frozen = corpus.vocabulary() if vocabulary is None else vocabulary
    split = pre_tokenizers.Split(Regex(frozen.pre_tokenizer_regex), behavior="isolated")
    ids = {piece: i for i, piece in enumerate(frozen.pieces)}
    if check_corpus:
        missing: dict[str, str] = {}
        for text in corpus.sample_texts():
            for piece, _ in split.pre_tokenize_str(text):
                if piece not in ids:
                    missing.setdefault(piece, text)
        if missing:
            shown = "; ".join(f"{piece!r} (in {text!r})" for piece, text in list(missing.items())[:5])
            raise HookpatchError(
                f"the organism's corpus uses {len(missing)} piece(s) outside its frozen vocabulary "
                f"({corpus.VOCABULARY_FILE.name}): {shown}. Change the corpus templates, or add the "
                "pieces to the vocabulary file (which changes the tokenizer, so retrain)."
            )
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=frozen.unk_token))
    tok.pre_tokenizer = split
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=frozen.bos_token, eos_token=frozen.bos_token,
        unk_token=frozen.unk_token, pad_token=frozen.bos_token,
    )


def build_model(cfg: TrainConfig, vocab_size: int, bos_id: int) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` for ``cfg`` (seeded by the caller)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=bos_id, eos_token_id=bos_id, initializer_range=cfg.init_std,
        tie_word_embeddings=True,
    )
    model = transformers.GPT2LMHeadModel(config)
    if cfg.attn_only:
        with torch.no_grad():
            for block in model.transformer.h:
                for p in block.get_submodule("mlp").parameters():
                    p.zero_()
                    p.requires_grad_(False)
    return model


def _batch(stream, tok, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [next(stream) for _ in range(cfg.batch_size)]
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for text, x in zip(texts, ids, strict=True):
        if tok.unk_token_id in x:
            raise HookpatchError(f"a training example has a word outside the organism's vocabulary: {text!r}")
    longest = max(len(x) for x in ids)
    if longest > cfg.n_ctx:
        raise HookpatchError(f"a training example is {longest} tokens long, over n_ctx={cfg.n_ctx}.")
    inputs = torch.full((len(ids), longest), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), longest), -100, dtype=torch.long)
    for i, x in enumerate(ids):
        inputs[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x) - 1] = torch.tensor(x[1:])
    return inputs, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_fraction`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, *, quiet: bool = False) -> tuple[Any, Any, list[float]]:
    """Train a model with ``cfg``; returns ``(model, tokenizer, losses)`` (one loss per step)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(cfg, len(tok), tok.bos_token_id)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    stream = corpus.training_stream(cfg.seed, cfg.mixture, cfg.prefix_probability)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training organism", disable=quiet)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, labels = _batch(stream, tok, cfg)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return model, tok, losses


def save(model: Any, tok: Any, cfg: TrainConfig, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the checkpoint directory (weights in ``cfg.save_dtype``), all files mode 0644."""
    import tokenizers
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "float16": torch.float16}[cfg.save_dtype]
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    tok.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)  # not needed for a toy LM
    record = {
        "recipe": dataclasses.asdict(cfg),
        "command": "python -m hookpatch.organism.train --out DIR",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        **(extra or {}),
        "sha256": {name: file_sha256(out / name) for name in HASHED_FILES},
    }
    (out / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model (tests)")
    parser.add_argument("--config", help="JSON file or string overriding recipe fields (experiments)")
    args = parser.parse_args(argv)
    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        overrides = json.loads(text)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise HookpatchError(f"unknown recipe fields {sorted(unknown)} in --config.")
        cfg = dataclasses.replace(cfg, **overrides)
    start = time.time()
    model, tok, losses = train(cfg, quiet=args.quiet)
    seconds = time.time() - start
    tail = losses[-100:]
    extra = {"train_seconds": round(seconds, 1), "final_loss": round(sum(tail) / len(tail), 4),
             "first_loss": round(losses[0], 4)}
    save(model, tok, cfg, args.out, extra)
    if not args.quiet:
        print(f"saved {args.out}: loss {losses[0]:.3f} -> {extra['final_loss']:.3f} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
