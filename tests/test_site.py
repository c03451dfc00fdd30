"""The site profile (launching/site.py, hydra_plugins/soda_site): where it is found, where it sits in the
composition, what a launcher named on the command line does to it, how launch.py names it."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launching import site
from soda import config

REPO = Path(__file__).resolve().parents[1]

SLURM_PROFILE = """\
# @package _global_
defaults:
  - override /hydra/launcher: slurm
hydra:
  launcher:
    partition: gpu
    timeout_min: 30
    python: python
    setup:
      - source /opt/env/bin/activate
data_root: /shared/datasets
tracking:
  uri: http://mlflow.example:5000
sweep:
  storage: postgresql://db/optuna
  n_jobs: 12
"""


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A SLURM profile in force through $SODA_SITE; returns its path."""
    path = tmp_path / "cluster.yaml"
    path.write_text(SLURM_PROFILE)
    monkeypatch.setenv("SODA_SITE", str(path))
    return path


def composed(*overrides: str):
    return config.compose_raw(list(overrides))


def test_the_profile_sets_the_launcher_its_resources_data_tracking_and_sweep_storage(profile):
    cfg = composed()
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "site"
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SodaSlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.python) == ("gpu", 30, "python")
    assert list(launcher.setup) == ["source /opt/env/bin/activate"]
    assert launcher.signal_delay_s == 120  # the rest is conf/hydra/launcher/slurm.yaml's
    assert cfg.dataset.root == "/shared/datasets/cifar10"  # data_root feeds every data set's root
    assert cfg.tracking.uri == "http://mlflow.example:5000"
    assert (cfg.sweep.storage, cfg.sweep.n_jobs) == ("postgresql://db/optuna", 12)


def test_the_command_line_and_the_sweep_file_override_the_profile(profile):
    cfg = composed("hydra.launcher.timeout_min=5", "sweep.n_jobs=3", "data_root=/elsewhere")
    assert (cfg.hydra.launcher.timeout_min, cfg.hydra.launcher.partition) == (5, "gpu")
    assert (cfg.sweep.n_jobs, cfg.dataset.root) == (3, "/elsewhere/cifar10")
    # A sweep file comes after the profile: its study name and sampler are the sweep's.
    swept = composed("sweep=augment_ablation")
    assert swept.sweep.study_name == "augment_ablation" and swept.sweep.n_jobs == 12
    assert swept.hydra.runtime.choices["hydra/launcher"] == "site"


def test_a_launcher_named_on_the_command_line_starts_from_conf_not_the_profile(profile):
    local = composed("hydra/launcher=local")
    assert local.hydra.launcher._target_.endswith("SodaLocalLauncher")
    assert "partition" not in local.hydra.launcher
    assert local.dataset.root == "/shared/datasets/cifar10"  # the rest of the profile stays
    slurm = composed("hydra/launcher=slurm")
    assert slurm.hydra.launcher.partition is None and slurm.hydra.launcher.timeout_min == 1440
    without = composed("~site")
    assert without.hydra.launcher._target_.endswith("SodaLocalLauncher") and without.sweep.n_jobs == 1


def test_without_a_profile_multiruns_use_the_local_launcher(monkeypatch, tmp_path):
    monkeypatch.setattr(site, "DEFAULT_PROFILE", tmp_path / "absent.yaml")
    monkeypatch.delenv("SODA_SITE")
    assert site.profile_path() is None
    cfg = composed()
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "local"
    assert cfg.dataset.root == "./data/cifar10"


def test_soda_site_none_hides_the_git_ignored_default_profile(monkeypatch, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, symlinks=True)
    (conf / "sweep").unlink()
    (conf / "sweep").symlink_to(REPO / "sweeps")
    (conf / "site").mkdir(exist_ok=True)
    default = conf / "site" / "default.yaml"
    default.write_text(SLURM_PROFILE)
    monkeypatch.setattr(site, "DEFAULT_PROFILE", default)
    monkeypatch.delenv("SODA_SITE")
    found = config.compose_raw([], config_dir=conf)
    assert found.hydra.runtime.choices["hydra/launcher"] == "site" and found.hydra.launcher.partition == "gpu"
    monkeypatch.setenv("SODA_SITE", "none")
    hidden = config.compose_raw([], config_dir=conf)
    assert hidden.hydra.runtime.choices["hydra/launcher"] == "local" and hidden.sweep.n_jobs == 1


def test_settings_without_a_launcher_choice_apply_to_the_default_launcher(tmp_path, monkeypatch):
    path = tmp_path / "here.yaml"
    path.write_text("hydra:\n  launcher:\n    threads_per_task: 3\n")
    monkeypatch.setenv("SODA_SITE", str(path))
    cfg = composed()
    assert cfg.hydra.launcher._target_.endswith("SodaLocalLauncher") and cfg.hydra.launcher.threads_per_task == 3


def test_a_job_composes_the_profile_as_it_was_read_at_submission(profile):
    """A SLURM job gets the submitting process's config loader, this source in it, pickled."""
    from hydra_plugins.soda_site.site_source import SiteConfigSource

    source = SiteConfigSource(provider="soda-site", path=f"sodasite://{profile}")
    assert source.is_config("site/default") and source.is_config("hydra/launcher/site")
    profile.write_text(SLURM_PROFILE.replace("partition: gpu", "partition: changed"))
    copy = pickle.loads(pickle.dumps(source))
    launcher = OmegaConf.to_container(copy.load_config("hydra/launcher/site").config)
    assert launcher["partition"] == "gpu"
    assert copy.list("hydra/launcher", None) == ["site"] and copy.list("", None) == ["hydra", "site"]


def run_launch(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch.py", *arguments],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "does not exist: write it with `make site SITE="),
        ("a: [1\n", "is not valid YAML at line 2"),
        ("- 1\n", "must be a YAML mapping of config keys, not a list"),
        ("seeed: 3\n", "Key 'seeed' not in 'Config'"),
        ("hydra:\n  launcher:\n    partitoin: x\n", "(its launcher: hydra.launcher)"),
    ],
)
def test_a_bad_profile_is_one_line_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "site.yaml"
    if text is not None:
        path.write_text(text)
    done = run_launch("experiment=demo", "--cfg", "job", env={"SODA_SITE": str(path)})
    assert done.returncode == 2
    error = done.stderr.strip()
    assert "\n" not in error and error.startswith("error: ") and str(path) in error and expected in error


def test_a_multirun_first_says_where_its_jobs_run(tmp_path, profile):
    # A bad value stops the launch before any job: what was printed first is all there is.
    without = run_launch("-m", "experiment=demo", "schedule.epochs=0", env={"SODA_SITE": "none"})
    assert without.returncode == 2 and "schedule.epochs=0" in without.stderr
    first = without.stdout.splitlines()[0]
    assert first.startswith("SODA_SITE=none: the jobs run on this machine (hydra/launcher=local)")
    assert "make site" in first
    with_profile = run_launch("-m", "experiment=demo", "schedule.epochs=0", env={"SODA_SITE": str(profile)})
    assert with_profile.stdout.splitlines()[0] == f"site profile {profile}: hydra/launcher=slurm (partition gpu)"
    # Naming the local launcher still says which GPUs the jobs get; naming another, or a run that
    # is not a multirun, needs no such line.
    assert site.launch_note(["-m", "hydra/launcher=local"]).startswith("hydra/launcher=local: the jobs run on this")
    assert site.launch_note(["-m", "hydra/launcher=slurm"]) is None and site.launch_note(["seed=1"]) is None


def test_the_note_without_a_profile_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.setattr(site, "DEFAULT_PROFILE", tmp_path / "absent.yaml")
    monkeypatch.delenv("SODA_SITE")
    note = site.launch_note(["-m", "sweep=augment_ablation"])
    assert note.startswith(f"no site profile (SODA_SITE or {tmp_path / 'absent.yaml'})")
    assert "`make site` writes a profile" in note


def test_cfg_hydra_says_where_each_launcher_value_came_from(profile):
    done = run_launch(
        "-m",
        "sweep=augment_ablation",
        "experiment=demo",
        "hydra.launcher.mem_gb=4",
        "--cfg",
        "hydra",
        env={"SODA_SITE": str(profile)},
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split(":", 1)[0].strip(): line for line in done.stdout.splitlines() if line.startswith("    ")}
    assert lines["partition"].endswith(f"partition: gpu  # site profile {profile}")
    assert lines["mem_gb"].endswith("mem_gb: 4  # command line")
    assert lines["signal_delay_s"].endswith("# conf/hydra/launcher/slurm.yaml")
    assert lines["srun_args"].endswith("# schema default")
    assert f"  launcher:  # hydra/launcher: site profile {profile}, on hydra/launcher=slurm" in done.stdout
    assert OmegaConf.create(done.stdout).hydra.launcher.partition == "gpu"  # still YAML
    assert "checked all 12 jobs of the sweep" in done.stderr


def test_launcher_sources_name_a_sweep_file_above_the_profile(profile, monkeypatch, tmp_path):
    sweep_file = REPO / "sweeps" / "augment_ablation.yaml"
    monkeypatch.setattr(
        site,
        "_load",
        lambda path: (
            {"hydra": {"launcher": {"timeout_min": 60}}}
            if path == sweep_file
            else site.yaml.safe_load(path.read_text())
        ),
    )
    cfg = composed("sweep=augment_ablation")
    sources = site.launcher_sources(cfg, ["sweep=augment_ablation"], site.read_profile(profile))
    assert sources["timeout_min"] == "sweep file sweeps/augment_ablation.yaml"
    assert sources["partition"] == f"site profile {profile}"
    local = site.launcher_sources(composed("hydra/launcher=local"), ["hydra/launcher=local"], None)
    assert local[""] == "command line" and local["tasks_per_node"] == "conf/hydra/launcher/local.yaml"
