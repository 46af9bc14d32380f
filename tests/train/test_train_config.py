"""Training configs: presets with nested or dotted overrides, --set parsing, the start-up preflight."""

import json

import pytest
import torch

from pointvl.core.errors import InputError
from pointvl.train.train_config import parse_overrides, preflight, preset_config, read_config_file


def test_nested_and_dotted_overrides_merge_deeply():
    cfg = preset_config("tiny", "grca", {"sft.max_steps": 6, "grpo": {"lam": 0.3},
                                         "model": {"point_bert": {"checkpoint": "/w/p.pt"}}})
    assert (cfg.sft.max_steps, cfg.grpo.lam, cfg.grpo.mode) == (6, 0.3, "grca")
    # the deep merge keeps the tiny preset's encoder sizes beside the new checkpoint
    assert cfg.model.point_bert.checkpoint == "/w/p.pt" and cfg.model.point_bert.trans_dim == 32
    assert cfg.sft.learning_rate == preset_config("tiny", "grca", None).sft.learning_rate


def test_a_run_config_json_reproduces_the_config():
    cfg = preset_config("tiny", "broadcast", {"sft.max_steps": 2})
    full = json.loads(json.dumps(cfg.to_dict()))
    assert preset_config("paper", "grca_rpc", full) == cfg


def test_parse_overrides_types_values_as_yaml():
    out = parse_overrides(["sft.max_steps=6", "grpo.lam=0.3", "model.point_bert.checkpoint=/w/point_bert_v1.2.pt",
                           "sft.max_samples=null", "model.point_bert.random_init=true", "sft.learning_rate=1e-5"])
    assert out == {"sft": {"max_steps": 6, "max_samples": None, "learning_rate": 1e-5},
                   "grpo": {"lam": 0.3},
                   "model": {"point_bert": {"checkpoint": "/w/point_bert_v1.2.pt", "random_init": True}}}
    assert preset_config("paper", "grca_rpc", out).grpo.lam == 0.3


@pytest.mark.parametrize("pair, named", [
    ("sft.max_step=1", "sft.max_step"),
    ("sft.max_steps=abc", "sft.max_steps"),
    ("grpo.lam=[1", "grpo.lam"),
    ("model.point_bert=3", "model.point_bert"),
    ("sft.save_steps=true", "sft.save_steps"),
    ("model.quant.bins=1.5", "model.quant.bins"),
    ("grpo.grca.quant.nope=1", "grpo.grca.quant.nope"),
    ("eval_batch_size.x=1", "eval_batch_size"),
    ("novalue", "novalue"),
])
def test_bad_overrides_name_the_key_in_one_line(pair, named):
    with pytest.raises(InputError) as err:
        parse_overrides([pair])
    assert named in str(err.value) and "\n" not in str(err.value)


def test_invalid_values_are_one_line_input_errors():
    with pytest.raises(InputError, match="batch_size"):
        preset_config("tiny", "sft", {"sft.batch_size": 3})
    with pytest.raises(InputError, match="preset"):
        preset_config("huge", "sft", None)


def test_config_file_reads_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  max_steps: 4\n  learning_rate: 1e-5\ngrpo.lam: 0.2\n")
    cfg = preset_config("tiny", "grca_rpc", read_config_file(str(path)))
    assert (cfg.sft.max_steps, cfg.sft.learning_rate, cfg.grpo.lam) == (4, 1e-5, 0.2)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        read_config_file(str(path))
    with pytest.raises(InputError, match="not found"):
        read_config_file(str(tmp_path / "missing.yaml"))


def test_preflight_refuses_what_cannot_start(tmp_path):
    preflight(preset_config("tiny", "grca_rpc", None))
    with pytest.raises(InputError, match="Point-BERT"):  # the paper preset needs Point-BERT weights ...
        preflight(preset_config("paper", "grca_rpc", {"model.architecture": "3b", "model.random_init": True}))
    # ... or random weights asked for explicitly
    preflight(preset_config("paper", "grca_rpc", {"model.architecture": "3b", "model.point_bert.random_init": True}))
    with pytest.raises(InputError, match="Hugging Face cache"):
        preflight(preset_config("paper", "grca_rpc", {"model.checkpoint": "nobody/not-a-model",
                                                      "model.point_bert.random_init": True}))
    with pytest.raises(InputError, match="does not exist"):
        preflight(preset_config("tiny", "sft", {"model.point_bert.checkpoint": str(tmp_path / "nope.pt")}))
    weights = tmp_path / "point_bert_v1.2.pt"
    torch.save({"state_dict": {}}, weights)
    preflight(preset_config("tiny", "sft", {"model.point_bert.checkpoint": str(weights)}))
    folder = tmp_path / "qwen"
    folder.mkdir()
    with pytest.raises(InputError, match="holds no"):
        preflight(preset_config("paper", "sft", {"model.checkpoint": str(folder),
                                                 "model.point_bert.random_init": True}))
    (folder / "config.json").write_text("{}")
    preflight(preset_config("paper", "sft", {"model.checkpoint": str(folder), "model.random_init": True,
                                             "model.point_bert.random_init": True}))
