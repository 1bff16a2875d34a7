"""A byte-level BPE tokenizer trained here, on the project's own corpus (no model hub).

It is saved as a `PreTrainedTokenizerFast` next to the model weights, so a checkpoint folder
loads with `AutoTokenizer.from_pretrained` alone.
"""
from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(512, ge=300, le=262_144, description="BPE vocabulary size (≥ 256 bytes + specials)")
    # One token per digit makes arithmetic a per-digit skill the model can generalise, instead of
    # a lookup table over every number the corpus happens to contain.
    split_digits: bool = True
    # Merges may span spaces and punctuation inside a line, so the fixed phrases of a format
    # ("Exploring Operation: ", ", Resulting Numbers: [") become single tokens: Countdown streams
    # get ~40% shorter than with GPT-2's split into words. Tokens never cross a newline, so a
    # line-per-turn format's turns are whole tokens. False: GPT-2's word-level pre-split.
    merge_phrases: bool = True
    min_frequency: int = Field(2, ge=1)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not cfg.merge_phrases)]
    if cfg.split_digits:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    if cfg.merge_phrases:
        pre.insert(0, pre_tokenizers.Split("\n", behavior="merged_with_previous"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
