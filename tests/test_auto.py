"""Defaults from the folder's own properties (medcl pretrain without a recipe)."""
import numpy as np

from medcl.auto import auto_settings, folder_profile
from medcl.config import load_config


def test_profile_reads_dims_size_and_colour(tmp_path, phantoms2d, phantoms3d):
    p2, p3 = folder_profile(phantoms2d), folder_profile(phantoms3d)
    assert (p2["dims"], p2["native_size"], p2["colour"], p2["n_scans"]) == (2, 32, False, 48)
    assert (p3["dims"], p3["native_size"]) == (3, 24)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_images=rgb, train_labels=np.zeros((20, 1)))
    assert folder_profile(tmp_path / "rgb.npz")["colour"] is True
    gray_as_rgb = np.repeat(rgb[..., :1], 3, axis=-1)  # grayscale saved as RGB is not colour
    np.savez(tmp_path / "g.npz", train_images=gray_as_rgb, train_labels=np.zeros((20, 1)))
    assert folder_profile(tmp_path / "g.npz")["colour"] is False


def test_settings_follow_the_folder_and_fit_a_cpu():
    big2d = auto_settings({"dims": 2, "n_scans": 5000, "native_size": 224, "colour": True}, "cpu")
    small2d = auto_settings({"dims": 2, "n_scans": 300, "native_size": 28, "colour": False}, "cpu")
    vol = auto_settings({"dims": 3, "n_scans": 400, "native_size": 128, "colour": False}, "cpu")
    assert big2d["data"]["size"] == 64 and big2d["data"]["channels"] == 3
    assert small2d["data"]["size"] == 28 and small2d["train"]["batch_size"] <= 300 // 4
    assert small2d["train"]["epochs"] > big2d["train"]["epochs"]  # fewer scans: more passes over them
    # 3D on a CPU: a stride-2 stem and a small batch (stride 1 at 32^3 with batch 128 needed > 24 GB)
    assert vol["data"]["size"] == 32 and vol["encoder"]["stem"] == "standard" and vol["train"]["batch_size"] <= 32
    gpu = auto_settings({"dims": 2, "n_scans": 5000, "native_size": 224, "colour": False}, "cuda")
    assert gpu["train"]["epochs"] > big2d["train"]["epochs"]
    for s in (big2d, small2d, vol, gpu):  # every rule gives a valid config
        load_config(None, None, base=s)
    # what the user types wins over the defaults
    cfg = load_config(None, {"train": {"epochs": 2}, "data": {"size": 32}}, base=small2d)
    assert cfg.train.epochs == 2 and cfg.data.size == 32 and cfg.data.channels == 1


def test_pretrain_without_a_recipe_prints_and_saves_the_folder_defaults(tmp_path, phantoms3d):
    import yaml

    from test_cli import TINY, medcl

    r = medcl("pretrain", phantoms3d, "--out", tmp_path / "run", "--set", "train.max_steps=1", *TINY)
    line = r.stdout.splitlines()[0]
    # no --dims: the folder's volumes make it a 3D run, with the CPU's 3D defaults (flags typed still win)
    assert line.startswith("defaults for this folder (24 3D scans, native ~24 px") and "with your flags" in line
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["data"]["dims"] == 3 and cfg["encoder"]["stem"] == "standard" and cfg["encoder"]["name"] == "resnet10"
