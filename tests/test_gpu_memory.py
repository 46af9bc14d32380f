"""The memory preflight of the GPU stages: weight sizes read from checkpoints saved with save_pretrained
(safetensors headers, or a sharded checkpoint's index), what each offload option keeps on the device,
and the one-line refusal, against free-memory numbers given as parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pointvl.dataset.diffusion_pipelines import choose_offload
from pointvl.dataset.gpu_memory import GB, Component, DeviceMemoryError, MemoryPlan, component_weights, plan_stage
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.dataset.stages.synthesize import SynthesizeConfig
from pointvl.testing.tiny_pipelines import save_tiny_models, tiny_flux_parts, tiny_refine_pipeline


def n_weights(model) -> int:
    return sum(t.numel() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    paths = save_tiny_models(str(folder))
    tiny_refine_pipeline().save_pretrained(str(folder / "sharded"), max_shard_size="200KB")
    return paths | {"sharded": str(folder / "sharded")}


def test_weights_are_read_from_the_saved_checkpoints_at_the_load_dtype(saved):
    pipe = tiny_refine_pipeline()
    base, controlnet = tiny_flux_parts()
    refine = plan_stage("refine", {"model": Path(saved["refine"])}, "bfloat16", 0)
    assert {c.name: c.bytes for c in refine.components} == {
        "transformer": 2 * n_weights(pipe.transformer), "vae": 2 * n_weights(pipe.vae)}  # float32 on disk
    assert all(c.in_chain for c in refine.components)  # QwenImageEditPipeline's offload chain
    synth = plan_stage("synthesize", {"model": Path(saved["synthesize"]), "controlnet": Path(saved["controlnet"])},
                       "float32", 0)
    sizes = {c.name: (c.bytes, c.in_chain) for c in synth.components}
    assert sizes == {"transformer": (4 * n_weights(base.transformer), True), "vae": (4 * n_weights(base.vae), True),
                     "controlnet": (4 * n_weights(controlnet), False)}
    # the largest module: the biggest weight + bias group of one layer, sequential offload's unit
    largest = max(4 * sum(t.numel() for n, t in controlnet.state_dict().items() if n.rsplit(".", 1)[0] == module)
                  for module in {n.rsplit(".", 1)[0] for n in controlnet.state_dict()})
    assert {c.name: c.largest_module for c in synth.components}["controlnet"] == largest


def test_a_sharded_checkpoint_reads_every_shard_and_falls_back_to_its_index(saved):
    folder = Path(saved["sharded"]) / "vae"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and list(folder.glob("*.safetensors.index.json"))
    whole = component_weights(Path(saved["refine"]) / "vae", "vae", "float32")
    assert component_weights(folder, "vae", "float32") == whole
    for shard in shards[1:]:  # a partly cached checkpoint: only the index's total_size is known
        shard.unlink()
    fallback = component_weights(folder, "vae", "float32")
    assert fallback.bytes >= whole.bytes - 64 and fallback.largest_module == 0  # total_size may count padding
    for shard in shards[:1]:
        shard.unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    assert component_weights(folder, "vae", "float32") is None
    assert plan_stage("refine", {"model": Path(saved["sharded"])}, "float32", 0) is None  # not all local: no plan


def plan(margin_gb: float = 1.0) -> MemoryPlan:
    """Qwen-Image-Edit's components in bf16, from parameter counts (the README's table)."""
    return MemoryPlan("refine", "bfloat16", (
        Component("text_encoder", int(16.6 * GB), int(1.1 * GB)),
        Component("transformer", int(40.9 * GB), int(0.2 * GB)),
        Component("vae", int(0.25 * GB), int(0.01 * GB)),
    ), int(margin_gb * GB))


@pytest.mark.parametrize(("free_gb", "chosen"), [(80, "none"), (50, "model"), (10, "sequential")])
def test_auto_picks_the_least_offload_that_fits_and_says_so_in_one_line(free_gb, chosen, caplog):
    p = plan()
    assert p.table() == {"none": 57.8, "model": 41.1, "sequential": 1.1}
    with caplog.at_level(logging.INFO, logger="pointvl.dataset.gpu_memory"):
        assert p.choose("auto", int(free_gb * GB), "cuda:0") == chosen
    [record] = caplog.records
    assert f"-> offload: {chosen}" in record.message and f"{free_gb:.1f} GB free on cuda:0" in record.message
    assert "57.8 GB of bfloat16 weights" in record.message and "\n" not in record.message
    assert record.levelno == (logging.INFO if chosen == "none" else logging.WARNING)


def test_an_option_that_does_not_fit_is_refused_in_one_line_naming_the_numbers_and_the_option_to_set():
    with pytest.raises(DeviceMemoryError) as err:
        plan().choose("none", int(48 * GB), "cuda:0")
    message = str(err.value)
    assert "\n" not in message
    assert message == ("refine: offload: none needs 58.8 GB (57.8 GB of bfloat16 weights + 1.0 GB margin) but cuda:0 "
                       "has 48.0 GB free; set refine.offload: model (needs 42.1 GB)")
    with pytest.raises(DeviceMemoryError, match=r"set refine.offload: sequential \(needs 2.1 GB\)"):
        plan().choose("model", int(20 * GB), "cuda:0")
    with pytest.raises(DeviceMemoryError, match="even offload: sequential needs 2.1 GB .* 1.0 GB free"):
        plan().choose("auto", int(1 * GB), "cuda:0")
    assert plan().choose("sequential", int(20 * GB), "cuda:0") == "sequential"


def test_the_preflight_of_a_stage_config_on_tiny_checkpoints(saved, caplog):
    """What load_pipeline runs before loading: the config's models, read from disk, against a free-memory number."""
    refine = RefineConfig(model=saved["refine"], memory_margin_gb=0)
    total = sum(c.bytes for c in plan_stage("refine", {"model": Path(saved["refine"])}, "bfloat16", 0).components)
    assert choose_offload("refine", refine, "cuda:0", "bfloat16", free_bytes=total) == "none"
    # no text encoder saved: model offload keeps the transformer and the VAE, i.e. everything
    assert choose_offload("refine", refine, "cuda:0", "bfloat16", free_bytes=total - 1) == "sequential"
    with pytest.raises(DeviceMemoryError, match=r"refine: offload: none needs 0.0 GB .* cuda:0 has 0.0 GB free; "
                                                r"set refine.offload: sequential"):
        choose_offload("refine", RefineConfig(model=saved["refine"], memory_margin_gb=0, offload="none"), "cuda:0",
                       "bfloat16", free_bytes=total - 1)
    old = RefineConfig(model=saved["refine"], memory_margin_gb=0, cpu_offload=True)  # the old spelling: model
    assert choose_offload("refine", old, "cuda:0", "bfloat16", free_bytes=total) == "model"
    with pytest.raises(DeviceMemoryError, match="refine: offload: model needs"):
        choose_offload("refine", old, "cuda:0", "bfloat16", free_bytes=total - 1)
    synth = SynthesizeConfig(model=saved["synthesize"], controlnet_model=saved["controlnet"], memory_margin_gb=0)
    folders = {"model": Path(saved["synthesize"]), "controlnet": Path(saved["controlnet"])}
    one_module = plan_stage("synthesize", folders, "bfloat16", 0).weights("sequential")
    assert choose_offload("synthesize", synth, "cuda:1", "bfloat16", free_bytes=one_module) == "sequential"
    with pytest.raises(DeviceMemoryError, match="synthesize: even offload: sequential needs"):
        choose_offload("synthesize", synth, "cuda:1", "bfloat16", free_bytes=one_module - 1)
    # the CPU has nothing to offload to; weights that are not local (to be downloaded) skip the check
    with caplog.at_level(logging.WARNING):
        assert choose_offload("refine", RefineConfig(offload="model"), "cpu", "float32") == "none"
        assert choose_offload("refine", RefineConfig(model="pointvl-tests/not-cached"), "cuda:0", "bfloat16",
                              free_bytes=0) == "none"
    assert "offload model ignored on cpu" in caplog.text
    assert "cannot check device memory before loading" in caplog.text


def test_a_component_not_in_the_cache_yet_skips_the_check_with_a_warning(saved, tmp_path, caplog):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(saved["refine"], partial)
    shutil.rmtree(partial / "transformer")  # from_pretrained would download it: its size is unknown here
    with caplog.at_level(logging.WARNING, logger="pointvl.dataset.gpu_memory"):
        assert plan_stage("refine", {"model": partial}, "bfloat16", 0) is None
    assert "refine: cannot check device memory before loading: weights of ['transformer'] are not local" in caplog.text
