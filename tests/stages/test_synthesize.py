"""synthesize: the real FluxControlNetPipeline code path with tiny random components, and passthrough."""

from __future__ import annotations

import json

import pytest
from gpu_inputs import write_render_shard

from pointvl.dataset import diffusion_pipelines
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import read_stage_table
from pointvl.dataset.stages.gpu_common import instance_seed
from pointvl.dataset.stages.refine import Refine, RefineConfig
from pointvl.dataset.stages.synthesize import Synthesize, SynthesizeConfig
from pointvl.core import images, io
from pointvl.testing.tiny_pipelines import HashPromptEncoder, save_tiny_models, tiny_synthesize_pipeline

STEPS = 5


def prepared_run(run: str, shard: int = 0, n: int = 3, width: int = 40, height: int = 32) -> list[str]:
    ids = write_render_shard(run, shard, n=n, width=width, height=height)
    Refine(RefineConfig(backend="passthrough")).run_shard(run, shard)
    return ids


def tiny_config(**kw) -> SynthesizeConfig:
    return SynthesizeConfig(**({"backend": "diffusers", "device": "cpu", "num_inference_steps": STEPS} | kw))


def test_passthrough_carries_refined_and_scores_drift(tmp_path):
    run = str(tmp_path)
    ids = prepared_run(run)
    stats = Synthesize(SynthesizeConfig(backend="passthrough")).run_shard(run, 0)
    table = read_stage_table(run, "synthesize", 0)
    assert table.column_names == ["instance_id", "image", "drift", "drift_flagged", "synthesize_provenance"]
    assert table.column("instance_id").to_pylist() == ids
    assert table.column("image").to_pylist() == read_stage_table(run, "refine", 0).column("refined").to_pylist()
    # the carried-forward render outlines its own mask: no drift
    assert all(d < 0.1 for d in table.column("drift").to_pylist())
    assert not any(table.column("drift_flagged").to_pylist()) and stats["drift_flagged"] == 0
    prov = json.loads(table.column("synthesize_provenance")[1].as_py())
    assert prov["backend"] == "passthrough" and prov["seed"] == instance_seed(0, "synthesize", ids[1])
    assert "photograph of a car" in prov["prompt"]  # first ShapeNet synonym fills {category}


def test_controlnet_scale_is_zero_after_80_percent_of_steps(tmp_path):
    run = str(tmp_path)
    prepared_run(run, n=1)
    pipe = tiny_synthesize_pipeline()
    seen = []

    def record(module, args, kwargs):
        seen.append((float(kwargs["conditioning_scale"]), int(kwargs["controlnet_mode"].flatten()[0])))

    hook = pipe.controlnet.nets[0].register_forward_pre_hook(record, with_kwargs=True)
    Synthesize(tiny_config(), pipe, HashPromptEncoder("synthesize")).run_shard(run, 0)
    hook.remove()
    # two controls (depth mode 2, canny mode 0) per step; 5 steps; control only while (i+1)/5 <= 0.8
    assert len(seen) == 2 * STEPS
    per_step = [seen[2 * i:2 * i + 2] for i in range(STEPS)]
    assert per_step[:4] == [[(0.6, 2), (0.4, 0)]] * 4
    assert per_step[4] == [(0.0, 2), (0.0, 0)]


@pytest.mark.parametrize("controls,scales", [(("depth", "canny"), (0.6, 0.4)), (("canny",), (0.7,))])
def test_tiny_pipeline_size_seed_and_flags(tmp_path, controls, scales):
    pipe = tiny_synthesize_pipeline()
    encoder = HashPromptEncoder("synthesize")
    outputs = []
    for name in ("a", "b"):
        run = str(tmp_path / name)
        ids = prepared_run(run, width=42, height=34)  # not a multiple of the latent grid: resized back
        cfg = tiny_config(controls=controls, conditioning_scales=scales, num_inference_steps=2, drift_threshold=0.3)
        stats = Synthesize(cfg, pipe, encoder).run_shard(run, 0)
        outputs.append(read_stage_table(run, "synthesize", 0))
    a, b = outputs
    assert stats["backend"] == "diffusers" and stats["generated"] == 3
    for png in a.column("image").to_pylist():
        assert images.decode_rgb(png).shape == (34, 42, 3)
    assert a.column("image").to_pylist() == b.column("image").to_pylist()  # same seed, same image
    drift, flagged = a.column("drift").to_pylist(), a.column("drift_flagged").to_pylist()
    assert all(0.0 <= d <= 1.0 for d in drift) and flagged == [d > 0.3 for d in drift]
    prov = json.loads(a.column("synthesize_provenance")[0].as_py())
    assert prov["backend"] == "diffusers" and prov["control_guidance_end"] == 0.8
    assert prov["controls"] == list(controls) and prov["seed"] == instance_seed(0, "synthesize", ids[0])
    assert prov["models"] == {"model": "black-forest-labs/FLUX.1-Krea-dev",
                              "controlnet": "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro"}


def test_model_loaded_once_per_process(tmp_path):
    paths = save_tiny_models(str(tmp_path / "models"))
    diffusion_pipelines.clear_cache()
    cfg = tiny_config(model=paths["synthesize"], controlnet_model=paths["controlnet"], num_inference_steps=2)
    run = str(tmp_path / "run")
    for shard in (0, 1, 2):
        prepared_run(run, shard, n=2)
        Synthesize(cfg, encode_prompt=HashPromptEncoder("synthesize")).run_shard(run, shard)
    assert diffusion_pipelines.LOAD_COUNTS["synthesize"] == 1
    diffusion_pipelines.clear_cache()


@pytest.mark.parametrize("union", [True, False])
def test_control_mode_only_for_a_controlnet_with_modes(tmp_path, union):
    """Union-Pro has modes; Union-Pro-2.0 (saved without ``num_mode``) has none and gets none."""
    paths = save_tiny_models(str(tmp_path / "models"), union=union)
    diffusion_pipelines.clear_cache()
    cfg = tiny_config(model=paths["synthesize"], controlnet_model=paths["controlnet"], num_inference_steps=2)
    run = str(tmp_path / "run")
    prepared_run(run, n=1)
    stage = Synthesize(cfg, encode_prompt=HashPromptEncoder("synthesize"))
    stage.run_shard(run, 0)
    net = diffusion_pipelines.load_pipeline("synthesize", cfg).controlnet.nets[0]
    diffusion_pipelines.clear_cache()
    assert net.union is union
    prov = json.loads(read_stage_table(run, "synthesize", 0).column("synthesize_provenance")[0].as_py())
    assert prov["control_mode"] == ([2, 0] if union else None)  # depth, canny; or what was applied: none


def test_resume_skips_finished_items(tmp_path):
    run = str(tmp_path)
    folder = RunFolder.of(run)
    ids = prepared_run(run, n=3)
    pipe = tiny_synthesize_pipeline()
    calls = []

    def stop_after_one_item(module, args, kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("preempted")

    stage = Synthesize(tiny_config(num_inference_steps=2), pipe, HashPromptEncoder("synthesize"))
    hook = pipe.transformer.register_forward_pre_hook(stop_after_one_item, with_kwargs=True)
    with pytest.raises(RuntimeError, match="preempted"):
        stage.run_shard(run, 0)
    hook.remove()
    assert io.exists(io.join(folder.stage_items("synthesize", 0), f"{ids[0]}.parquet"))
    assert not io.exists(f"{run}/stages/synthesize/shard-00000.parquet")
    calls.clear()
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    stats = stage.run_shard(run, 0)
    hook.remove()
    assert len(calls) == 2 * 2 and stats["generated"] == 2 and stats["resumed"] == 1
    assert read_stage_table(run, "synthesize", 0).column("instance_id").to_pylist() == ids
    assert not io.exists(folder.stage_items("synthesize", 0))


def test_config_validation():
    with pytest.raises(ValueError, match="one scale per control"):
        SynthesizeConfig(controls=("depth", "canny"), conditioning_scales=(0.5,))
    with pytest.raises(ValueError, match="controls must be distinct"):
        SynthesizeConfig(controls=("pose",), conditioning_scales=(0.5,))
    assert SynthesizeConfig(controls=["canny"], conditioning_scales=[0.7]).controls == ("canny",)


@pytest.mark.gpu
def test_gpu_path_bf16(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run = str(tmp_path)
    prepared_run(run, n=2, width=64, height=48)
    pipe = tiny_synthesize_pipeline().to("cuda", torch.bfloat16)
    encoder = HashPromptEncoder("synthesize", device="cuda", dtype=torch.bfloat16)
    Synthesize(tiny_config(device="cuda", num_inference_steps=2), pipe, encoder).run_shard(run, 0)
    table = read_stage_table(run, "synthesize", 0)
    assert images.decode_rgb(table.column("image")[0].as_py()).shape == (48, 64, 3)
    assert json.loads(table.column("synthesize_provenance")[0].as_py())["dtype"] == "bfloat16"
