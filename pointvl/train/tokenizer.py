"""A character-level tokenizer built in code, for the tiny CPU configuration (no downloads).

Every printable ASCII character and the newline is one token, so numbers are written digit by digit
and the character offsets the GRCA span routing needs are exact. The special tokens are the ones
the Qwen2.5-VL chat format uses, plus the point placeholder tokens of :mod:`pointvl.train.model`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
POINT_TOKENS = ("<|point_start|>", "<|point_end|>", "<|point_pad|>")
SPECIAL_TOKENS = (
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    *POINT_TOKENS,
)


def build_char_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A ``PreTrainedTokenizerFast`` over printable ASCII + newline + :data:`SPECIAL_TOKENS`.

    Unknown characters map to ``?``. Decoding concatenates characters (no added spaces).
    """
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the in-code tokenizer needs `pip install pointvl[train]`") from e

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token="?",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
