"""docs/extending.md works as written: its example files (a data set, a view, a model option, a
sweep) compose and validate when saved where it says, a data set of one's own loads from its image
folder under its own name, and a model key reaches the model builder by its name alone."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launching.jobs import check_launch, compose_as_launched, job_settings
from soda.config import ModelConfig
from soda.errors import DataError
from soda.models import build_soda
from soda.train import build_model, load_data
from tests.helpers import REPO, launch
from tests.test_docs import example_files

DOC = REPO / "docs" / "extending.md"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """The doc's example files saved where it says, in a folder of their own (--config-dir)."""
    folder = tmp_path_factory.mktemp("conf")
    for path, text in example_files(DOC).items():
        relative = Path(path).relative_to("conf") if path.startswith("conf/") else Path("sweep", Path(path).name)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


def settings(config_dir: Path, *overrides: str):
    return job_settings(compose_as_launched(["--config-dir", str(config_dir), *overrides]))


def write_image_folder(root: Path, classes: dict[str, int], test_classes: dict[str, int] | None = None) -> None:
    """root/train/<class>/*.png and root/test/<class>/*.png of random 8x8 pixels."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", classes), ("test", test_classes or classes)):
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_the_doc_shows_one_file_of_each_kind():
    assert sorted(example_files(DOC)) == [
        "conf/augmentation/view/crop.yaml",
        "conf/dataset/stl10.yaml",
        "conf/model/soda_r18_lm4.yaml",
        "sweeps/latent_size.yaml",
    ]


def test_the_example_data_set_view_and_model_compose_as_written(config_dir):
    dataset = settings(config_dir, "dataset=stl10").dataset
    assert (dataset.name, dataset.image_size, dataset.num_classes) == ("stl10", 96, 10)
    assert dataset.root.endswith("/stl10") and not dataset.download

    views = settings(config_dir, "augmentation/view@augmentation.target=crop").augmentation
    reference = views.source
    assert views.target.name == "crop" and views.target.randaugment_prob == 0
    assert dataclasses.replace(views.target, name="reference", randaugment_prob=reference.randaugment_prob) == reference

    model = settings(config_dir, "model=soda_r18_lm4")
    assert (model.model.latent_dim, model.model.layer_groups, model.model.layer_mask_prob) == (256, 4, 0.2)
    built = build_model(model)  # the values the model checks, not only the schema's
    assert built.encoder.net.fc.out_features == 256


def test_the_example_sweep_runs_every_cell_with_the_example_view(config_dir):
    jobs = check_launch(["--config-dir", str(config_dir), "-m", "sweep=latent_size", "experiment=demo"])
    assert len(jobs) == 12
    targets = {job for overrides in jobs for job in overrides if job.startswith("augmentation/view@")}
    assert targets == {"augmentation/view@augmentation.target=reference", "augmentation/view@augmentation.target=crop"}
    assert (
        settings(config_dir, *jobs[0]).sweep.study_name == "latent_size-demo"
    )  # as the doc's analysis command reads it


def test_a_data_set_of_ones_own_loads_from_its_image_folder(config_dir, tmp_path):
    root = tmp_path / "stl10"
    write_image_folder(root, {"bird": 3, "airplane": 2}, {"bird": 1, "airplane": 2})
    chosen = settings(
        config_dir, "dataset=stl10", f"dataset.root={root}", "dataset.num_classes=2", "dataset.image_size=16"
    )
    train, test = load_data(chosen)
    assert train.classes == test.classes == ["airplane", "bird"]
    assert train.labels.tolist() == [0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1]
    assert tuple(train.images.shape) == (5, 3, 16, 16)
    caches = sorted(path.name for path in (root / ".soda-cache").glob("*.pt"))
    assert [re.sub(r"-[0-9a-f]{16}\.pt$", "", name) for name in caches] == ["stl10-test-16px", "stl10-train-16px"]


def test_a_data_set_of_ones_own_without_its_folder_says_where_the_images_go(config_dir, tmp_path):
    root = tmp_path / "data" / "stl10"
    with pytest.raises(DataError) as missing:
        load_data(settings(config_dir, "dataset=stl10", f"data_root={tmp_path / 'data'}"))
    message = str(missing.value)
    assert "\n" not in message and "stl10 is read as an image folder" in message and "does not exist" in message
    assert f"{root}/train/<class>/*" in message and f"{root}/test/<class>/*" in message
    root.mkdir(parents=True)
    with pytest.raises(DataError, match=r"stl10 is read as an image folder; no train/ folder\)"):
        load_data(settings(config_dir, "dataset=stl10", f"data_root={tmp_path / 'data'}"))


def test_every_model_key_is_an_argument_of_the_model_builder(config_dir):
    # The doc's recipe for a new model key: the schema, the YAML and build_soda, nothing else.
    keys = {field.name for field in dataclasses.fields(ModelConfig)} - {"name"}
    from_the_data = {"image_size", "input_mean", "input_std"}
    parameters = set(inspect.signature(build_soda).parameters)
    assert parameters == keys | from_the_data
    assert set(settings(config_dir).model_arguments()) == parameters


@pytest.mark.integration  # launch.py as a process: a whole run
def test_a_run_trains_on_a_data_set_of_ones_own(config_dir, tmp_path):
    root = tmp_path / "stl10"
    write_image_folder(root, {"bird": 12, "airplane": 12, "cat": 12})
    result = launch(
        [
            "--config-dir",
            str(config_dir),
            "dataset=stl10",
            f"dataset.root={root}",
            "dataset.num_classes=3",
            "dataset.image_size=16",
            "model=tiny",
            "schedule=short",
            "schedule.epochs=1",
            "schedule.batch_size=12",
            "eval.batch_size=36",
            "eval.probe_epochs=2",
            "eval.num_reconstructions=0",
            "eval.latent_gap_images=0",
            "tracking.system_metrics=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_location={tmp_path}/artifacts",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    final = [line for line in result.stdout.splitlines() if line.startswith("final ")]
    assert final and "eval/linear_acc=" in final[-1], result.stdout[-2000:]
