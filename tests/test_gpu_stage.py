"""What the GPU stages share: one set of settings (GpuStageConfig), checked once, named by the stage."""

import dataclasses

import pytest

from pointvl.dataset.build_config import BuildConfig, ConfigError
from pointvl.dataset.gpu_stage import GpuStageConfig
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.dataset.stages.synthesize import SynthesizeConfig

SHARED = {f.name for f in dataclasses.fields(GpuStageConfig)}


@pytest.mark.parametrize("cls", [RefineConfig, SynthesizeConfig])
@pytest.mark.parametrize(("bad", "message"), [
    ({"backend": "cuda"}, "{stage}.backend must be one of"),
    ({"batch_size": 0}, r"{stage}.batch_size must be in \[1, 256\] \(default 1\)"),
    ({"dtype": "int8"}, "{stage}.dtype must be auto, bfloat16, float16 or float32"),
    ({"prompt_version": "v99"}, "{stage}/v99.txt not found"),
    ({"offload": "cpu"}, "{stage}.offload must be one of"),
    ({"cpu_offload": True, "offload": "sequential"}, "{stage}: cpu_offload and offload are both given"),
    ({"memory_margin_gb": -1}, r"{stage}.memory_margin_gb must be in \[0, 1000\]"),
])
def test_the_shared_settings_are_checked_for_each_stage_by_its_name(cls, bad, message):
    with pytest.raises(ValueError, match=message.format(stage=cls.stage)):
        cls(**bad)
    with pytest.raises(ConfigError, match=message.format(stage=cls.stage)):  # and through the strict loader
        BuildConfig.from_dict({cls.stage: bad})


def test_each_stage_keeps_its_own_settings_and_defaults_beside_the_shared_ones():
    refine, synthesize = {f.name for f in dataclasses.fields(RefineConfig)}, {
        f.name for f in dataclasses.fields(SynthesizeConfig)}
    assert SHARED == {"backend", "prompt_version", "prompts_dir", "seed", "device", "dtype", "cpu_offload",
                      "batch_size", "keep_items", "offload", "memory_margin_gb"}
    assert SHARED < refine and SHARED < synthesize and refine & synthesize == SHARED | {
        "model", "num_inference_steps", "true_cfg_scale"}
    assert (RefineConfig().num_inference_steps, SynthesizeConfig().num_inference_steps) == (50, 28)
    assert BuildConfig.from_dict({"refine": {"batch_size": 4}}).synthesize.batch_size == 1


@pytest.mark.parametrize("cls", [RefineConfig, SynthesizeConfig])
def test_offload_options_and_the_old_cpu_offload_spelling(cls):
    assert cls().offload_mode() == "auto"
    assert [cls(offload=o).offload_mode() for o in ("none", "model", "sequential")] == ["none", "model", "sequential"]
    old = BuildConfig.from_dict({cls.stage: {"cpu_offload": True}})  # an old config still loads: offload: model
    assert getattr(old, cls.stage).offload_mode() == "model"
    # where and how the weights sit on the device does not change outputs: no new fingerprint
    assert BuildConfig.from_dict({cls.stage: {"offload": "sequential", "memory_margin_gb": 2}}).output_dict() == {}
