import numpy as np
import pytest

from medcl.config import load_config, parse_set
from medcl.data.labels import make_splits, read_labels_csv, resolve_positive, select_budget
from medcl.errors import ConfigError, LabelsError


def test_set_overrides_and_types():
    cfg = load_config(None, parse_set(["method.name=byol", "views.crop_scale=[0.3, 1]", "train.epochs=3"]))
    assert cfg.method.name == "byol" and cfg.views.crop_scale == (0.3, 1.0) and cfg.train.epochs == 3


def test_bare_off_and_on_reach_a_string_key():
    # YAML 1.1 reads off/on/no/yes as booleans; the keys whose choices are words must still take them
    cfg = load_config(None, parse_set(["train.amp=off", "train.fused_optimizer=on"]))
    assert cfg.train.amp == "off" and cfg.train.fused_optimizer == "on"
    with pytest.raises(ConfigError, match="encoder.stem"):
        load_config(None, parse_set(["encoder.stem=yes"]))


@pytest.mark.parametrize("item,msg", [
    ("method.nmae=byol", "Did you mean 'name'"),
    ("trian.epochs=3", "Did you mean 'train'"),
    ("train.epochs=many", "expected int"),
    ("method.name=simclrr", "Did you mean 'simclr'"),
    ("views.crop_scale=[0.5]", "list of 2 numbers"),
    ("data.dims=4", r"not one of 2, 3\.$"),
    ("encoder.stem=smal", "not one of auto, small, standard. Did you mean 'small'"),
    ("train.lr=0.1", r"'lr' is in section 'optim': use optim\.lr\.$"),  # a key filed under another section
    ("train.nope=1", r"Valid keys: amp, .*time_budget\.$"),  # nothing close: the list, not a far-off guess
])
def test_config_errors_name_the_key(item, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, parse_set([item]))


def test_recipes_ship_with_the_package_and_load_by_name_or_path():
    from pathlib import Path

    from medcl.config import RECIPES, recipe_names
    from medcl.methods import METHODS
    from medcl.config import METHOD_NAMES

    assert set(METHODS) == set(METHOD_NAMES)  # the torch-free list the config checks against
    assert RECIPES.parent == Path(__import__("medcl").__file__).parent  # inside the package: it ships in the wheel
    names = recipe_names()
    assert {"simclr_2d", "simclr_3d", "medmnist28"} <= set(names)
    repo_configs = Path(__file__).parents[1] / "configs" / "pretrain"
    for n in names:
        by_name, by_file = load_config(n), load_config(f"{n}.yaml")
        assert by_name == by_file == load_config(repo_configs / f"{n}.yaml")  # configs/pretrain is the same files
    import tomllib

    pkg_data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "recipes/*.yaml" in pkg_data["medcl"]
    with pytest.raises(ConfigError, match="simclr_2d"):
        load_config("simclr_2x")  # the error lists the shipped recipes


def test_every_config_key_has_a_meaning():
    from medcl.config import MedclConfig, describe

    text = describe(MedclConfig())
    keys = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert len(keys) == sum(len(v) for v in MedclConfig().to_dict().values())
    assert all("# " in ln and ln.split("# ", 1)[1].strip() for ln in keys), [ln for ln in keys if "# " not in ln]


def write_csv(tmp_path, text):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,msg", [
    ("file,label\na.png,0\nb.png,1\n", "missing column"),
    ("path,label\na.png,0\na.png,1\n", "appears twice"),
    ("path,label\na.png,0\nb.png,0\n", "only one class"),
    ("path,label\n../x.png,0\nb.png,1\n", "escapes DATA"),
    ("path,label\n/etc/passwd,0\nb.png,1\n", "outside DATA"),
    ("path,label,patient,split\na.png,0,p1,train\nb.png,1,p1,test\n", "patient 'p1'"),
    ("path,label\na.png,cat\nb.png,dog\n", "pass --positive"),
])
def test_labels_csv_errors(tmp_path, text, msg):
    with pytest.raises(LabelsError, match=msg):
        read_labels_csv(write_csv(tmp_path, text), tmp_path)


def test_positive_resolution():
    assert resolve_positive(["0", "1"], None) == ["1"]
    assert resolve_positive(["healthy", "tumor"], None) == ["tumor"]
    assert resolve_positive(["0", "1", "2", "3", "4"], "1,2,3,4") == ["1", "2", "3", "4"]
    assert resolve_positive(["a", "b", "c"], None, multiclass=True) == []  # multi-class, only when asked
    assert resolve_positive(["normal", "benign", "malignant"], "malignant", negative="normal,benign") == ["malignant"]
    with pytest.raises(LabelsError, match="--multiclass"):
        resolve_positive(["a", "b", "c"], None)
    with pytest.raises(LabelsError, match="would all count as healthy"):
        resolve_positive(["normal", "benign", "malignant"], "malignant")
    with pytest.raises(LabelsError, match="classes are"):
        resolve_positive(["0", "1"], "2")


def test_splits_are_patient_grouped_and_stratified():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(100), 3).astype(object)
    y = np.repeat(rng.integers(0, 2, 100), 3)
    split = make_splits(y, patients, 0.2, 0.1, seed=0)
    for p in np.unique(patients):
        assert len(set(split[patients == p])) == 1
    for s in ("train", "val", "test"):
        assert set(y[split == s]) == {0, 1}
    assert 0.1 < (split == "test").mean() < 0.3
    assert (make_splits(y, patients, seed=0) == split).all()  # reproducible


def test_budget_tiny_has_every_class_and_is_reproducible():
    y = np.array([0] * 95 + [1] * 5)
    cand = np.arange(100)
    pick = select_budget(y, cand, fraction=0.01, seed=3)
    assert set(y[pick]) == {0, 1}
    assert (select_budget(y, cand, fraction=0.01, seed=3) == pick).all()
    assert not (select_budget(y, cand, fraction=0.2, seed=4) == select_budget(y, cand, fraction=0.2, seed=5)).all()
    assert len(select_budget(y, cand, per_class=5, seed=0)) == 10
    with pytest.raises(LabelsError, match="only 5"):
        select_budget(y, cand, per_class=6)
