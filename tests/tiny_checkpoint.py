"""A tiny Qwen2.5-VL checkpoint folder, written with ``save_pretrained``, for tests of the ``checkpoint`` path.

The folder holds what a hub checkpoint holds (``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer files), so ``ModelConfig(architecture="checkpoint",
checkpoint=folder)`` loads it through the same ``from_pretrained`` code as Qwen2.5-VL-3B-Instruct.
The weights are random (the tiny config of :func:`pointvl.train.model.tiny_qwen_config`), the
tokenizer is the in-code character tokenizer with the Qwen chat special tokens.
"""

from __future__ import annotations

from typing import Any

# Qwen2.5-VL-3B-Instruct's generation_config.json sampling settings (its chat defaults), plus a top-k/top-p
# of the kind other Qwen-VL releases ship: what rollouts and predict must not inherit
QWEN_CHAT_GENERATION = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-6, "top_k": 1,
                        "top_p": 0.001}


def write_tiny_qwen_checkpoint(
    folder: str, generation: dict[str, Any] | None = None, eos_token: str | None = None, seed: int = 0
) -> str:
    """Write a tiny Qwen2.5-VL checkpoint into ``folder`` and return it.

    Args:
        generation: extra ``generation_config.json`` fields (default :data:`QWEN_CHAT_GENERATION`).
        eos_token: the tokenizer's ``eos_token`` (default ``<|im_end|>``; base Qwen models use
            ``<|endoftext|>``, which is not the token a chat turn ends with).
        seed: weight initialisation seed.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pointvl.train.model import tiny_qwen_config
    from pointvl.train.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    if eos_token is not None:
        tok.eos_token = eos_token
    ids = tok.convert_tokens_to_ids
    special = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
               "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    im_end, pad = ids("<|im_end|>"), tok.pad_token_id
    torch.manual_seed(seed)
    lm = Qwen2_5_VLForConditionalGeneration._from_config(
        tiny_qwen_config(len(tok), special, {"bos_token_id": pad, "eos_token_id": im_end, "pad_token_id": pad}),
        dtype=torch.float32,
    )
    lm.generation_config.update(bos_token_id=pad, eos_token_id=[im_end, pad], pad_token_id=pad,
                                **(QWEN_CHAT_GENERATION if generation is None else generation))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
