"""View recipes as MONAI transform lists: the bundle list builds MONAI's own Compose; the batched engine matches MONAI
per transform (in distribution over many draws, 2D and 3D; exactly for identity parameters); whatever it does not
implement runs through MONAI and is reported, never dropped."""
import numpy as np
import pytest
import torch
import yaml

from medcl.config import ViewsConfig
from medcl.errors import ConfigError
from medcl.views import BatchedViews, knob_transforms, monai_transform
from medcl.views.batched import Plan
from medcl.views.recipe import parse

RESIZE = {"_target_": "Resize", "spatial_size": "@spatial_size", "mode": "bilinear"}


def phantom(dims, size, channels=1):
    """Structured, asymmetric content: two ramps of different slopes and an off-centre blob, in [0, 1]; more
    channels are differently scaled copies (a colour image)."""
    ax = torch.linspace(0, 1, size)
    grids = torch.meshgrid(*([ax] * dims), indexing="ij")
    x = 0.5 * grids[0] + 0.2 * grids[1]
    blob = sum((g - c) ** 2 for g, c in zip(grids, (0.7, 0.3, 0.5)))
    x = (x + 0.3 * torch.exp(-blob / 0.02)).clamp(0, 1)
    return torch.stack([x, 1 - x, 0.5 * x][:channels])


def both_engines(items, dims, size, n, channels=1):
    x = phantom(dims, size, channels)
    specs = parse(items, dims, size)
    from monai.transforms import Compose

    ref = Compose([s.transform for s in specs])
    monai_out = []
    for k in range(n):
        ref.set_random_state(seed=k)
        monai_out.append(torch.as_tensor(ref(x.clone())).float())
    plan = Plan(specs, dims, size)
    ours = plan(x[None].repeat((n,) + (1,) * (dims + 1)), torch.Generator().manual_seed(0))
    return torch.stack(monai_out), ours, plan


def dims_args(item, dims):
    """3D variants of 2D arguments: rotate about three axes, per-axis ranges for the third axis."""
    item = dict(item)
    if dims == 3 and "rotate_range" in item:
        item["rotate_range"] = [item["rotate_range"][0], [-0.1, 0.3], [0.2, 0.4]]
    if dims == 3 and "translate_range" in item:
        item["translate_range"] = list(item["translate_range"]) + [[-1, 2]]
    return item


CASES = {
    "RandFlip axis 0": [{"_target_": "RandFlip", "prob": 0.3, "spatial_axis": 0}],
    "RandFlip all axes": [{"_target_": "RandFlip", "prob": 0.6}],
    "RandAxisFlip": [{"_target_": "RandAxisFlip", "prob": 0.8}],
    "RandAffine rotate (asymmetric, zeros)": [{"_target_": "RandAffine", "prob": 0.9, "rotate_range": [[0.2, 0.7]],
                                               "padding_mode": "zeros"}],
    "RandAffine translate + scale (border)": [{"_target_": "RandAffine", "prob": 1.0, "translate_range": [[1, 3], [-3, -1]],
                                               "scale_range": [[0.1, 0.3]], "padding_mode": "border"}],
    "RandAffine defaults (reflection)": [{"_target_": "RandAffine", "prob": 1.0, "rotate_range": [0.5],
                                          "scale_range": [0.2, 0.2, 0.2]}],
    "RandScaleCrop + Resize": [{"_target_": "RandScaleCrop", "roi_scale": 0.5, "max_roi_scale": 0.9,
                                "random_size": True}, RESIZE],
    "RandSpatialCrop + Resize": [{"_target_": "RandSpatialCrop", "roi_size": 7, "random_size": False}, RESIZE],
    "RandAdjustContrast": [{"_target_": "RandAdjustContrast", "prob": 0.7, "gamma": [0.5, 2.0]}],
    "RandScaleIntensity": [{"_target_": "RandScaleIntensity", "prob": 0.8, "factors": [0.1, 0.5]}],
    "RandShiftIntensity": [{"_target_": "RandShiftIntensity", "prob": 0.8, "offsets": 0.2}],
    "RandScaleIntensity per channel": [{"_target_": "RandScaleIntensity", "prob": 0.8, "factors": 0.3,
                                        "channel_wise": True}],
    "RandGaussianNoise": [{"_target_": "RandGaussianNoise", "prob": 0.6, "mean": 0.05, "std": 0.1}],
    "RandGaussianSmooth": [{"_target_": "RandGaussianSmooth", "prob": 0.7, "sigma_x": [0.5, 1.5],
                            "sigma_y": [0.2, 0.4], "sigma_z": [0.3, 0.9]}],
    "ScaleIntensityRange (a window)": [{"_target_": "ScaleIntensityRange", "a_min": 0.2, "a_max": 0.7, "b_min": 0.0,
                                        "b_max": 1.0, "clip": True}],
    "RandBiasField": [{"_target_": "RandBiasField", "prob": 0.8}],  # MONAI's coeff_range (0, 0.1)
    "RandHistogramShift": [{"_target_": "RandHistogramShift", "prob": 0.8, "num_control_points": [4, 8]}],
    "RandCoarseDropout": [{"_target_": "RandCoarseDropout", "prob": 0.8, "holes": 1, "max_holes": 3,
                           "spatial_size": 3, "max_spatial_size": 6, "fill_value": 0.0}],
    "RandCoarseDropout (random fill, keep holes)": [{"_target_": "RandCoarseDropout", "prob": 0.9, "holes": 2,
                                                      "spatial_size": 5, "dropout_holes": False}],
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_engine_matches_monai_in_distribution(case, dims):
    size, n = (16, 500) if dims == 2 else (10, 200)
    items = [dims_args(it, dims) for it in CASES[case]]
    ref, ours, plan = both_engines(items, dims, size, n, channels=3 if "per channel" in case else 1)
    red = tuple(range(1, ours.ndim))
    assert all("batched" in line for line in plan.report), plan.report  # the batched engine really ran it
    assert ours.shape == ref.shape
    # the expected view, pixel by pixel: catches axis, sign and range conventions (flip axes, rotation direction,
    # translation sign, crop box placement)
    # (within a few standard errors of the two means: flips and coins are all-or-nothing events on whole views)
    se = ((ours.var(0) + ref.var(0)) / len(ours)).sqrt().mean()
    assert (ours.mean(0) - ref.mean(0)).abs().mean() < 0.005 + 4 * se, (case, se)
    # pooled intensity quantiles, and the spread of per-view means and standard deviations
    # (0.04 plus 10%: a bias field's per-view spread is heavy-tailed, and two halves of one engine's draws differ
    # by ~10% there)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    for stat in (lambda v: v.flatten()[::7], lambda v: v.mean(red), lambda v: v.std(red)):
        want = torch.quantile(stat(ref), q)
        assert ((torch.quantile(stat(ours), q) - want).abs() < 0.04 + 0.1 * want.abs()).all(), case


IDENTITY = [
    {"_target_": "RandFlip", "prob": 0.0},
    {"_target_": "RandAxisFlip", "prob": 0.0},
    {"_target_": "RandAffine", "prob": 1.0, "rotate_range": 0.0, "padding_mode": "zeros"},
    {"_target_": "RandScaleCrop", "roi_scale": 1.0}, RESIZE,
    {"_target_": "RandAdjustContrast", "prob": 0.0},
    {"_target_": "RandScaleIntensity", "prob": 1.0, "factors": 0.0},
    {"_target_": "RandShiftIntensity", "prob": 1.0, "offsets": 0.0},
    {"_target_": "RandGaussianNoise", "prob": 0.0},
    {"_target_": "RandGaussianSmooth", "prob": 0.0},
    {"_target_": "ScaleIntensityRange", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0},
    {"_target_": "RandBiasField", "prob": 1.0, "coeff_range": [0.0, 0.0]},
    {"_target_": "RandHistogramShift", "prob": 0.0},
    {"_target_": "RandCoarseDropout", "prob": 0.0, "holes": 2, "spatial_size": 3},
]


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_parameters_return_the_input_exactly(dims):
    x = torch.rand((3, 1) + (12,) * dims, generator=torch.Generator().manual_seed(0))
    specs = parse(IDENTITY, dims, 12)
    assert torch.equal(Plan(specs, dims, 12)(x, torch.Generator().manual_seed(0)), x)
    from monai.transforms import Compose

    ref = Compose([s.transform for s in specs])
    torch.testing.assert_close(torch.as_tensor(ref(x[0])), x[0], atol=1e-5, rtol=0)  # MONAI's own resampling noise


@pytest.mark.parametrize("dims", [2, 3])
def test_rotation_and_bias_field_equal_monais_formulas(dims):
    from monai.transforms import RandBiasField
    from monai.transforms.utils import create_rotate

    from medcl.views.batched import BiasField, rotation

    ang = torch.tensor([[0.3, -0.7, 1.1]]) if dims == 3 else torch.tensor([0.4])
    ref = create_rotate(dims, ang[0].tolist() if dims == 3 else 0.4)[:dims, :dims]
    np.testing.assert_allclose(rotation(ang, dims)[0].numpy(), ref, atol=1e-6)
    op = BiasField(1.0, 3, (0.0, 0.1), dims)
    shape = (9, 7, 5)[:dims]
    coeff = np.random.default_rng(0).uniform(-0.5, 0.5, len(op.terms))
    ours = torch.tensordot(torch.as_tensor(coeff, dtype=torch.float32), op._basis(shape, "cpu"), dims=1)
    want = RandBiasField(degree=3)._generate_random_field(shape, 3, coeff.tolist())
    np.testing.assert_allclose(ours.numpy(), want, atol=1e-5)


def test_a_bundle_list_builds_the_compose_monai_would():
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    items = [{"_target_": "RandScaleCrop", "roi_scale": 0.5, "random_size": True}, RESIZE,
             {"_target_": "RandBiasField", "prob": 0.5, "coeff_range": "$(0.0, 0.2)"},
             {"_target_": "monai.transforms.RandGibbsNoise", "prob": 0.5},
             {"_target_": "RandCoarseDropout", "holes": 2, "spatial_size": "$@size // 4", "prob": 0.7}]
    ours = monai_transform(ViewsConfig(transforms=items), 2, 16)
    parser = ConfigParser({"size": 16, "dims": 2, "spatial_size": [16, 16], "transforms": items})
    ref = Compose(parser.get_parsed_content("transforms"))
    assert [type(t) for t in ours.transforms] == [type(t) for t in ref.transforms]
    x = phantom(2, 16)
    for k in range(5):
        ours.set_random_state(seed=k)
        ref.set_random_state(seed=k)
        assert torch.equal(torch.as_tensor(ours(x.clone())), torch.as_tensor(ref(x.clone())))


@pytest.mark.parametrize("dims", [2, 3])
def test_the_knob_recipe_is_its_equivalent_list_in_both_engines(dims):
    knobs = ViewsConfig()
    listed = ViewsConfig(transforms=yaml.safe_load(yaml.safe_dump(knob_transforms(knobs, dims))))  # as pasted YAML
    x = torch.rand((4, 1) + (12,) * dims, generator=torch.Generator().manual_seed(0))
    a = BatchedViews(knobs, dims, 12)(x, torch.Generator().manual_seed(3))
    b = BatchedViews(listed, dims, 12)(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    ma, mb = monai_transform(knobs, dims, 12), monai_transform(listed, dims, 12)
    ma.set_random_state(seed=1)
    mb.set_random_state(seed=1)
    assert torch.equal(torch.as_tensor(ma(x[0])), torch.as_tensor(mb(x[0])))


def test_the_default_recipe_agrees_between_engines():
    ref, ours, plan = both_engines(knob_transforms(ViewsConfig(), 2), 2, 16, 400)
    assert "one resampling" in plan.report[0]
    assert (ours.mean(0) - ref.mean(0)).abs().mean() < 0.03
    assert abs(ours.std().item() - ref.std().item()) < 0.02


def test_unknown_target_is_a_one_line_error_with_the_closest_name():
    with pytest.raises(ConfigError) as e:
        BatchedViews(ViewsConfig(transforms=[{"_target_": "RandBiasFeild", "prob": 0.3}]), 2, 16)
    msg = str(e.value)
    assert "\n" not in msg and "RandBiasFeild" in msg and "Did you mean 'RandBiasField'" in msg
    with pytest.raises(ConfigError, match="no argument 'probb'. Did you mean 'prob'"):
        BatchedViews(ViewsConfig(transforms=[{"_target_": "RandBiasField", "probb": 0.3}]), 2, 16)
    with pytest.raises(ConfigError, match=r"views.transforms\[1\]: expected a mapping with a `_target_`"):
        from medcl.config import MedclConfig, apply_overrides

        apply_overrides(MedclConfig(), {"views": {"transforms": [RESIZE, "RandFlip"]}})


def test_other_monai_transforms_run_through_monai_and_are_reported():
    items = [{"_target_": "RandScaleCrop", "roi_scale": 0.6, "random_size": True},
             {"_target_": "Resize", "spatial_size": "@spatial_size"},  # MONAI's default mode (area): not batched
             {"_target_": "RandGibbsNoise", "prob": 1.0, "alpha": [0.3, 0.6]},
             {"_target_": "RandKSpaceSpikeNoise", "prob": 0.5},
             {"_target_": "RandBiasField", "prob": 0.5}]
    bv = BatchedViews(ViewsConfig(transforms=items), 2, 16)
    text = "\n".join(bv.report)
    for it in items:  # nothing is silently dropped: each transform has its engine named
        assert it["_target_"] in text
    assert "RandScaleCrop: MONAI" in text and "Resize: MONAI" in text and "mode=area" in text
    assert "RandGibbsNoise: MONAI" in text and "RandBiasField: batched" in text
    x = torch.rand((6, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    a, b = bv(x, torch.Generator().manual_seed(0)), bv(x, torch.Generator().manual_seed(0))
    assert a.shape == (6, 1, 16, 16) and torch.equal(a, b)  # MONAI's randomness is drawn from the batch's generator
    assert not torch.equal(a, bv(x, torch.Generator().manual_seed(1)))


def test_views_of_the_wrong_size_and_multi_crop_without_a_crop_are_refused():
    with pytest.raises(ConfigError, match="make views of 8x8, but the encoder takes 16x16.*Resize"):
        BatchedViews(ViewsConfig(transforms=[{"_target_": "Resize", "spatial_size": 8, "size_mode": "longest"}]), 2, 16)
    with pytest.raises(ConfigError, match="multi-crop.*RandScaleCrop"):
        BatchedViews(ViewsConfig(transforms=[{"_target_": "RandFlip", "prob": 0.5}]), 2, 8, crop_scale=(0.05, 0.4))
    items = [{"_target_": "RandScaleCrop", "roi_scale": 0.6, "random_size": True}, RESIZE,
             {"_target_": "RandBiasField", "prob": 0.5}]
    local = BatchedViews(ViewsConfig(transforms=items), 2, 8, crop_scale=(0.05, 0.4), in_size=16)  # multi-crop
    assert local(torch.rand(3, 1, 16, 16), torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)
    # a Resize to another size is never skipped as a no-op, with or without a crop before it
    for first in ([], [{"_target_": "RandScaleCrop", "roi_scale": 1.0}]):
        bv = BatchedViews(ViewsConfig(transforms=first + [RESIZE]), 2, 8, in_size=16)
        assert bv(torch.rand(2, 1, 16, 16), torch.Generator()).shape == (2, 1, 8, 8)
    crop = local.plan.stages[0].steps[0]
    assert crop.hi == [pytest.approx(0.4 ** 0.5)] * 2 and crop.lo == [pytest.approx(0.05 ** 0.5)] * 2


def test_medcl_views_writes_a_preview_and_config_show_prints_the_list(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medcl.cli import main
    from medcl.data.synthetic import make_phantoms

    data = tmp_path / "scans"
    make_phantoms(data, n=8, dims=2, size=32)
    recipe = tmp_path / "mri.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"size": 32}, "views": {"transforms": [
        {"_target_": "RandScaleCrop", "roi_scale": 0.6, "random_size": True}, RESIZE,
        {"_target_": "RandBiasField", "prob": 0.5}, {"_target_": "RandGibbsNoise", "prob": 0.5}]}}))
    out = tmp_path / "preview"
    assert main(["views", str(data), "--out", str(out), "--config", str(recipe), "--scans", "3", "--pairs", "2",
                 "--quiet"]) == 0
    from skimage.io import imread

    img = imread(out / "views.png")
    assert img.ndim == 3 and img.shape[0] > 3 * 32 and img.shape[1] > 5 * 32  # 3 rows; original + 4 views
    assert "RandGibbsNoise: MONAI" in (out / "engines.txt").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["views"]["transforms"][2]["_target_"] == "RandBiasField"
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "views/preview" in acc.Tags()["images"]
    assert main(["views", str(data), "--out", str(out), "--config", str(recipe), "--quiet"]) == 2  # no overwrite
    capsys.readouterr()
    assert main(["config", "show", "--dims", "3"]) == 0
    shown = capsys.readouterr().out
    listed = yaml.safe_load(shown[shown.index("views:\n  transforms:"):])["views"]["transforms"]
    assert listed == yaml.safe_load(yaml.safe_dump(knob_transforms(ViewsConfig(), 3)))


@pytest.mark.parametrize("name", ["views_xray", "views_ct", "views_mri", "views_ultrasound", "views_fundus_derm"])
def test_shipped_view_recipes_build_in_2d_and_3d_in_both_engines(name):
    from medcl.config import load_config, views_only

    assert views_only(name)  # they set nothing but views, so the folder's defaults keep deciding the rest
    cfg = load_config(name)
    for dims in (2, 3):
        x = torch.rand((4, 3) + (16,) * dims, generator=torch.Generator().manual_seed(0))
        bv = BatchedViews(cfg.views, dims, 16)
        assert bv(x, torch.Generator().manual_seed(0)).shape == x.shape
        assert monai_transform(cfg.views, dims, 16)(x[0]).shape == x[0].shape
    combined = load_config(["medmnist28", name])  # a pretraining recipe, then the views: later files win
    assert combined.data.size == 28 and combined.views.transforms == cfg.views.transforms
    assert not views_only(["medmnist28", name])
