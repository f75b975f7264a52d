"""MONAI preprocessing: geometry, intensity, label mapping, crops, datasets and inference inversion."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import affine_for, blob_label, ct_image, write_case, write_nifti

from hypersort_ray.config import AugmentConfig, IntensityConfig, LabelConfig, PreprocessConfig
from hypersort_ray.data.datalist import Case
from hypersort_ray.data.transforms import (
    MapLabelsd,
    build_dataset,
    build_inference_transforms,
    build_train_transforms,
    collate,
    invert_prediction,
    invert_to_original,
    load_image_for_inference,
)
from hypersort_ray.errors import ConfigError, DataError

ALL_RANGE = IntensityConfig(lower_percentile=0, upper_percentile=100)  # min -> 0, max -> 1: labels stay 0/1


def _pre(**kw) -> PreprocessConfig:
    kw.setdefault("roi_size", [16, 16, 16])
    return PreprocessConfig(**kw)


def _item(img: Path, lab: Path) -> dict:
    return {"image": str(img), "label": str(lab)}


# -------------------------------------------------------------------------------------- geometry
def test_output_spacing_and_lps_reorientation(tmp_path):
    shape = (10, 12, 8)
    label = np.zeros(shape, np.uint8)
    label[1, 2, 3] = 1  # one marked voxel: where does it end up in world coordinates?
    aff = affine_for((1.0, 1.0, 1.0), origin=(5.0, 7.0, -3.0), flip=(0, 1))  # LPS-style
    path = write_nifti(tmp_path / "lps.nii.gz", label.astype(np.float32), aff)
    world = aff @ np.array([1, 2, 3, 1.0])

    pre = _pre(spacing=[1.0, 1.0, 1.0], intensity=IntensityConfig(lower_percentile=0, upper_percentile=100))
    out = build_inference_transforms(pre)({"image": str(path)})["image"]
    new_aff = out.affine.numpy()
    assert np.allclose(np.diag(new_aff)[:3], [1.0, 1.0, 1.0])  # RAS: positive diagonal
    assert np.allclose(new_aff[:3, :3], np.diag([1.0, 1.0, 1.0]))
    vox = np.argwhere(out[0].numpy() > 0.5)
    assert len(vox) == 1 and np.allclose(new_aff @ np.array([*vox[0], 1.0]), world)

    pre2 = _pre(spacing=[2.0, 1.5, 0.5], intensity=ALL_RANGE)
    out2 = build_inference_transforms(pre2)({"image": str(path)})["image"]
    assert np.allclose(out2.pixdim.numpy(), [2.0, 1.5, 0.5])
    assert np.allclose(out2.affine.numpy()[:3, :3], np.diag([2.0, 1.5, 0.5]))


def test_train_item_shapes_and_types(tmp_path):
    img, lab = write_case(tmp_path, "a", shape=(14, 12, 10), affine=affine_for((1.5, 1.0, 2.5), flip=(0, 1)))
    item = build_train_transforms(_pre(spacing=[1.0, 1.0, 1.0]), 2)(_item(img, lab))
    assert type(item["image"]) is torch.Tensor  # plain tensors, no MetaTensor overhead in training
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 16, 16, 16) and item["label"].dtype == torch.float32
    assert set(item["label"].unique().tolist()) == {0.0, 1.0}


def test_keep_file_geometry(tmp_path):
    img, lab = write_case(tmp_path, "a", shape=(20, 18, 16))
    item = build_train_transforms(_pre(orientation=None, spacing=None, roi_size=[8, 8, 8]), 2)(
        _item(img, lab)
    )
    assert item["image"].shape == (1, 8, 8, 8)


# ------------------------------------------------------------------------------------- intensity
def test_intensity_percentiles_and_clip(tmp_path):
    label = blob_label()
    image = np.linspace(-1000, 1000, label.size).reshape(label.shape).astype(np.float32)
    img, lab = write_case(tmp_path, "a", label=label, image=image)
    pre = _pre(spacing=None, orientation=None, roi_size=[12, 12, 12])
    item = build_train_transforms(pre, 2)(_item(img, lab))
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == 1.0
    unclipped = pre.model_copy(
        update={"intensity": IntensityConfig(lower_percentile=10, upper_percentile=90, clip=False)}
    )
    item = build_train_transforms(unclipped, 2)(_item(img, lab))
    assert float(item["image"].min()) < -0.1 and float(item["image"].max()) > 1.1
    # 10th percentile -> 0 and 90th -> 1: about 10 % of voxels on each side are outside [0, 1]
    assert 0.05 < float((item["image"] < 0).float().mean()) < 0.15


# ---------------------------------------------------------------------------------- label mapping
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LabelConfig(), [0, 1, 1, 1, 1]),
        (LabelConfig(foreground=[2, 4]), [0, 0, 1, 0, 1]),
        (LabelConfig(class_map={1: 2, 4: 1}), [0, 2, 0, 0, 1]),
    ],
)
def test_map_labels(config, expected):
    raw = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    out = MapLabelsd(keys="label", config=config)({"label": raw})["label"]
    assert out.tolist() == [expected] and out.dtype == raw.dtype


def test_class_map_through_pipeline_and_num_classes_check(tmp_path):
    label = blob_label(value=5)
    label[label == 0] = 0
    label[:3] = 7  # a second structure
    img, lab = write_case(tmp_path, "a", label=label)
    pre = _pre(spacing=None, label=LabelConfig(class_map={5: 1, 7: 2}), roi_size=[12, 12, 12])
    item = build_train_transforms(pre, 3)(_item(img, lab))
    assert sorted(item["label"].unique().tolist()) == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="3 classes but the model predicts 2"):
        build_train_transforms(pre, 2)


# ------------------------------------------------------------------------------------------ crops
@pytest.mark.parametrize("crop", ["center", "random", "foreground"])
def test_roi_shape_for_each_crop(tmp_path, crop):
    shape = (24, 20, 10)  # one axis smaller than the ROI: padded
    label = blob_label(shape, center=(20, 4, 5), radius=2.5)  # off-centre organ
    img, lab = write_case(tmp_path, "a", shape=shape, label=label)
    pre = _pre(spacing=None, orientation=None, crop=crop, roi_size=[12, 12, 12])
    item = build_train_transforms(pre, 2, seed=0)(_item(img, lab))
    assert item["image"].shape == (1, 12, 12, 12) and item["label"].shape == (1, 12, 12, 12)
    if crop == "foreground":  # the whole organ is in the patch
        assert int(item["label"].sum()) == int(label.sum())


def test_augmentation_is_seeded(tmp_path):
    img, lab = write_case(tmp_path, "a")
    aug = AugmentConfig(enabled=True, flip_prob=0.5, intensity_shift=0.1, intensity_scale=0.1, noise_std=0.05)
    pre = _pre(spacing=None, crop="random", augment=aug, roi_size=[8, 8, 8])
    a = build_train_transforms(pre, 2, seed=3)(_item(img, lab))
    b = build_train_transforms(pre, 2, seed=3)(_item(img, lab))
    c = build_train_transforms(pre, 2, seed=4)(_item(img, lab))
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])


# --------------------------------------------------------------------------------------- datasets
@pytest.fixture
def cases(tmp_path) -> list[Case]:
    out = []
    for i in range(4):
        img, lab = write_case(tmp_path, f"c{i}", label=blob_label(radius=2.0 + i))
        out.append(Case(index=i, case_id=f"c{i}", image=img, label=lab))
    return out


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_dataset_restricted_to_indices(tmp_path, cases, cache):
    pre = _pre(spacing=None, roi_size=[8, 8, 8])
    ds = build_dataset(cases, pre, 2, cache=cache, cache_dir=tmp_path / "cache", indices=[3, 1])
    assert len(ds) == 2
    assert [(ds[i]["index"], ds[i]["case_id"]) for i in range(2)] == [(3, "c3"), (1, "c1")]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [3, 1]
    assert batch["case_id"] == ["c3", "c1"] and batch["image"].shape == (2, 1, 8, 8, 8)
    # The bigger organ of c3 shows in its label: the items are the right cases, not just the right ids.
    assert batch["label"][0].sum() > batch["label"][1].sum()
    if cache == "disk":
        assert any((tmp_path / "cache").rglob("*.pt"))


def test_dataset_rejects_unknown_indices(cases):
    with pytest.raises(DataError, match=r"sample indices \[7\]"):
        build_dataset(cases, _pre(spacing=None), 2, cache="none", indices=[0, 7])
    with pytest.raises(ConfigError, match="cache_dir"):
        build_dataset(cases, _pre(spacing=None), 2, cache="disk")


# -------------------------------------------------------------------------------------- inversion
def _roundtrip(path: Path, pre: PreprocessConfig) -> tuple[np.ndarray, object]:
    """Push a label file through the inference transforms, threshold, invert; return (mask, MetaTensor)."""
    prepared = load_image_for_inference(path, pre)
    pred = (prepared.image > 0.5).to(torch.uint8)  # the "prediction" in processed space
    inverted = invert_prediction(pred, prepared, pre)
    as_array = invert_to_original(pred, prepared, pre)
    assert np.array_equal(as_array, inverted.numpy().astype(np.uint8)) and as_array.dtype == np.uint8
    return as_array, inverted


@pytest.mark.parametrize("degrees", [0, 25])
def test_inversion_exact_with_lps_and_rotated_affine(tmp_path, degrees):
    from scipy.spatial.transform import Rotation

    shape = (14, 12, 10)
    label = blob_label(shape, center=(6, 6, 4), radius=3.5)
    aff = affine_for((1.5, 1.0, 2.5), flip=(0, 1))  # LPS
    aff[:3, :3] = Rotation.from_euler("zx", [degrees, degrees / 2], degrees=True).as_matrix() @ aff[:3, :3]
    path = write_nifti(tmp_path / "lab.nii.gz", label.astype(np.float32), aff)
    pre = _pre(spacing=[1.5, 1.0, 2.5], intensity=ALL_RANGE)  # the file's spacing: no interpolation
    back, meta = _roundtrip(path, pre)
    assert back.shape == (1, *shape)
    assert np.allclose(meta.affine.numpy(), aff, atol=1e-4)
    assert np.array_equal(back[0], label)


def test_inversion_with_sheared_affine(tmp_path):
    # A shear cannot survive Spacingd (it re-orthogonalises the axes), so this resamples: nearly equal.
    shape = (14, 12, 10)
    label = blob_label(shape, center=(6, 6, 4), radius=4)
    aff = affine_for((1.5, 1.0, 2.5), flip=(0, 1))
    aff[:3, :3] = aff[:3, :3] @ np.array([[1, 0.1, 0], [0, 1, 0], [0, 0.05, 1]])
    path = write_nifti(tmp_path / "lab.nii.gz", label.astype(np.float32), aff)
    zooms = [float(z) for z in nib.load(str(path)).header.get_zooms()]
    back, meta = _roundtrip(path, _pre(spacing=zooms, intensity=ALL_RANGE))
    assert back.shape == (1, *shape) and np.allclose(meta.affine.numpy(), aff, atol=1e-4)
    assert np.mean(back[0] == label) > 0.98


@pytest.mark.parametrize("flip", [(), (0, 1)])
def test_inversion_with_anisotropic_resampling(tmp_path, flip):
    shape = (24, 24, 8)
    label = blob_label(shape, center=(12, 11, 4), radius=8.0)
    aff = affine_for((0.8, 0.8, 3.0), flip=flip)
    path = write_nifti(tmp_path / "lab.nii.gz", label.astype(np.float32), aff)
    pre = _pre(spacing=[1.5, 1.5, 1.5], intensity=ALL_RANGE)
    prepared = load_image_for_inference(path, pre)
    assert np.allclose(prepared.image.pixdim.numpy(), 1.5)
    assert prepared.original_shape == shape and np.allclose(prepared.original_affine, aff)
    back, meta = _roundtrip(path, pre)
    assert back.shape == (1, *shape) and np.allclose(meta.affine.numpy(), aff)
    dice = 2 * np.sum(back[0] & label) / (back[0].sum() + label.sum())
    assert dice > 0.9, dice


def test_invert_probabilities_linear(tmp_path):
    label = blob_label((12, 12, 12))
    path = write_nifti(tmp_path / "img.nii.gz", ct_image(label), affine_for((2.0, 2.0, 3.0)))
    pre = _pre(spacing=[1.0, 1.0, 1.0])
    prepared = load_image_for_inference(path, pre)
    fg = prepared.image.float().clamp(0, 1)
    probs = torch.cat([1 - fg, fg]).as_tensor()  # (2, *processed), plain tensor
    back = invert_to_original(probs, prepared, pre)
    assert back.shape == (2, 12, 12, 12) and back.dtype == np.float32
    assert np.allclose(back.sum(0), 1.0, atol=1e-4)
    with pytest.raises(DataError, match="does not match the processed image"):
        invert_to_original(probs[:, :-1], prepared, pre)


def test_array_input_default_and_given_affine():
    label = blob_label((12, 10, 8))
    pre = _pre(spacing=[2.0, 2.0, 2.0], intensity=ALL_RANGE)
    prepared = load_image_for_inference(label.astype(np.float32), pre)  # default affine diag(2, 2, 2)
    assert tuple(prepared.image.shape) == (1, 12, 10, 8)
    assert np.allclose(prepared.original_affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    back = invert_to_original((prepared.image > 0.5).long(), prepared, pre)
    assert back.dtype == np.int64 and np.array_equal(back[0], label)

    aff = affine_for((1.0, 1.0, 4.0), flip=(0,))
    prepared = load_image_for_inference(torch.as_tensor(label[None].astype(np.float32)), pre, affine=aff)
    assert np.allclose(prepared.image.pixdim.numpy(), 2.0)
    back = invert_to_original((prepared.image > 0.5).long(), prepared, pre)
    assert back.shape == (1, 12, 10, 8)
    with pytest.raises(DataError, match="spatial dims"):
        load_image_for_inference(np.zeros((4, 4)), pre)
    with pytest.raises(DataError, match="image file not found"):
        load_image_for_inference("/nonexistent/x.nii.gz", pre)


def test_2d_array_roundtrip_with_flipped_axis(recwarn):
    label = np.zeros((20, 22), np.float32)
    label[5:12, 6:15] = 1
    pre = _pre(roi_size=[16, 16], spacing=[1.0, 1.0], intensity=ALL_RANGE)  # orientation "RAS" -> "RA"
    prepared = load_image_for_inference(label, pre, affine=np.diag([-1.0, 1.0, 1.0]))
    assert prepared.image.affine[0, 0] > 0  # reoriented
    back = invert_to_original((prepared.image > 0.5).long(), prepared, pre)
    assert back.shape == (1, 20, 22) and np.array_equal(back[0], label)
    assert not [w for w in recwarn if "axcodes" in str(w.message)]
