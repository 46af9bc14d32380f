from pointvl import io
from pointvl.handoff import HandoffConfig, build_id, train_parameters
from pointvl.plan import make_plan, plan_path
from pointvl.stages.clean import ModelEntry


def _write_plan(run_dir: str, n_models: int, geometry: str = "g") -> None:
    models = [ModelEntry("02958343", f"m{i}", "car", "train", f"/x/{i}.obj", geometry) for i in range(n_models)]
    io.write_json(plan_path(run_dir), make_plan(models, 4, 1, "config-fingerprint").to_json())


def test_build_id_changes_with_the_models_so_training_gets_a_new_folder(tmp_path):
    run = str(tmp_path / "run")
    _write_plan(run, 3)
    first = build_id(run)
    params = train_parameters(run, HandoffConfig(train=True))
    assert params["build_id"] == first and params["run_dir"].endswith(first)
    assert params["shards"] == io.join(run, "shards")
    _write_plan(run, 3)
    assert build_id(run) == first  # same plan, same id
    _write_plan(run, 4)  # an incremental build added a model
    assert build_id(run) != first
    _write_plan(run, 3, geometry="edited mesh")
    assert build_id(run) != first
