import dataclasses
import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, OmegaConf

from launching.jobs import check_launch, check_shown_config, sweep_jobs
from soda import config, config_groups
from soda.config import to_settings
from soda.errors import ConfigError
from tests.helpers import CONF, compose_config, launch

GROUPS = ["model", "dataset", "augmentation", "schedule", "eval", "tracking"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_option_composes_and_validates(group, option):
    settings = to_settings(compose_config([f"{group}={option}"]))
    assert getattr(settings, group).name == option


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    settings = to_settings(compose_config([f"experiment={experiment}"]))
    assert settings.dataset.name


def test_defaults_are_the_reference():
    settings = to_settings(compose_config([]))
    assert settings.model.name == "soda_r18_ddpm" and settings.dataset.name == "cifar10"
    assert settings.augmentation.name == "seed" and settings.schedule.epochs == 800
    assert settings.schedule.decoder_lr == 4e-4 and settings.schedule.batch_size == 512
    assert settings.eval.knn_k == 20 and settings.eval.knn_vote == "uniform"
    assert settings.tracking.uri.startswith("sqlite:///") and settings.tracking.uri.endswith("/mlflow.db")
    assert settings.objective == "eval/linear_acc"


def test_demo_is_a_delta_on_the_defaults():
    demo = to_settings(compose_config(["experiment=demo"]))
    assert demo.dataset.name == "shapes" and demo.model.name == "tiny"
    assert demo.eval.name == "reference" and demo.tracking.name == "local"  # untouched groups keep the defaults
    # The demo is where the latent learns at CPU scale; the reference stays the default.
    assert demo.augmentation.name == "none" and demo.model.noise_schedule == "inverted_cosine"
    default = to_settings(compose_config([]))
    assert default.augmentation.name == "seed" and default.model.noise_schedule == "linear"


def test_a_data_set_of_ones_own_is_any_plain_name():
    # conf/dataset/stl10.yaml with name: stl10 is an image folder (docs/extending.md).
    settings = to_settings(compose_config(["dataset=imagefolder", "dataset.name=stl10", "dataset.root=/data/stl10"]))
    assert settings.dataset.name == "stl10" and settings.dataset.root == "/data/stl10"
    assert to_settings(compose_config(["dataset=imagefolder", "dataset.name=My_set-2"])).dataset.name == "My_set-2"


@pytest.mark.parametrize("name", ["my data", "a/b", "../stl10", "-x", ""])
def test_a_data_set_name_that_is_not_a_plain_word_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as error:
        check_launch(["dataset=imagefolder", f"dataset.name='{name}'"])
    assert str(error.value) == (
        f"dataset.name={name!r} must start with a letter or digit and hold only letters, digits, _ and - "
        "(it names the cache files)"
    )


def test_clean_target_keeps_the_reference_source_and_only_flips_the_target():
    settings = to_settings(compose_config(["augmentation=clean_target"]))
    seed = to_settings(compose_config(["augmentation=seed"]))
    assert settings.augmentation.source == seed.augmentation.source
    target = settings.augmentation.target
    assert target.randaugment_prob == 0 and list(target.crop_scale) == [1.0, 1.0] and target.flip_prob == 0.5


def test_data_root_follows_soda_data(monkeypatch):
    monkeypatch.setenv("SODA_DATA", "/somewhere/else")
    assert to_settings(compose_config(["dataset=cifar10"])).dataset.root == "/somewhere/else/cifar10"


def test_the_schema_holds_types_and_conf_the_values():
    # Each default is written once: a field that a YAML file of conf/ sets has none in the schema.
    # These four are the exceptions no YAML file needs (shapes sets its sizes).
    modules = (config, config_groups)
    schemas = {
        v for m in modules for name, v in vars(m).items() if dataclasses.is_dataclass(v) and not name.startswith("_")
    }
    assert len(schemas) == 9
    fields = [(schema.__name__, field) for schema in schemas for field in dataclasses.fields(schema)]
    with_default = {f"{schema}.{field.name}" for schema, field in fields if field.default != MISSING}
    assert with_default == {f"DatasetConfig.{key}" for key in ("train_limit", "test_limit", "train_size", "test_size")}


def test_a_value_missing_from_conf_is_an_error_naming_the_key():
    composed = OmegaConf.to_container(compose_config([]))
    del composed["model"]["latent_dim"], composed["eval"]["probe_augmentation"]["crop_scale"]
    with pytest.raises(ConfigError, match=r"no value for eval\.probe_augmentation\.crop_scale, model\.latent_dim"):
        to_settings(OmegaConf.create(composed))


def test_sweep_settings_come_from_conf_and_a_sweep_file_changes_them():
    plain = to_settings(compose_config([])).sweep
    assert plain.n_jobs == 1 and plain.max_failure_rate == 0.25 and plain.study_name is None
    assert plain.storage.endswith("optuna-journal.log") or plain.storage == os.environ.get("SODA_SWEEP_STORAGE")
    search = to_settings(compose_config(["sweep=lr_search", "sweep.n_jobs=3"])).sweep
    assert (search.study_name, search.n_trials, search.n_jobs, search.max_failure_rate) == ("lr_search", 16, 3, 0.25)


def test_views_take_what_they_do_not_set_from_the_reference_view():
    settings = to_settings(compose_config(["augmentation=none"]))
    reference = to_settings(compose_config([])).augmentation.source
    none = settings.augmentation.source
    assert none.name == "none" and none.crop_prob == none.flip_prob == none.randaugment_prob == 0
    assert (none.crop_scale, none.randaugment_ops) == (reference.crop_scale, reference.randaugment_ops)
    probe = settings.eval.probe_augmentation
    assert (probe.name, probe.crop_prob, probe.randaugment_prob) == ("probe", 0.65, 0.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.epochs=-1", "schedule.epochs=-1 must be at least 1"),
        ("schedule.precision=fp8", "schedule.precision='fp8'"),
        ("augmentation.source.crop_prob=1.5", "augmentation.source.crop_prob=1.5 must be a probability"),
        ("eval.knn_vote=majority", "eval.knn_vote='majority'"),
        ("device=tpu", "device='tpu'"),
        ("eval.linear_probe=sometimes", "eval.linear_probe='sometimes'; allowed: every, last"),
        ("eval.latent_gap_timesteps=[500,1000]", "eval.latent_gap_timesteps=[500, 1000] must lie in 0..999"),
        ("eval.latent_gap_images=1", "eval.latent_gap_images=1 must be 0 to turn it off, or at least 2"),
        ("schedule.train_seconds=0", "schedule.train_seconds=0.0 must be positive or null"),
        ("eval.every_seconds=-5", "eval.every_seconds=-5.0 must be positive or null"),
    ],
)
def test_out_of_range_values_fail_validation(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        to_settings(compose_config([override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("+model.foo=1", "model.foo is not a config key"),
        ("++model.foo=1", "model.foo is not a config key"),
        ("+foo=1", "foo is not a config key"),
        ("+schedule.epochz=3", "schedule.epochz is not a config key; did you mean schedule.epochs?"),
        ("++epochs=3", "epochs is not a config key; did you mean schedule.epochs?"),
        ("+augmentation.source.extra.depth=2", "augmentation.source.extra is not a config key"),
    ],
)
def test_keys_added_with_plus_must_be_in_the_schema(override, message):
    # Hydra's `+`/`++` add a key even to a struct config, and the typed merge would drop it silently.
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_settings(compose_config([override]))
    with pytest.raises(ConfigError, match=re.escape(message)):  # tools compose through soda.config
        config.compose_config([override])


def test_plus_still_sets_schema_keys_free_form_tags_and_appends_real_groups():
    overrides = ["++seed=3", "+tracking.tags.team=vision", "+augmentation/view@eval.probe_augmentation=none"]
    settings = to_settings(config.compose_config(overrides))
    assert settings.seed == 3 and settings.tracking.tags == {"team": "vision"}
    assert settings.eval.probe_augmentation.name == "none"


def test_unknown_keys_are_listed_together():
    composed = OmegaConf.to_container(compose_config([]))
    composed["model"]["foo"], composed["bar"] = 1, 2
    with pytest.raises(ConfigError, match=r"^bar, model\.foo are not config keys"):
        to_settings(OmegaConf.create(composed))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("dataset=nope", "Could not find 'dataset/nope'"),
        ("+model.foo=1 experiment=demo", "model.foo is not a config key"),
        (
            "sweep=augment_ablation experiment=demo",
            "sweep=augment_ablation is a sweep: run it with -m (python launch.py -m sweep=augment_ablation "
            "experiment=demo",
        ),
        ("schedule.epochs=-1", "schedule.epochs=-1 must be at least 1"),
        ("schedule.epochz=3", "epochz"),
        ("schedule.epochs=many", "schedule.epochs"),
        (
            "model.latent_dim=100 model.layer_groups=3",
            "model.latent_dim=100 does not divide into model.layer_groups=3",
        ),
        ("model.noise_schedule=bogus", "model.noise_schedule='bogus' is not known; allowed: linear, cosine"),
    ],
)
@pytest.mark.integration  # launch.py as a process, once per case
def test_bad_overrides_exit_nonzero_with_one_line(override, expected, tmp_path: Path):
    result = launch([*override.split(), f"hydra.run.dir={tmp_path}/run"], timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# The launchers' schemas: typed, and not offered as options of hydra/launcher.

# Options of hydra/launcher that others register: Hydra's own and hydra-submitit-launcher's.
THIRD_PARTY_LAUNCHERS = {"basic", "submitit_local", "submitit_slurm"}


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def launcher_options() -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options("hydra/launcher")


def test_hydra_offers_only_our_launchers_and_its_own():
    options = set(launcher_options())
    assert options - THIRD_PARTY_LAUNCHERS == {"local", "slurm"}, options
    assert not [option for option in options if option.endswith("_base") or option.startswith("soda_")]


@pytest.mark.parametrize("launcher, target", [("local", "SodaLocalLauncher"), ("slurm", "SodaSlurmLauncher")])
def test_launchers_keep_their_typed_schema(launcher, target):
    composed = compose_with_hydra([f"hydra/launcher={launcher}"])
    assert composed.hydra.launcher._target_ == f"hydra_plugins.soda_launchers.launchers.{target}"
    # Local jobs: one rank per GPU the job gets (null until the launcher counts them); SLURM: one.
    assert composed.hydra.launcher.tasks_per_node == (None if launcher == "local" else 1)
    with pytest.raises(ConfigCompositionException, match="hydra.launcher.gpus_per_node=four") as wrong_type:
        compose_with_hydra([f"hydra/launcher={launcher}", "hydra.launcher.gpus_per_node=four"])
    assert "could not be converted to Integer" in str(wrong_type.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="Could not override 'hydra.launcher.gpus'") as unknown:
        compose_with_hydra([f"hydra/launcher={launcher}", "hydra.launcher.gpus=4"])
    assert f"Key 'gpus' not in '{target.replace('Launcher', 'Conf')}'" in str(unknown.value.__cause__)


# The dry check (`--cfg job`) and the jobs of a sweep.


def test_sweep_jobs_are_every_combination_with_an_interval_at_its_lower_end():
    params = {
        "augmentation/view@augmentation.target": "choice(reference, flip, none)",
        "seed": "range(0, 2)",
        "schedule.decoder_lr": "tag(log, interval(1e-4, 3e-3))",
        "eval.knn_k": "tag(int, interval(5, 50))",
        "eval.at_start": True,
    }
    jobs = sweep_jobs(params, ["experiment=demo", "schedule.epochs=1,2"])
    assert len(jobs) == 3 * 2 * 2
    assert jobs[0] == [
        "eval.at_start=true",
        "experiment=demo",
        "augmentation/view@augmentation.target=reference",
        "seed=0",
        "schedule.decoder_lr=0.0001",
        "eval.knn_k=5",
        "schedule.epochs=1",
    ]
    assert jobs[-1][2:] == [
        "augmentation/view@augmentation.target=none",
        "seed=1",
        "schedule.decoder_lr=0.0001",
        "eval.knn_k=5",
        "schedule.epochs=2",
    ]
    assert len({tuple(job) for job in jobs}) == len(jobs)


def test_a_command_line_value_pins_a_swept_parameter_and_a_command_line_sweep_replaces_it():
    params = {"seed": "range(0, 3)", "schedule.epochs": "choice(1, 2)"}
    assert sweep_jobs(params, ["seed=7", "schedule.epochs=5,6,7"]) == [
        ["seed=7", "schedule.epochs=5"],
        ["seed=7", "schedule.epochs=6"],
        ["seed=7", "schedule.epochs=7"],
    ]
    assert sweep_jobs({}, []) == [[]]  # -m without a sweep: one job


def test_check_launch_validates_one_run_as_the_run_does():
    assert check_launch(["experiment=demo", "schedule.epochs=3"]) == [["experiment=demo", "schedule.epochs=3"]]
    with pytest.raises(ConfigError, match=r"^schedule\.epochs=-1 must be at least 1$"):
        check_launch(["experiment=demo", "schedule.epochs=-1", "--cfg", "job"])
    with pytest.raises(ConfigError, match=r"sweep=lr_search is a sweep: run it with -m \(python launch.py -m sweep"):
        check_launch(["sweep=lr_search"])
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/nope'"):
        check_launch(["model=nope"])


def test_check_launch_validates_every_job_of_a_multirun_and_names_the_bad_one():
    jobs = check_launch(["-m", "experiment=demo", "seed=0,1", "model=tiny,soda_r18_ddpm"])
    assert jobs == [
        ["experiment=demo", f"seed={seed}", f"model={model}"] for seed in (0, 1) for model in ("tiny", "soda_r18_ddpm")
    ]
    with pytest.raises(ConfigError, match=r"^schedule\.epochs=0 must be at least 1 \(in job 2 of 3: experiment=demo "):
        check_launch(["--multirun", "experiment=demo", "schedule.epochs=2,1,0"])
    with pytest.raises(ConfigError, match=r"augmentation\.target\.crop_prob=1\.5 .*in job 1 of 2"):
        check_launch(["-m", "augmentation.target.crop_prob=0.5,1.5"])


def test_a_sweep_file_is_checked_over_its_grid():
    jobs = check_launch(["-m", "sweep=augment_ablation", "experiment=demo"])
    assert len(jobs) == 3 * 2 * 2
    assert {job[-1] for job in jobs} == {"seed=0", "seed=1"}


def test_shown_config_of_a_multirun_is_its_first_job():
    arguments = ["-m", "experiment=demo", "seed=3,4", "--cfg", "job", "-p", "seed"]
    shown, note = check_shown_config(arguments)
    assert shown == ["experiment=demo", "seed=3", "--cfg", "job", "-p", "seed"]
    assert note == "checked all 2 jobs of the sweep; shown: job 0 (experiment=demo seed=3)"
    # Nothing to check: not a config to show.
    for unchanged in (["schedule.epochs=-1"], ["--help", "-c", "job"], ["schedule.epochs=-1", "--info", "-c", "job"]):
        assert check_shown_config(unchanged) == (unchanged, None)
    for shown in ("all", "hydra"):  # Hydra's part too: it is the launch's, with -m that of job 0
        with pytest.raises(ConfigError, match="schedule.epochs=-1 must be at least 1"):
            check_shown_config(["schedule.epochs=-1", "-c", shown])


# What the run checks when it builds the model and the data, checked before any launch: each bad
# value (with the good one it replaces in a multirun) and what its one line says.
BUILD_CHECKS = [
    ("model.layer_groups", "1", "7", "model.layer_groups=7 must be between 1 and the number of levels (4)"),
    ("dataset.image_size", "32", "20", "dataset.image_size=20 cannot be halved 3 times"),
    ("model.attention_heads", "1", "3", "model.attention_heads=3 must divide every level's channels"),
    (
        "model.norm_groups",
        "32",
        "7",
        "model.base_channels=128 x mult 1 = 128 channels is not divisible by model.norm_groups=7",
    ),
    ("dataset.num_classes", "6", "7", "dataset.num_classes=7 but shapes has 6 classes"),
    ("schedule.batch_size", "32", "4096", "schedule.batch_size=4096 is larger than the training set"),
]
SHAPES = ["dataset=shapes"]  # the synthetic set: its class count and size (3000 images) are known


@pytest.mark.parametrize("key, good, bad, message", BUILD_CHECKS, ids=[case[0] for case in BUILD_CHECKS])
def test_what_the_run_checks_as_it_builds_is_refused_before_any_launch(key, good, bad, message):
    from launching import dryrun

    base = SHAPES if key.startswith(("dataset.num", "schedule")) else []
    expected = re.escape(message)
    # --cfg job (launching.jobs.check_shown_config), the dry run, and a multirun's pre-check in
    # which one job is bad (the launchers check each job with to_settings, as the run does).
    with pytest.raises(ConfigError, match=expected):
        check_shown_config([*base, f"{key}={bad}", "--cfg", "job"])
    with pytest.raises(ConfigError, match=expected):
        dryrun.main(["-m", *base, f"{key}={bad}", "hydra.launcher.dry_run=true"])
    with pytest.raises(ConfigError, match=rf"^{expected}.* \(in job 1 of 2: .*{re.escape(key)}={bad}\)$") as error:
        check_launch(["-m", *base, f"{key}={good},{bad}"])
    assert "\n" not in str(error.value)
    assert check_launch(["-m", *base, f"{key}={good}"]) == [[*base, f"{key}={good}"]]  # the good one passes


@pytest.mark.parametrize("arguments", [[], ["experiment=demo"], ["model=tiny", "dataset=shapes"]])
def test_the_reference_and_the_demo_pass_the_build_checks(arguments):
    settings = to_settings(compose_config(arguments))
    assert settings.model.layer_groups == 1
