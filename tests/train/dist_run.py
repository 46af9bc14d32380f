"""One training stage of the tiny preset, as the multi-process tests launch it (``accelerate launch`` or
plain ``python``): ``dist_run.py SHARDS STAGE_DIR OUT_JSON STAGE [KEY=VALUE ...]``.

``STAGE`` is ``sft`` or ``grpo``; the overrides are ``--set`` pairs; an empty STAGE_DIR trains without
checkpoints. Rank 0 writes the history (``OUT_JSON``) and the trained weights (``OUT_JSON.safetensors``).
"""

import json
import sys

from safetensors.torch import save_file

from pointvl.train.grpo import run_grpo
from pointvl.train.pipeline import load
from pointvl.train.sft import run_sft
from pointvl.train.stage_setup import distributed_state
from pointvl.train.train_config import parse_overrides, preset_config

shards, stage_dir, out, stage, *pairs = sys.argv[1:]
cfg = preset_config("tiny", "grca_rpc", parse_overrides(pairs))
tokenizer, images, model = load(cfg, None)
if stage == "sft":
    history = run_sft(model, tokenizer, images, shards, cfg.sft, stage_dir or None)
else:
    history = run_grpo(model, tokenizer, images, shards, cfg.grpo, stage_dir or None)
state = distributed_state()
if state.is_main_process:
    sharded = state.distributed_type.value in ("FSDP", "DEEPSPEED")  # rank 0 holds a shard only: no weights
    save_file({} if sharded else {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad},
              out + ".safetensors")
    with open(out, "w") as f:
        json.dump({"history": history, "processes": state.num_processes}, f)
