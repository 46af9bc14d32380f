"""Training configs: presets with nested or dotted overrides, --set parsing, the start-up preflight."""

import json

import pytest
import torch

from pointvl.core.errors import InputError
from pointvl.train.config import parse_overrides, preflight, preset_config, read_config_file


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


def test_preflight_checks_every_batch_relation_for_the_process_count():
    tiny = preset_config("tiny", "grca_rpc", None)  # sft.batch_size 4, per device 4; grpo.prompts_per_step 1
    preflight(tiny, processes=1)
    with pytest.raises(InputError, match=r"sft.batch_size \(4\) must be a multiple of .* \(4 x 2 = 8\): set "
                                         r"sft.batch_size=8"):
        preflight(tiny, processes=2)
    two = {"sft.batch_size": 4, "sft.per_device_batch_size": 2}
    with pytest.raises(InputError, match=r"grpo.prompts_per_step \(1\) must be a multiple of the process count \(2\)"):
        preflight(preset_config("tiny", "grca_rpc", two), processes=2)
    preflight(preset_config("tiny", "sft", two), processes=2)  # no GRPO stage: prompts_per_step is not used
    preflight(preset_config("tiny", "grca_rpc", {**two, "grpo.prompts_per_step": 2}), processes=2)


def test_preflight_reads_the_process_count_of_the_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match=r"x 3 = 12"):
        preflight(preset_config("tiny", "sft", None))


def test_preflight_refuses_deepspeed_settings_the_train_config_owns_or_that_turn_zero_off(monkeypatch, tmp_path):
    cfg = preset_config("tiny", "grca_rpc", {"sft.max_grad_norm": 0.5})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}))
    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "False",
                       "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}.items():
        monkeypatch.setenv(key, value)
    preflight(cfg)  # "auto": each stage's max_grad_norm becomes the engine's gradient_clipping
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}))
    with pytest.raises(InputError, match=r"gradient_clipping to 1.0 but sft.max_grad_norm is 0.5"):
        preflight(cfg)
    preflight(preset_config("tiny", "grca_rpc", None))  # 1.0 = both stages' max_grad_norm: no conflict
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "2.0")  # accelerate launch --gradient_clipping 2.0
    with pytest.raises(InputError, match=r"--gradient_clipping sets .* 2.0 but sft.max_grad_norm is 1.0"):
        preflight(preset_config("tiny", "grca_rpc", None))
    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")
    with pytest.raises(InputError, match="zero3_init_flag: true is not supported"):
        preflight(preset_config("tiny", "grca_rpc", None))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(InputError, match="use_cpu: true with DeepSpeed"):
        preflight(preset_config("tiny", "grca_rpc", None))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="missing.json does not exist"):
        preflight(preset_config("tiny", "grca_rpc", None))
