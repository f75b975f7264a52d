"""Datalists (TSV / MSD JSON / folder), case validation and the dataset hash."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import affine_for, blob_label, ct_image, write_case, write_nifti, write_tsv

from hypersort_ray.data.datalist import Case, case_id_from_path, dataset_hash, load_datalist, validate_cases
from hypersort_ray.errors import DataError


@pytest.fixture
def three(tmp_path: Path) -> list[tuple[Path, Path]]:
    return [write_case(tmp_path, f"c{i}") for i in range(3)]


# ---------------------------------------------------------------------------------------- formats
def test_tsv_reference_format(tmp_path, three):
    tsv = write_tsv(tmp_path, three)
    tsv.write_text(tsv.read_text().replace("\n", "\n\n"))  # blank lines are ignored
    cases = load_datalist(tsv)
    assert [c.index for c in cases] == [0, 1, 2]
    assert [c.case_id for c in cases] == ["c0", "c1", "c2"]
    assert all(
        c.image.is_absolute() and c.image == img.resolve() for c, (img, _) in zip(cases, three, strict=True)
    )
    assert cases[1].label == three[1][1].resolve()


@pytest.mark.parametrize("header", ["image\tlabel", "IMG\tSEG", "Label\tImage\tExtra"])
def test_tsv_header_names_are_case_insensitive(tmp_path, three, header):
    swapped = header.lower().startswith("label")
    pairs = [(lab, img) for img, lab in three] if swapped else three
    tsv = write_tsv(tmp_path, pairs, header=header)
    if swapped:  # a third column is allowed and ignored
        tsv.write_text(
            "\n".join(line + ("\tx" if i else "") for i, line in enumerate(tsv.read_text().splitlines()))
        )
    cases = load_datalist(tsv)
    assert [c.image for c in cases] == [img.resolve() for img, _ in three]


def test_tsv_unknown_header_two_columns_and_headerless(tmp_path, three):
    cases = load_datalist(write_tsv(tmp_path, three, header="foo\tbar"))
    assert [c.case_id for c in cases] == ["c0", "c1", "c2"]
    # No header at all: the first line names existing files, so it is the first case.
    cases = load_datalist(write_tsv(tmp_path, three, header=None, name="nohead.tsv"))
    assert [c.case_id for c in cases] == ["c0", "c1", "c2"]


def test_msd_json(tmp_path, three):
    entries = [{"image": f"./images/c{i}.nii.gz", "label": f"./labels/c{i}.nii.gz"} for i in (2, 0, 1)]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "x", "training": entries}))
    cases = load_datalist(path)
    assert [(c.index, c.case_id) for c in cases] == [(0, "c2"), (1, "c0"), (2, "c1")]
    assert cases[0].image == three[2][0].resolve()


def test_msd_folder_with_channel_suffix(tmp_path):
    root = tmp_path / "Task01"
    for name in ("b", "a"):
        write_case(root, name, image_name=f"{name}_0000.nii.gz")
    (root / "images").rename(root / "imagesTr")
    (root / "labels").rename(root / "labelsTr")
    (root / "imagesTr" / "._a_0000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    cases = load_datalist(root)
    assert [(c.index, c.case_id) for c in cases] == [(0, "a"), (1, "b")]
    assert cases[0].image.name == "a_0000.nii.gz" and cases[0].label.name == "a.nii.gz"
    # nnU-Net v2's dataset.json names no files: it stands for its folder.
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    assert load_datalist(root / "dataset.json") == cases


def test_case_id_from_path():
    assert case_id_from_path("/x/liver_3_0000.nii.gz", strip_channel=True) == "liver_3"
    # In a TSV/JSON datalist `case_0000` is a case id (the synthetic benchmark's first case), not a channel.
    assert case_id_from_path("/x/case_0000.nii.gz") == "case_0000"
    assert case_id_from_path("y.nii") == "y"
    assert case_id_from_path("z.NII.GZ") == "z"


# ------------------------------------------------------------------------------------ bad lists
def test_missing_files_are_all_named(tmp_path, three):
    tsv = write_tsv(tmp_path, three)
    three[1][0].unlink()
    three[2][1].unlink()
    with pytest.raises(DataError) as err:
        load_datalist(tsv)
    msg = str(err.value)
    assert "2 problem" in msg
    assert "case c1 (row 1" in msg and str(three[1][0].resolve()) in msg and "image file not found" in msg
    assert "case c2 (row 2" in msg and "label file not found" in msg


def test_duplicate_entry(tmp_path, three):
    tsv = write_tsv(tmp_path, [three[0], three[1], three[0]])
    with pytest.raises(DataError, match=r"case c0 \(row 2.*duplicate entry.*row 0"):
        load_datalist(tsv)


def test_duplicate_case_id(tmp_path, three):
    other = write_case(tmp_path / "other", "c1")
    tsv = write_tsv(tmp_path, [*three, other])
    with pytest.raises(DataError) as err:
        load_datalist(tsv)
    msg = str(err.value)
    assert (
        "duplicate case id 'c1'" in msg
        and str(other[0].resolve()) in msg
        and str(three[1][0].resolve()) in msg
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "datalist is empty"),
        ("   \n\n", "datalist is empty"),
        ("DataPath\tLabelPath\n", "has no cases"),
        ("just-one-column\n", "expected tab-separated"),
        ("a\tb\tc\n1\t2\t3\n", "names no image column"),
        ('{"training": "nope"}', "'training' list"),
        ('{"training": [{"image": 1}]}', r"training\[0\]"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_datalist_files(tmp_path, content, expected):
    path = tmp_path / "list.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as err:
        load_datalist(path)
    assert str(path) in str(err.value)


def test_binary_and_missing_datalist(tmp_path):
    path = tmp_path / "list.tsv"
    path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(DataError, match="not a text file"):
        load_datalist(path)
    with pytest.raises(DataError, match="datalist not found"):
        load_datalist(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="imagesTr/ and labelsTr/"):
        load_datalist(tmp_path)


def test_folder_unpaired(tmp_path):
    write_case(tmp_path, "a")
    write_case(tmp_path, "b")
    (tmp_path / "images").rename(tmp_path / "imagesTr")
    (tmp_path / "labels").rename(tmp_path / "labelsTr")
    (tmp_path / "labelsTr" / "b.nii.gz").rename(tmp_path / "labelsTr" / "c.nii.gz")
    with pytest.raises(DataError) as err:
        load_datalist(tmp_path)
    assert "b.nii.gz: no label b.nii.gz" in str(err.value) and "c.nii.gz: label without an image" in str(
        err.value
    )


# ------------------------------------------------------------------------------------ validation
def test_validate_good_cases(tmp_path, three):
    img4d = write_case(tmp_path, "four", label=blob_label()[..., None])  # 4D with singleton 4th dim is fine
    cases = load_datalist(write_tsv(tmp_path, [*three, img4d]))
    report = validate_cases(cases)
    assert report["ok"] is True and report["n_cases"] == 4
    assert report["shape_min"] == [12, 12, 12] and report["spacing_max"] == [2.0, 2.0, 2.0]
    assert report["label_values"] == [0, 1]


def _case(tmp_path: Path, name: str, **kw) -> Case:
    img, lab = write_case(tmp_path, name, **kw)
    return Case(index=0, case_id=name, image=img, label=lab)


def test_validate_collects_every_problem(tmp_path):
    good = _case(tmp_path, "good")
    lab = blob_label()
    nan_img = ct_image(lab).astype(np.float32)
    nan_img[1, 2, 3] = np.nan
    float_lab = lab.astype(np.float32)
    float_lab[5, 5, 5] = 0.5
    neg_lab = lab.astype(np.int16)
    neg_lab[0, 0, 0] = -1
    bad = {
        "shape": _case(tmp_path, "shape", label=blob_label((12, 12, 11)), image=ct_image(lab)),
        "nan": _case(tmp_path, "nan", image=nan_img),
        "frac": _case(tmp_path, "frac", label=float_lab),
        "neg": _case(tmp_path, "neg", label=neg_lab),
    }
    aff_img, aff_lab = write_case(tmp_path, "affine")
    write_nifti(aff_lab, blob_label(), affine_for(spacing=(2.0, 2.0, 2.5)))
    bad["affine"] = Case(0, "affine", aff_img, aff_lab)
    corrupt_img, corrupt_lab = write_case(tmp_path, "corrupt")
    corrupt_img.write_bytes(corrupt_img.read_bytes()[:-300])  # truncated gzip stream: header reads, data not
    bad["corrupt"] = Case(0, "corrupt", corrupt_img, corrupt_lab)
    text_img, text_lab = write_case(tmp_path, "text")
    text_lab.write_bytes(gzip.compress(b"this is not a NIfTI file"))
    bad["text"] = Case(0, "text", text_img, text_lab)

    cases = [good, *bad.values()]
    cases = [Case(i, c.case_id, c.image, c.label) for i, c in enumerate(cases)]
    with pytest.raises(DataError) as err:
        validate_cases(cases)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{len(bad)} of {len(cases)} cases have problems", err.value
    text = "\n".join(lines)
    expected = {
        "shape": ("labels/shape.nii.gz", "differs from image shape"),
        "nan": ("images/nan.nii.gz", "NaN/inf"),
        "frac": ("labels/frac.nii.gz", "not integers"),
        "neg": ("labels/neg.nii.gz", "negative"),
        "affine": ("labels/affine.nii.gz", "affine differs"),
        "corrupt": ("images/corrupt.nii.gz", "cannot read"),
        "text": ("labels/text.nii.gz", "not a NIfTI file"),
    }
    for i, (name, (file, what)) in enumerate(expected.items(), start=1):
        line = next(x for x in lines if x.startswith(f"case {name} (row {i}): "))
        assert file in line and what in line, line
    assert "case good" not in text


def test_validate_not_nifti_format_and_mixed_dims(tmp_path):
    import nibabel as nib

    mgh = tmp_path / "x.mgz"
    nib.save(nib.MGHImage(blob_label().astype(np.float32), np.eye(4)), str(mgh))
    img, lab = write_case(tmp_path, "c3d")
    with pytest.raises(DataError, match=r"case x \(row 0\): .*x.mgz: is a MGHImage, not a NIfTI"):
        validate_cases([Case(0, "x", mgh, lab)])
    flat = write_case(tmp_path, "flat", label=blob_label((12, 12)), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    cases = [Case(0, "c3d", img, lab), Case(1, "c3d2", img, lab), Case(2, "flat", *flat)]
    with pytest.raises(DataError, match=r"case flat \(row 2\).*2D volume while other cases are 3D"):
        validate_cases(cases)
    assert validate_cases([Case(0, "flat", *flat)])["shape_max"] == [12, 12]  # all 2D is fine


def test_validate_empty():
    with pytest.raises(DataError, match="no cases"):
        validate_cases([])


# ------------------------------------------------------------------------------------------ hash
def test_dataset_hash(tmp_path, three):
    cases = load_datalist(write_tsv(tmp_path, three))
    h = dataset_hash(cases)
    assert len(h) == 64 and h == dataset_hash(cases)
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    shutil.copytree(tmp_path, moved)
    assert dataset_hash(load_datalist(moved / "datalist.tsv")) == h  # location-independent
    assert dataset_hash(list(reversed(cases))) != h
    write_nifti(three[0][1], blob_label(radius=2.5))
    assert dataset_hash(cases) != h
