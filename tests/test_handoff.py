from pointvl.core import io
from pointvl.dataset.handoff import HandoffConfig, build_id, train_parameters
from pointvl.dataset.plan import ModelEntry, make_plan
from pointvl.dataset.run_folder import RunFolder


def _write_plan(run_dir: str, n_models: int, geometry: str = "g") -> None:
    models = [ModelEntry("02958343", f"m{i}", "car", "train", f"/x/{i}.obj", geometry) for i in range(n_models)]
    io.write_json(RunFolder.of(run_dir).plan, make_plan(models, 4, 1, "config-fingerprint").to_json())


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


def test_the_preflight_refuses_a_training_job_without_its_weights_in_one_line():
    import pytest

    from pointvl.core.errors import InputError
    from pointvl.train.train_config import check_handoff

    check_handoff(HandoffConfig(train=True, preset="tiny"))  # builds its model in code: no weights needed
    with pytest.raises(InputError) as err:
        check_handoff(HandoffConfig(train=True, preset="paper"))
    message = str(err.value)
    assert "'Qwen/Qwen2.5-VL-3B-Instruct' is neither a local folder nor in the local Hugging Face cache" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="invalid"):
        check_handoff(HandoffConfig(train=True, preset="tiny", overrides={"model": {"dtype": "fp8"}}))


def test_a_training_run_is_recorded_once_per_build(tmp_path):
    from pointvl.dataset.handoff import record_start, started_run

    run = str(tmp_path / "run")
    _write_plan(run, 3)
    bid = build_id(run)
    assert started_run(run, bid) is None
    record_start(run, bid, "flow-run-1", "train-pointvl/train")
    assert started_run(run, bid) == "flow-run-1"
    _write_plan(run, 4)  # new models: a new build id, whose training has not started
    assert started_run(run, build_id(run)) is None


def test_pointvl_preflight_checks_each_build_deployment_as_prefect_deploy_would_make_it(tmp_path, monkeypatch,
                                                                                         capsys):
    from pointvl.cli import main

    deployments = tmp_path / "prefect.yaml"
    deployments.write_text("""
# {{ $NOT_NEEDED }} in a comment is not a template
definitions:
  handoff: &handoff {train: true, preset: "{{ $POINTVL_TRAIN_PRESET }}", variant: grca_rpc, overrides: {}}
deployments:
  - {name: scheduled, entrypoint: "flows/build.py:build_benchmark", parameters: {handoff: *handoff, overrides: {}}}
  - {name: no-handoff, entrypoint: "flows/build.py:build_benchmark",
     parameters: {handoff: *handoff, overrides: {handoff.train: false}}}
  - {name: train, entrypoint: "flows/train.py:train"}
""")
    monkeypatch.setenv("POINTVL_TRAIN_PRESET", "tiny")
    assert main(["preflight", "--deployments", str(deployments)]) == 0
    assert capsys.readouterr().out.strip() == "training hand-off can start here: scheduled (tiny, grca_rpc)"

    monkeypatch.setenv("POINTVL_TRAIN_PRESET", "paper")  # the default: its weights are not on this machine
    assert main(["preflight", "--deployments", str(deployments)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pointvl preflight: error: the training hand-off of scheduled (preset 'paper') cannot "
                          "start on this machine: model.checkpoint 'Qwen/Qwen2.5-VL-3B-Instruct' is neither")
    assert "\n" not in err and err.endswith("deploy with POINTVL_TRAIN_PRESET=tiny, or set handoff.train: false in "
                                            f"{deployments}")

    monkeypatch.delenv("POINTVL_TRAIN_PRESET")
    assert main(["preflight", "--deployments", str(deployments)]) == 2
    assert capsys.readouterr().err.strip() == (f"pointvl preflight: error: {deployments} needs $POINTVL_TRAIN_PRESET "
                                               "in the environment (make deploy sets it)")
