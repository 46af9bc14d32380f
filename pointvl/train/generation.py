"""Explicit generation settings: rollouts and ``predict`` never inherit a checkpoint's.

A released chat checkpoint ships a ``generation_config.json`` tuned for chatting (Qwen2.5-VL-3B-Instruct:
``repetition_penalty`` 1.05, ``temperature`` 1e-6). Inherited, it would make GRPO's rollouts samples of
another distribution than the policy whose log-probabilities are trained, and penalise the repeated
digits of a greedy answer.

How ``transformers`` (5.23.0) merges: ``GenerationMixin._prepare_generation_config``
(``transformers/generation/utils.py``, lines 2107-2109) deep-copies the ``GenerationConfig`` passed to
``generate``, then fills every field that is still ``None`` from the model's own ``generation_config``
(``update(..., defaults_only=True)``, line 2108), then from the library defaults (line 2109; ``top_k`` 50
among them). A passed config therefore overrides the model's only in the fields it sets. Two rules follow:

1. :func:`sampling_config` and :func:`greedy_config` set every field that shapes the distribution
   (temperature, top-k, top-p, typical-p, epsilon/eta cut-offs, repetition and n-gram penalties, beams,
   minimum length) and the stop/pad ids, so nothing is left for a checkpoint or a library default to fill.
2. :func:`build_model <pointvl.train.model.build_model>` replaces the language model's
   ``generation_config`` by :func:`token_config` (the stop and pad ids only), so a loaded
   checkpoint's sampling settings are dropped at load time (logged) and never written into the
   project's checkpoints.

Generation stops on ``<|im_end|>`` (the end of a chat turn, :data:`STOP_TOKEN`), which is also the last
token of every SFT target (:class:`pointvl.train.data.Collator`), whatever the tokenizer's ``eos_token``.
"""

from __future__ import annotations

import logging
from typing import Any

from pointvl.train.tokenizer import EOS_TOKEN

logger = logging.getLogger(__name__)

STOP_TOKEN = EOS_TOKEN
"""``<|im_end|>``: generation stops on it and SFT targets end with it (not ``tokenizer.eos_token``)."""

# what a checkpoint may set that changes the tokens generate picks (dropped by token_config)
_SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                    "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "num_beams", "length_penalty")


def stop_token_id(tokenizer: Any) -> int:
    """Id of :data:`STOP_TOKEN`; ValueError when the tokenizer lacks it (a chat tokenizer has it)."""
    token_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {STOP_TOKEN} token: use a Qwen2.5-VL (chat template) tokenizer")
    return token_id


def _ids(tokenizer: Any) -> dict[str, int]:
    eos = stop_token_id(tokenizer)
    return {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def token_config(tokenizer: Any):  # -> transformers.GenerationConfig
    """The language model's own ``generation_config``: the stop and pad ids, no sampling settings."""
    from transformers import GenerationConfig

    return GenerationConfig(**_ids(tokenizer))


def dropped_settings(generation_config: Any) -> dict[str, Any]:
    """The sampling settings of a loaded ``generation_config`` that :func:`token_config` drops (for the log)."""
    values = generation_config.to_diff_dict()
    return {k: values[k] for k in _SAMPLING_FIELDS if k in values}


def _explicit(tokenizer: Any, max_new_tokens: int, **sampling: Any):
    from transformers import GenerationConfig

    return GenerationConfig(
        **_ids(tokenizer), max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True, **sampling,
    )


def sampling_config(
    tokenizer: Any, max_new_tokens: int, num_return_sequences: int, temperature: float, top_p: float, top_k: int
):
    """Sampling exactly as given (``top_k`` 0 and ``top_p`` 1 disable those filters); no penalty of any kind."""
    return _explicit(
        tokenizer, max_new_tokens, do_sample=True, num_return_sequences=num_return_sequences,
        temperature=temperature, top_p=top_p, top_k=top_k, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
    )


def greedy_config(tokenizer: Any, max_new_tokens: int):
    """Greedy decoding (argmax of the model's logits at every step); no penalty of any kind."""
    return _explicit(tokenizer, max_new_tokens, do_sample=False, num_return_sequences=1)
