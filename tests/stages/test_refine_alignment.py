"""refine: the output grid equals the condition grid (real sizing logic), and the pipeline class is the
checkpoint's own (Edit, Edit-Plus), loaded through the project's loading code."""

from __future__ import annotations

import json

import pytest
from gpu_inputs import write_render_shard

from pointvl.core import images
from pointvl.dataset import diffusion_pipelines
from pointvl.dataset.stages.base import read_stage_table
from pointvl.dataset.stages.refine import Refine, RefineConfig
from pointvl.testing.tiny_pipelines import HashPromptEncoder, save_tiny_models, tiny_refine_pipeline

SIZES = [(256, 256), (512, 512), (640, 480)]


class Grids(Exception):
    """Raised by the transformer hook once it has the call's ``img_shapes`` (no denoising needed)."""


def tiny_config(**kw) -> RefineConfig:
    return RefineConfig(**({"backend": "diffusers", "device": "cpu", "num_inference_steps": 1} | kw))


def small_vae_input(module, args, kwargs):
    """The VAE encodes a 16x16 corner of the ~1 MP condition (the tiny VAE takes ~10 s a megapixel on the
    CPU). The sizes, ``img_shapes`` included, are computed before and apart from it, and the
    transformer, which would need matching latents, is never run."""
    return (args[0][..., :16, :16], *args[1:]), kwargs


@pytest.mark.parametrize("full_vae", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["", "full-vae"])
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit-plus"])
def test_output_grid_equals_condition_grid(tmp_path, plus, full_vae):
    """diffusers' own calculate_dimensions runs (not patched): the condition is resized to ~1 MP."""
    pipe = tiny_refine_pipeline(plus=plus)
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["img_shapes"])
        raise Grids

    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    if not full_vae:
        pipe.vae.encoder.register_forward_pre_hook(small_vae_input, with_kwargs=True)
    for i, (w, h) in enumerate(SIZES):
        run = str(tmp_path / f"run{i}")
        write_render_shard(run, 0, n=1, width=w, height=h)
        with pytest.raises(Grids):
            Refine(tiny_config(), pipe, HashPromptEncoder("refine")).run_shard(run, 0)
    hook.remove()
    # one [output, condition] pair per call; latent grid = size / vae_scale_factor (4) / patch (2)
    assert [shapes[0] for shapes in seen] == [[(1, 128, 128)] * 2, [(1, 128, 128)] * 2, [(1, 112, 148)] * 2]


def test_edit_plus_runs_one_image_per_call_and_records_sizes(tmp_path, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    monkeypatch.setattr(edit_plus, "calculate_dimensions", lambda area, ratio: (32, 24))  # fast (FACTS)
    pipe = tiny_refine_pipeline(plus=True)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["img_shapes"]),
                                                      with_kwargs=True)
    run = str(tmp_path)
    write_render_shard(run, 0, n=3, width=40, height=30)
    stats = Refine(tiny_config(batch_size=2, true_cfg_scale=1.0), pipe, HashPromptEncoder("refine")).run_shard(run, 0)
    hook.remove()
    assert stats["generated"] == 3 and len(calls) == 3  # 1 step, no CFG, one image per call
    assert all(c == [[(1, 3, 4), (1, 3, 4)]] for c in calls)  # Edit-Plus would read 2 images as 2 references
    table = read_stage_table(run, "refine", 0)
    assert images.decode_rgb(table.column("refined")[0].as_py()).shape == (30, 40, 3)
    prov = json.loads(table.column("refine_provenance")[0].as_py())
    assert prov["pipeline"] == "QwenImageEditPlusPipeline" and prov["generation_size"] == [32, 24]


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit-plus"])
def test_pipeline_class_comes_from_the_checkpoint(tmp_path, plus):
    paths = save_tiny_models(str(tmp_path / "models"), plus=plus)
    expected = "QwenImageEditPlusPipeline" if plus else "QwenImageEditPipeline"
    assert json.loads((tmp_path / "models" / "refine" / "model_index.json").read_text())["_class_name"] == expected
    diffusion_pipelines.clear_cache()
    pipe = diffusion_pipelines.load_pipeline("refine", tiny_config(model=paths["refine"]))
    diffusion_pipelines.clear_cache()
    assert type(pipe).__name__ == expected


def test_unknown_pipeline_class_is_a_one_line_error(tmp_path):
    paths = save_tiny_models(str(tmp_path / "models"))  # "synthesize" holds a FluxPipeline checkpoint
    diffusion_pipelines.clear_cache()
    with pytest.raises(ValueError, match="is a FluxPipeline checkpoint") as err:
        diffusion_pipelines.load_pipeline("refine", tiny_config(model=paths["synthesize"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no readable model_index.json") as err:
        diffusion_pipelines.pipeline_class(paths["controlnet"])  # a model folder, not a pipeline
    assert "\n" not in str(err.value)
