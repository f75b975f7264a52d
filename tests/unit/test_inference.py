"""Inference on a tiny random model: geometry, styles, the UNet cache, bad inputs, CLI glue, pyfunc inputs.

The model (tests/helpers_model.py) is random, so masks are meaningless but deterministic: the tests check
geometry and plumbing, and that different inputs/styles really reach the network.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers_model import make_tiny_run, tiny_image

from hypersort_ray.errors import ModelError, ProvenanceError
from hypersort_ray.inference import HyperSortModel, Style, load_model, parse_latent, predict_cli
from hypersort_ray.runs import RunDir
from hypersort_ray.runs.layout import STYLES_FILE
from hypersort_ray.runs.model_dir import MODEL_FORMAT, read_model_files, write_model_dir

pytestmark = pytest.mark.filterwarnings("ignore:transform info of:UserWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("inference"), latent_dim=2, with_styles=True)


@pytest.fixture(scope="module")
def model(run_dir) -> HyperSortModel:
    return load_model(run_dir)


def _phantom(shape=(20, 18, 14), seed=0) -> np.ndarray:
    """A bright ellipsoid in noise, off-centre so flips change it."""
    grid = np.indices(shape, dtype=np.float32)
    centre = [0.4 * s for s in shape]
    inside = sum(((g - c) / (0.25 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True)) < 1
    return (100.0 * inside + np.random.default_rng(seed).normal(0, 10, shape)).astype(np.float32)


def _affine(spacing=(1.5, 2.5, 3.0), origin=(-10.0, 5.0, 20.0), flip=(), rotate_deg=0.0) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    for axis in flip:
        aff[axis, axis] *= -1
    if rotate_deg:
        t = np.deg2rad(rotate_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = origin
    return aff


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ----------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "spacing,flip,rotate",
    [((2.0, 2.0, 2.0), (), 0.0), ((1.5, 2.5, 3.0), (0, 1), 0.0), ((1.2, 1.7, 3.5), (2,), 25.0)],
    ids=["ras-iso", "lps-aniso", "oblique-aniso"],
)
def test_mask_has_input_geometry(model, tmp_path, spacing, flip, rotate):
    affine = _affine(spacing, flip=flip, rotate_deg=rotate)
    src = _save(tmp_path / "in.nii.gz", _phantom(), affine)
    result = model.predict_file(src, tmp_path / "mask.nii.gz")

    out = nib.load(tmp_path / "mask.nii.gz")
    assert out.shape == (20, 18, 14)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(out.dataobj), result["mask"])
    assert set(np.unique(result["mask"])) <= {0, 1}


def test_orientation_is_undone_exactly(model, tmp_path):
    """The same physical image stored RAS and LAS (axis 0 flipped) gives the same mask, flipped back."""
    data, ras = _phantom(), _affine((1.5, 2.5, 3.0))
    las = ras.copy()
    las[0, 0] = -ras[0, 0]
    las[0, 3] = ras[0, 3] + ras[0, 0] * (data.shape[0] - 1)
    a = model.predict(_save(tmp_path / "ras.nii.gz", data, ras))["mask"]
    b = model.predict(_save(tmp_path / "las.nii.gz", data[::-1].copy(), las))["mask"]
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a, a[::-1]), "the phantom must not be symmetric, else the check is void"


def test_array_input_uses_given_affine_and_file_matches(model, tmp_path):
    data, affine = _phantom(), _affine((1.5, 2.5, 3.0), flip=(0,))
    from_array = model.predict(data, affine=affine)
    from_file = model.predict(_save(tmp_path / "x.nii.gz", data, affine))
    np.testing.assert_array_equal(from_array["mask"], from_file["mask"])
    np.testing.assert_allclose(from_array["affine"], affine)
    flat = model.predict(data, affine=list(affine.reshape(-1)))  # flat, row-major: the pyfunc form
    np.testing.assert_array_equal(flat["mask"], from_array["mask"])


def test_channel_last_singleton_nifti_is_accepted(model, tmp_path):
    data, affine = _phantom(), _affine()
    four_d = model.predict(_save(tmp_path / "x4.nii.gz", data[..., None], affine))["mask"]
    np.testing.assert_array_equal(four_d, model.predict(data, affine=affine)["mask"])


def test_probabilities_sum_to_one_and_give_the_mask(model, tmp_path):
    src = _save(tmp_path / "in.nii.gz", _phantom(), _affine((1.2, 1.7, 3.5), flip=(2,), rotate_deg=25.0))
    result = model.predict_file(src, tmp_path / "m.nii.gz", probabilities=True)
    probs = result["probabilities"]
    assert probs.shape == (2, 20, 18, 14) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    np.testing.assert_array_equal(np.argmax(probs, axis=0), result["mask"])
    saved = nib.load(result["probabilities_path"])
    assert saved.shape == (20, 18, 14, 2)
    np.testing.assert_allclose(saved.affine, nib.load(src).affine, atol=1e-5)


# ------------------------------------------------------------------------------------------- styles
def test_styles_resolve(model):
    assert [s.id for s in model.styles] == ["main", "1", "2"]
    assert model.style("main").latent == (0.0, 0.0)
    assert model.style("0") is model.style("main"), "the main cluster's own id names the main style"
    assert model.style("main").size == 4
    assert model.resolve("1") == ((1.5, -1.0), "1")
    assert model.resolve(None, None) == ((0.0, 0.0), "main")
    assert model.resolve(None, "0.25, -0.5") == ((0.25, -0.5), "latent")
    assert model.resolve(None, [0.25, -0.5]) == ((0.25, -0.5), "latent")
    assert isinstance(model.styles[1], Style)


def test_styles_give_different_networks(model, run_dir):
    src = tiny_image(run_dir)
    probs = {s.id: model.predict(src, style=s.id, probabilities=True)["probabilities"] for s in model.styles}
    assert not np.allclose(probs["main"], probs["1"])
    assert not np.allclose(probs["1"], probs["2"])
    explicit = model.predict(src, latent=list(model.style("1").latent), probabilities=True)["probabilities"]
    np.testing.assert_array_equal(explicit, probs["1"])


def test_run_without_styles_has_main_only(tmp_path):
    m = load_model(make_tiny_run(tmp_path, latent_dim=3, with_styles=False))
    assert [s.id for s in m.styles] == ["main"]
    assert m.style("main").latent == (0.0, 0.0, 0.0)


# -------------------------------------------------------------------------------------------- cache
def test_unet_cache_hits_misses_and_bound(run_dir):
    m = load_model(run_dir, cache_size=2)
    a, b, c = (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)
    net_a = m.unet_for(a)
    assert m.unet_for(a) is net_a
    assert m.cache_info() == {"hits": 1, "misses": 1, "size": 1, "maxsize": 2}
    m.unet_for(b)
    m.unet_for(c)  # evicts a (least recently used)
    assert m.cache_info() == {"hits": 1, "misses": 3, "size": 2, "maxsize": 2}
    assert m.unet_for(a) is not net_a
    assert m.cache_info()["misses"] == 4 and m.cache_info()["size"] == 2
    m.unet_for(c)  # still cached (b was evicted by a)
    assert m.cache_info()["hits"] == 2


def test_unet_cache_disabled_and_predict_uses_it(run_dir):
    m = load_model(run_dir, cache_size=0)
    m.unet_for((0.0, 0.0))
    m.unet_for((0.0, 0.0))
    assert m.cache_info() == {"hits": 0, "misses": 2, "size": 0, "maxsize": 0}

    m = load_model(run_dir, cache_size=4)
    image = tiny_image(run_dir)
    m.predict(image, style="1")
    m.predict(image, style="1")
    m.predict(image, latent=[1.5, -1.0])  # the same latent as style 1: same cache entry
    assert m.cache_info() == {"hits": 2, "misses": 1, "size": 1, "maxsize": 4}


def test_unet_cache_generates_once_under_concurrency(run_dir):
    m = load_model(run_dir)
    nets = []
    threads = [threading.Thread(target=lambda: nets.append(m.unet_for((0.5, 0.5)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(n) for n in nets}) == 1
    assert m.cache_info()["misses"] == 1 and m.cache_info()["hits"] == 7


# --------------------------------------------------------------------------------------- bad inputs
def test_unknown_style(model):
    with pytest.raises(ModelError, match=r"unknown style '7'.*main, 1, 2"):
        model.predict(np.zeros((16, 16, 16), np.float32), style="7")


@pytest.mark.parametrize(
    "latent,match",
    [("0.1,0.2,0.3", "3 values but the model's latent_dim is 2"), ([0.1], "1 values"),
     ("0.1,abc", "comma-separated numbers"), ([0.1, float("nan")], "NaN or inf"), ("inf,0", "NaN or inf")],
)
def test_bad_latent(model, latent, match):
    with pytest.raises(ModelError, match=match):
        model.predict(np.zeros((16, 16, 16), np.float32), latent=latent)


def test_style_and_latent_together(model):
    with pytest.raises(ModelError, match="either a style or a latent"):
        model.resolve("1", "0,0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(model, tmp_path, bad):
    data = _phantom()
    data[3, 4, 5] = bad
    with pytest.raises(ModelError, match="1 NaN or inf voxel"):
        model.predict(data)
    path = _save(tmp_path / "bad.nii.gz", data, _affine())
    with pytest.raises(ModelError, match=rf"image {path}: contains 1 NaN or inf"):
        model.predict(path)


def test_intensities_that_overflow_the_normalisation_are_refused(model, tmp_path):
    """±3e38 is finite but (x - p0.5) / (p99.5 - p0.5) overflows float32: NaN, then an all-background
    "answer". It is refused with the reason instead (the endpoint answers 422)."""
    data = np.where(_phantom() > 0.5, 3e38, -3e38).astype(np.float32)
    with pytest.raises(ModelError, match="overflow float32"):
        model.predict(data)
    path = _save(tmp_path / "huge.nii.gz", data, _affine())
    with pytest.raises(ModelError, match="overflow float32"):
        model.predict(path)


def test_a_broken_qform_is_named_with_its_file_before_inference(model, tmp_path):
    import struct

    img = nib.Nifti1Image(_phantom(), _affine())
    img.set_qform(_affine(), code=1)
    img.set_sform(_affine(), code=2)
    raw = bytearray(img.to_bytes())
    struct.pack_into("<f", raw, 256, float("nan"))  # quatern_b: the qform only (the sform is the best affine)
    path = tmp_path / "broken_qform.nii"
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=rf"image {path}: the qform contains NaN or inf"):
        model.predict(path)


def test_2d_image_for_3d_model(model, tmp_path):
    with pytest.raises(ModelError, match=r"shape \(20, 18\).*3D volumes"):
        model.predict(np.ones((20, 18), np.float32))
    with pytest.raises(ModelError, match=r"shape \(20, 18, 1\).*3D volumes"):
        model.predict(_save(tmp_path / "slice.nii.gz", np.ones((20, 18, 1), np.float32), _affine()))
    with pytest.raises(ModelError, match=r"spatial axis of size 1"):
        model.predict(np.ones((20, 1, 18), np.float32))
    with pytest.raises(ModelError, match=r"shape \(20, 18, 14, 3\)"):
        model.predict(_save(tmp_path / "rgb.nii.gz", np.ones((20, 18, 14, 3), np.float32), _affine()))


def test_bad_image_files_and_affines(model, tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        model.predict(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(ModelError, match="not a readable NIfTI"):
        model.predict(junk)
    with pytest.raises(ModelError, match="singular"):
        model.predict(_phantom(), affine=np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ModelError, match=r"affine of <array>: shape \(3, 3\)"):
        model.predict(_phantom(), affine=np.eye(3))
    with pytest.raises(ModelError, match="not numeric"):
        model.predict(np.array([["a"]]))


def test_model_not_found(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="no such run folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a hypersort run folder"):
        load_model(tmp_path / "empty")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="MLFLOW_TRACKING_URI"):
        load_model("models:/nope@champion")
    assert not (tmp_path / "mlflow.db").exists(), "no empty store may be created as a side effect"


def test_corrupt_weights_are_refused(run_dir, tmp_path):
    folder = write_model_dir(run_dir, tmp_path / "model")
    weights = Path(read_model_files(folder).where)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="checksum"):
        load_model(folder)


def test_styles_of_another_checkpoint_are_refused(tmp_path):
    """Styles fitted on one checkpoint's latents never pair silently with another hyper-network."""
    first = RunDir(make_tiny_run(tmp_path, name="first", seed=1))
    second = RunDir(make_tiny_run(tmp_path, name="second", seed=2))
    second.analysis.styles_json.write_bytes(first.analysis.styles_json.read_bytes())
    with pytest.raises(ProvenanceError, match="re-run `hypersort analyze"):
        load_model(second.path)
    with pytest.raises(ProvenanceError):
        write_model_dir(second.path, tmp_path / "model")
    folder = write_model_dir(first.path, tmp_path / "model_first")
    styles = folder / STYLES_FILE
    doc = json.loads(styles.read_text())
    doc["checkpoint_sha256"] = second.checkpoint_sha256()
    styles.write_text(json.dumps(doc))
    with pytest.raises(ModelError):  # the model folder's manifest no longer vouches for the file
        load_model(folder)


def test_parse_latent():
    assert parse_latent("[0.5, -1]", 2) == (0.5, -1.0)
    assert parse_latent(np.array([1, 2]), 2) == (1.0, 2.0)


# ------------------------------------------------------------------------------------- model folder
def test_model_dir_round_trip(run_dir, model, tmp_path):
    folder = write_model_dir(run_dir, tmp_path / "model")
    files = read_model_files(folder)
    assert files.info["checkpoint_sha256"] == RunDir(run_dir).checkpoint_sha256()
    assert files.config.model.hypernet.latent_dim == 2 and files.config.preprocessing.roi_size == [16, 16, 16]
    assert files.styles is not None and files.styles["checkpoint_sha256"] == files.info["checkpoint_sha256"]
    assert "members" not in json.dumps(files.styles) and "case_" not in json.dumps(files.styles), "no case ids"
    everything = "".join(p.read_text(errors="ignore") for p in folder.iterdir())
    assert str(run_dir) not in everything, "no training-machine paths in a model folder"
    assert MODEL_FORMAT in everything
    loaded = load_model(folder)
    assert [s.to_dict() for s in loaded.styles] == [s.to_dict() for s in model.styles]
    image = tiny_image(run_dir)
    for s in ("main", "2"):
        np.testing.assert_array_equal(loaded.predict(image, style=s)["mask"], model.predict(image, style=s)["mask"])


# ----------------------------------------------------------------------------------------- CLI glue
def test_predict_cli_single(run_dir, tmp_path):
    image = tiny_image(run_dir)
    summary = predict_cli(str(run_dir), image=image, out=tmp_path / "m.nii.gz", style="2")
    assert summary["style"] == "2" and summary["latent"] == [-1.5, 1.0]
    mask = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    assert summary["foreground_voxels"] == int((mask > 0).sum())
    with pytest.raises(ModelError, match="must end with .nii.gz or .nii"):
        predict_cli(str(run_dir), image=image, out=tmp_path / "m.png")


def test_all_styles_writes_one_file_per_style(run_dir, model, tmp_path):
    image = tiny_image(run_dir)
    summary = predict_cli(str(run_dir), image=image, out=tmp_path / "masks", all_styles=True, probabilities=True)
    stem = image.name[: -len(".nii.gz")]
    expected = {s: tmp_path / "masks" / f"{stem}_style-{s}.nii.gz" for s in ("main", "1", "2")}
    assert summary["masks"] == {k: str(v) for k, v in expected.items()}
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(
        [p.name for p in expected.values()] + [p.name.replace(".nii.gz", "_probs.nii.gz") for p in expected.values()]
    )
    src = nib.load(image)
    for style, path in expected.items():
        out = nib.load(path)
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine)
        np.testing.assert_array_equal(np.asarray(out.dataobj), model.predict(image, style=style)["mask"])
    with pytest.raises(ModelError, match="cannot be combined"):
        predict_cli(str(run_dir), image=image, out=tmp_path / "x", all_styles=True, style="1")
    with pytest.raises(ModelError, match="--out is a folder"):
        predict_cli(str(run_dir), image=image, out=tmp_path / "x.nii.gz", all_styles=True)


# --------------------------------------------------------------------------------- pyfunc (no MLflow run)
@pytest.fixture(scope="module")
def pyfunc(model):
    from hypersort_ray.tracking.pyfunc import HyperSortPyfunc

    wrapper = HyperSortPyfunc()
    wrapper.model = model
    return wrapper


def _defaults(**kw):
    """The params MLflow hands over: every declared param, defaults filled in."""
    return {"style": "main", "latent": [], "affine": [], "probabilities": False, **kw}


def test_pyfunc_input_forms_agree(pyfunc, model, run_dir, tmp_path):
    import pandas as pd

    image = tiny_image(run_dir)
    img = nib.load(image)
    expected = model.predict(image, style="1")["mask"]
    volume = np.asarray(img.dataobj, dtype=np.float64)  # float64, as nibabel's get_fdata gives it
    flat = img.affine.reshape(-1).tolist()
    same = [
        pyfunc.predict(None, volume, _defaults(style="1", affine=flat)),
        pyfunc.predict(None, {"image": volume.tolist(), "affine": img.affine.tolist()}, _defaults(style="1")),
        pyfunc.predict(None, str(image), _defaults(style="1")),
        pyfunc.predict(None, {"image": str(image)}, _defaults(style="1")),
        pyfunc.predict(None, volume, _defaults(latent=[1.5, -1.0], affine=flat)),
        pyfunc.predict(None, volume, {"style": "1", "affine": flat}),
    ]
    for out in same:
        np.testing.assert_array_equal(out, expected)
    batch = pyfunc.predict(None, pd.DataFrame({"path": [str(image), str(tiny_image(run_dir, 1))]}), _defaults(style="1"))
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[0], expected)
    np.testing.assert_array_equal(batch[1], model.predict(tiny_image(run_dir, 1), style="1")["mask"])
    probs = pyfunc.predict(None, str(image), _defaults(probabilities=True))
    assert probs.shape == (2, *img.shape)


@pytest.mark.parametrize(
    "model_input,params,match",
    [
        ("IMAGE", {"styel": "1"}, r"unknown inference params \['styel'\]"),
        ("IMAGE", _defaults(style="1", latent=[0.1, 0.2]), "either param style"),
        ("IMAGE", _defaults(style="9"), "unknown style '9'"),
        ("IMAGE", _defaults(latent=[0.1, 0.2, 0.3]), "latent_dim is 2"),
        ("IMAGE", _defaults(probabilities="yes"), "probabilities"),
        ({"volume": [1]}, _defaults(), "expected keys 'image'"),
        ({"path": 3}, _defaults(), "expected NIfTI paths"),
        (np.zeros((16, 16, 16)), _defaults(affine=[1.0, 2.0]), r"affine of <array>: shape \(2,\)"),
        (np.full((16, 16, 16), np.nan), _defaults(), "NaN or inf"),
    ],
)
def test_pyfunc_bad_inputs(pyfunc, run_dir, model_input, params, match):
    import pandas as pd

    if isinstance(model_input, str) and model_input == "IMAGE":
        model_input = str(tiny_image(run_dir))
    with pytest.raises(ModelError, match=match):
        pyfunc.predict(None, model_input, params)
    with pytest.raises(ModelError, match="'path' column"):
        pyfunc.predict(None, pd.DataFrame({"x": [1]}), _defaults())


# ---------------------------------------------------------------------------------------- 2D models
def test_2d_model_arrays_and_single_slice_nifti(tmp_path):
    import torch

    from hypersort_ray.config import load_config
    from hypersort_ray.model.hypernet import HyperNetwork
    from hypersort_ray.model.latents import LatentTable
    from hypersort_ray.model.unet import build_primary
    from hypersort_ray.runs.checkpoint import save_checkpoint

    cfg = load_config(None, ["preprocessing.roi_size=[16,16]", "preprocessing.spacing=[2.0,2.0]",
                             "model.unet.spatial_dims=2", "model.unet.channels=4", "model.unet.n_down=1",
                             "model.unet.n_fix=1", "model.hypernet.hidden=[8]"])
    torch.manual_seed(0)
    hyper = HyperNetwork(build_primary(cfg.model.unet), 2, [8], 5.0)
    save_checkpoint(RunDir(tmp_path / "run2d").checkpoint_dir, latent_state=LatentTable(range(2), 2),
                    hyper_state=hyper.state_dict(), config=cfg, epoch=1, global_step=1, case_ids=["a", "b"])
    m = load_model(tmp_path / "run2d")
    image = _phantom((20, 22, 1))[..., 0]
    in_plane = np.diag([1.5, 2.5, 1.0])
    from_array = m.predict(image, affine=in_plane)
    assert from_array["mask"].shape == (20, 22)

    affine = np.diag([1.5, 2.5, 3.0, 1.0])
    src = _save(tmp_path / "slice.nii.gz", image[..., None], affine)
    m.predict_file(src, tmp_path / "mask.nii.gz")
    out = nib.load(tmp_path / "mask.nii.gz")
    assert out.shape == (20, 22, 1), "a single-slice file keeps its slice axis"
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj)[..., 0], from_array["mask"])
    with pytest.raises(ModelError, match=r"shape \(20, 22, 14\).*2D volumes"):
        m.predict(np.ones((20, 22, 14), np.float32))


# ---------------------------------------------------------------------------------------- typer CLI
def test_cli_predict_and_export_flags(run_dir, tmp_path):
    from typer.testing import CliRunner

    from hypersort_ray.cli import app

    runner = CliRunner()
    image = tiny_image(run_dir)
    ok = runner.invoke(app, ["predict", "--model", str(run_dir), "--image", str(image), "--out",
                             str(tmp_path / "m.nii.gz"), "--latent", "-1.5,1.0", "--probabilities", "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["latent"] == [-1.5, 1.0] and Path(summary["probabilities"]).is_file()
    bad = runner.invoke(app, ["predict", "--model", str(run_dir), "--image", str(image), "--out",
                              str(tmp_path / "x.nii.gz"), "--style", "7"])
    assert isinstance(bad.exception, ModelError) and "unknown style '7'" in str(bad.exception)
    exported = runner.invoke(app, ["export", "--model", str(run_dir), "--style", "2", "--format", "state_dict",
                                   "--out", str(tmp_path / "u.safetensors"), "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["style"] == "2"


def test_predict_serve_and_register_refuse_styles_of_another_checkpoint(tmp_path):
    """The three consumers of a run's styles refuse a styles.json fitted on another checkpoint, before
    doing any work (serve: before Ray starts; register: before anything reaches the registry)."""
    from typer.testing import CliRunner

    from hypersort_ray.cli import app
    from hypersort_ray.config import ServeSettings
    from hypersort_ray.serve.app import run_server
    from hypersort_ray.tracking.registry import register_run

    first = RunDir(make_tiny_run(tmp_path, name="a", seed=1))
    second = RunDir(make_tiny_run(tmp_path, name="b", seed=2))
    second.analysis.styles_json.write_bytes(first.analysis.styles_json.read_bytes())
    result = CliRunner().invoke(app, ["predict", "--model", str(second.path), "--image", str(tiny_image(second.path)),
                                      "--out", str(tmp_path / "m.nii.gz")])
    assert isinstance(result.exception, ProvenanceError) and not (tmp_path / "m.nii.gz").exists()
    with pytest.raises(ProvenanceError):
        run_server(ServeSettings(model=str(second.path)), block=False)
    import ray

    assert not ray.is_initialized(), "refused before Ray started"
    with pytest.raises(ProvenanceError):
        register_run(second.path, "x", tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists()


def test_lone_windows_as_a_pair_give_the_same_segmentation(model):
    """A volume that fits one window, run as a batch of two copies (the CPU fast path), segments the same."""
    image = _phantom((16, 16, 16))
    prepared = model.prepare(image, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    latent = model.resolve("2")[0]
    model.pad_single_windows = False
    plain = model.predict_prepared(prepared, latent, probabilities=True)
    model.pad_single_windows = True
    try:
        paired = model.predict_prepared(prepared, latent, probabilities=True)
    finally:
        model.pad_single_windows = False
    np.testing.assert_allclose(paired["probabilities"], plain["probabilities"], atol=1e-3)
    np.testing.assert_array_equal(paired["mask"], plain["mask"])
    assert isinstance(model.calibrate_single_window(repeats=1), bool)
