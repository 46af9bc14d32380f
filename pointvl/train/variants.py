"""The names a training run is chosen by: the Table 3 variants, the GRPO modes and the presets.

Plain tuples, importing nothing: the command line (``pointvl train --variant``, ``--preset``) takes its choices
from here without importing torch; :mod:`pointvl.train.train_config` builds its configs and presets on them.
"""

from __future__ import annotations

GRPO_MODES = ("broadcast", "grca", "grca_rpc")
VARIANTS = ("sft", "sft_budget_matched", *GRPO_MODES)
"""The rows of the paper's Table 3: SFT alone, SFT continued for the RL budget, GRPO with one broadcast
reward, GRCA without RPC, GRCA + RPC."""
PRESET_NAMES = ("paper", "tiny")
"""The presets of :data:`pointvl.train.train_config.PRESETS`: the paper's setup (§4.2) and a CPU-sized run."""
