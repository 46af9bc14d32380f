"""GRCA: geometric reward credit assignment with the RPC verifier (paper §3.3-3.7).

Parse the policy's JSON (:func:`parse_output`), score a group of outputs and route field
advantages onto tokens (:func:`score_group`), and train with the routed GRPO loss
(:func:`routed_grpo_loss`). Independent of Prefect, model weights and the training loop.
"""

from pointvl.grca.advantages import group_advantages, route, standardize
from pointvl.grca.parse import FIELDS, GEOMETRIC_FIELDS, ParsedField, format_output, parse_output
from pointvl.grca.rewards import output_rewards
from pointvl.grca.score import GRCAConfig, GroupScore, score_group
from pointvl.grca.spans import BACKGROUND, offsets_from_decode, token_field_ids

__all__ = [
    "BACKGROUND",
    "LOSS_TYPES",
    "FIELDS",
    "GEOMETRIC_FIELDS",
    "GRCAConfig",
    "GroupScore",
    "ParsedField",
    "clip_fraction",
    "format_output",
    "group_advantages",
    "offsets_from_decode",
    "output_rewards",
    "pad_token_advantages",
    "parse_output",
    "route",
    "routed_grpo_loss",
    "score_group",
    "standardize",
    "token_field_ids",
]


def __getattr__(name: str) -> object:
    # the loss needs torch (~400 MB and a second to import): loaded when first asked for, so that parsing
    # and scoring (the records' target format, used by the build's workers and evaluation) do not load it
    if name in ("LOSS_TYPES", "clip_fraction", "pad_token_advantages", "routed_grpo_loss"):
        from pointvl.grca import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
