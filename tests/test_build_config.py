import pytest

from pointvl.dataset.build_config import BuildConfig, ConfigError


def test_defaults_are_the_papers():
    cfg = BuildConfig()
    assert (cfg.clean.train_size, cfg.clean.test_size) == (11_347, 1_000)
    assert cfg.sample_points.init_factor == 5
    assert cfg.geometry.num_keypoints == 16


def test_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard_size: 4\nrender: {width: 128, height: 96}\nclean: {test_size: 0.5, train_size: null}\n")
    cfg = BuildConfig.from_file(str(path))
    assert (cfg.shard_size, cfg.render.width, cfg.render.height, cfg.clean.test_size) == (4, 128, 96, 0.5)
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shard_size: 0", "shard_size"),
        ("renderr: {}", "unknown config keys"),
        ("render: {widht: 3}", "unknown keys in 'render'"),
        ("render: 5", "must be a mapping"),
        ("clean: {test_size: 2.5}", "fraction"),
        ("- a list", "mapping"),
        ("{unclosed", "not valid YAML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        BuildConfig.from_file(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        BuildConfig.from_file("/nonexistent/c.yaml")


def test_operational_sections_do_not_decide_outputs():
    a = BuildConfig.from_dict({"review": {"timeout_s": 60}, "gpu_deployments": {"refine": "refine-shards/refine"}})
    assert a.output_dict() == BuildConfig().output_dict()
    assert BuildConfig.from_dict({"render": {"width": 64}}).output_dict() != BuildConfig().output_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"shard_size": 2.5}, "shard_size must be int"),
        ({"shard_size": True}, "shard_size must be int"),
        ({"sample_points": {"num_points": 100.5}}, "sample_points.num_points must be int"),
        ({"render": {"views_per_model": 2.0}}, "render.views_per_model must be int"),
        ({"clean": {"categories": "chair"}}, "clean.categories must be a list"),
    ],
)
def test_values_of_the_wrong_type_are_refused_before_any_work(data, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig.from_dict(data)


def test_flow_parameters_override_single_values_through_the_strict_checks():
    deployed = {"shard_size": 256, "review": {"gate": "auto", "timeout_s": 86400}}
    handoff = {"train": True, "preset": "paper"}
    cfg = BuildConfig.from_parameters(deployed, {"review.preview_port": 9000, "handoff.preset": "tiny",
                                                 "shard_size": 16}, handoff)
    assert (cfg.review.preview_port, cfg.review.timeout_s, cfg.review.gate) == (9000, 86400, "auto")
    assert (cfg.handoff.train, cfg.handoff.preset, cfg.shard_size) == (True, "tiny", 16)
    assert deployed["review"] == {"gate": "auto", "timeout_s": 86400}  # the deployment's parameters untouched
    for overrides, message in (({"review.nope": 1}, "unknown keys in 'review'"),
                               ({"nosection.x": 1}, "unknown config section 'nosection'"),
                               ({"review": 3}, "must be a mapping")):
        with pytest.raises(ConfigError, match=message):
            BuildConfig.from_parameters(deployed, overrides, handoff)


def test_flow_overrides_merge_into_sections_and_replace_any_other_value():
    deployed = {"gpu_deployments": {"refine": "refine-shards/refine"}, "review": {"gate": "auto", "timeout_s": 60}}
    cfg = BuildConfig.from_parameters(deployed, {"gpu_deployments": {}, "review": {"gate": "off"}})
    assert cfg.gpu_deployments == {}  # a mapping that is a value, not a section: replaced, so it can be cleared
    assert (cfg.review.gate, cfg.review.timeout_s) == ("off", 60)  # a section: merged
    with pytest.raises(ConfigError, match="gpu_deployments is not a section; give its whole value"):
        BuildConfig.from_parameters(deployed, {"gpu_deployments.refine": "other/refine"})


def test_a_config_file_reads_exponents_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("render: {depth_scale: 1e3}\n")
    assert BuildConfig.from_file(str(path)).render.depth_scale == 1000.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"render": {"width": 1_000_000}}, r"render.width must be in \[1, 4096\] \(default 512"),
        ({"render": {"width": "256"}}, "render.width must be int .*without quotes"),
        ({"render": {"depth_scale": 100_000.0}}, "exceeds 16 bits: lower depth_scale"),
        ({"sample_points": {"num_points": 10_000_000}}, r"num_points must be in \[16, 262144\]"),
        ({"annotate": {"max_reasks": 1000}}, r"annotate.max_reasks must be in \[0, 10\]"),
        ({"annotate": {"concurrency": "4"}}, "annotate.concurrency must be int"),
        ({"shard_size": 10_000_000}, r"shard_size must be in \[1, 100000\]"),
        ({"kpts2d": {"k": 8}}, "kpts2d.k .* must equal geometry.num_keypoints"),
    ],
)
def test_values_are_bounded_and_typed_with_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig.from_dict(data)


@pytest.mark.parametrize(
    "data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xfe\x00s\x00h", "shard: \u00e9".encode("latin-1")]
)
def test_a_binary_or_foreign_config_file_is_one_line(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        BuildConfig.from_file(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
