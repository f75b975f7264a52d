"""Checkpoint folder format (no Ray) and the latents CSV."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hypersort_ray.config import ExperimentConfig
from hypersort_ray.errors import ModelError, RunError
from hypersort_ray.model.latents import LatentTable
from hypersort_ray.runs import checkpoint as ckpt_mod
from hypersort_ray.runs.checkpoint import (
    checkpoint_files_for_rank,
    latents_file,
    load_checkpoint,
    part_file,
    save_checkpoint,
    write_checkpoint_part,
)
from hypersort_ray.runs.tables import read_latents_csv, write_latents_csv

N, DIM, WORLD = 7, 3, 2


def _config() -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.hypernet.latent_dim = DIM
    cfg.training.epochs = 4
    return cfg


def _hyper() -> tuple[dict, dict]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(DIM, 4), torch.nn.ReLU(), torch.nn.Linear(4, 5))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, DIM)).sum().backward()
    opt.step()
    return net.state_dict(), opt.state_dict()


def _shards(step_seed: int = 0) -> list[LatentTable]:
    """Two workers' tables under the i % W rule, each trained a little."""
    shards = [LatentTable([i for i in range(N) if i % WORLD == w], dim=DIM, seed=1) for w in range(WORLD)]
    gen = torch.Generator().manual_seed(step_seed)
    for shard in shards:
        idx = torch.tensor(shard.indices[:2])
        shard.apply_gradients(idx, torch.randn(len(idx), DIM, generator=gen))
    return shards


CASE_IDS = [f"case_{i:03d}" for i in range(N)]


def _write_two_ranks(folder: Path, shards: list[LatentTable], epoch: int = 2) -> None:
    hyper, optim = _hyper()
    meta = {"epoch": epoch, "global_step": 10 * epoch, "world_size": WORLD, "case_ids": CASE_IDS}
    # Each rank writes into the same folder, as after Ray Train merges the ranks' folders.
    write_checkpoint_part(
        folder, rank=1, latent_state=shards[1], meta={"epoch": epoch, "global_step": 10 * epoch}
    )
    write_checkpoint_part(
        folder,
        rank=0,
        latent_state=shards[0].state_dict(),
        hyper_state=hyper,
        optim_state=optim,
        config=_config(),
        meta={**meta, "metrics": {"loss": 0.5}},
        extra={"torch_rng": torch.get_rng_state()},
    )


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_parts_load_as_one_checkpoint(tmp_path):
    shards = _shards()
    _write_two_ranks(tmp_path / "ck", shards)
    ck = load_checkpoint(tmp_path / "ck")
    hyper, optim = _hyper()
    assert ck.epoch == 2 and ck.global_step == 20 and ck.case_ids == CASE_IDS
    assert ck.config == _config()
    assert _equal_states(ck.hyper_state, hyper)
    assert ck.optim_state["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(ck.optim_state["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])
    assert (
        torch.equal(ck.extra["torch_rng"], torch.get_rng_state())
        or ck.extra["torch_rng"].dtype == torch.uint8
    )
    assert _equal_states(ck.latents, LatentTable.merge(shards).state_dict())
    assert ck.latents["indices"].tolist() == list(range(N))
    assert ck.meta["metrics"] == {"loss": 0.5} and ck.meta["world_size"] == WORLD
    # Re-shard for another world size straight from the checkpoint.
    assert ck.latent_table([i for i in range(N) if i % 3 == 1]).indices == [1, 4]
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert names == set(checkpoint_files_for_rank(0)) | set(checkpoint_files_for_rank(1))


def test_save_and_load_single_process(tmp_path):
    shards = _shards()
    hyper, optim = _hyper()
    path = save_checkpoint(
        tmp_path / "ck",
        latent_state=shards,
        hyper_state=hyper,
        optim_state=optim,
        config=_config(),
        epoch=3,
        global_step=30,
        case_ids=CASE_IDS,
    )
    ck = load_checkpoint(path)
    assert ck.epoch == 3 and ck.meta["world_size"] == 2 and ck.extra is None
    assert _equal_states(ck.latents, LatentTable.merge(shards).state_dict())
    meta = json.loads((path / ckpt_mod.META_FILE).read_text())
    assert meta["format"] == "hypersort-checkpoint" and meta["version"] == 1 and meta["latent_dim"] == DIM
    assert not list(tmp_path.glob(".ck.tmp-*")) and not list(tmp_path.glob(".ck.old-*"))


def _save(path: Path, epoch: int, shards=None) -> Path:
    hyper, optim = _hyper()
    return save_checkpoint(
        path,
        latent_state=shards or _shards(),
        hyper_state=hyper,
        optim_state=optim,
        config=_config(),
        epoch=epoch,
        global_step=epoch * 10,
        case_ids=CASE_IDS,
    )


def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", epoch=1)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    real = ckpt_mod._atomic_write_bytes
    calls = {"n": 0}

    def flaky(target, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(target, data)

    monkeypatch.setattr(ckpt_mod, "_atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="simulated"):
        _save(path, epoch=2, shards=_shards(step_seed=9))
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert load_checkpoint(path).epoch == 1
    assert not list(tmp_path.glob(".ck.tmp-*"))  # the half-written folder was removed
    assert load_checkpoint(_save(path, epoch=2)).epoch == 2  # and the next save replaces it


def test_crash_inside_safetensors_serialisation_is_also_safe(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck", epoch=1)
    import safetensors.torch

    monkeypatch.setattr(
        safetensors.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        _save(path, epoch=2)
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1


def test_interrupted_part_write_in_place_reads_as_incomplete(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    monkeypatch.setattr(ckpt_mod, "_safetensors_bytes", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        _write_two_ranks(folder, _shards(), epoch=3)
    monkeypatch.undo()
    # Rank 1 failed first: its marker is gone, so the mixed folder cannot load as if it were whole.
    with pytest.raises(RunError, match=r"missing part_rank1\.json"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "name", [ckpt_mod.HYPERNET_FILE, "latents_rank1.safetensors", ckpt_mod.HYPER_OPTIM_FILE, ckpt_mod.CONFIG_FILE]
)
def test_corrupted_file_is_named(tmp_path, name):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(RunError, match=rf"{name}: checksum mismatch"):
        load_checkpoint(folder)


def test_truncated_file_is_named(tmp_path):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    data = (folder / "latents_rank0.safetensors").read_bytes()
    (folder / "latents_rank0.safetensors").write_bytes(data[:-10])
    with pytest.raises(RunError, match=r"latents_rank0\.safetensors: checksum mismatch .*truncated"):
        load_checkpoint(folder)


def test_missing_rank_file_names_the_missing_indices(tmp_path):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    (folder / latents_file(1)).unlink()
    with pytest.raises(
        RunError,
        match=r"missing latents_rank1\.safetensors \(rank 1 of 2\); 3 of 7 samples .*\(indices 1, 3, 5\)",
    ):
        load_checkpoint(folder)
    (folder / part_file(1)).unlink()
    with pytest.raises(RunError, match=r"part_rank1\.json.*indices 1, 3, 5"):
        load_checkpoint(folder)


def test_missing_meta_and_missing_listed_file(tmp_path):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    (folder / "hyper_optim.pt").unlink()
    with pytest.raises(RunError, match=r"hyper_optim\.pt: missing"):
        load_checkpoint(folder)
    (folder / ckpt_mod.META_FILE).unlink()
    with pytest.raises(RunError, match=r"meta\.json: missing"):
        load_checkpoint(folder)
    with pytest.raises(RunError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_unknown_format_or_version(tmp_path):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    meta = json.loads((folder / ckpt_mod.META_FILE).read_text())
    (folder / ckpt_mod.META_FILE).write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(RunError, match=r"meta\.json: checkpoint format version 2 is not supported"):
        load_checkpoint(folder)
    (folder / ckpt_mod.META_FILE).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(RunError, match="unknown checkpoint format"):
        load_checkpoint(folder)


def test_duplicated_rows_and_dim_mismatch(tmp_path):
    shards = _shards()
    folder = tmp_path / "dup"
    _write_two_ranks(folder, shards)
    # Rank 1 also (wrongly) owned sample 0.
    both = LatentTable.merge([shards[1], shards[0].shard([0])])
    write_checkpoint_part(folder, rank=1, latent_state=both)
    with pytest.raises(ModelError, match=r"latents_rank1\.safetensors: sample 0 is also in latents_rank0"):
        load_checkpoint(folder)

    folder = tmp_path / "dim"
    _write_two_ranks(folder, shards)
    write_checkpoint_part(folder, rank=1, latent_state=LatentTable([1, 3, 5], dim=DIM + 1))
    with pytest.raises(
        ModelError, match=r"latents_rank1\.safetensors: latent dim 4 but meta\.json says latent_dim=3"
    ):
        load_checkpoint(folder)


def test_parts_from_different_steps_are_refused(tmp_path):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards(), epoch=2)
    write_checkpoint_part(folder, rank=1, latent_state=_shards()[1], meta={"epoch": 1, "global_step": 10})
    with pytest.raises(RunError, match=r"part_rank1\.json: epoch=1 but meta\.json has epoch=2"):
        load_checkpoint(folder)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used to load a checkpoint")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    real_load = torch.load

    def only_weights(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", only_weights)
    ck = load_checkpoint(folder)
    assert ck.optim_state is not None and ck.extra is not None


class _Custom:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


def test_unsafe_objects_are_refused_at_write_time(tmp_path):
    hyper, _ = _hyper()
    with pytest.raises(
        ValueError, match=r"extra\.pt: holds objects that torch\.load\(weights_only=True\) refuses"
    ):
        write_checkpoint_part(
            tmp_path / "ck",
            rank=0,
            latent_state=LatentTable(range(N), dim=DIM),
            hyper_state=hyper,
            config=_config(),
            meta={"epoch": 0, "global_step": 0, "world_size": 1, "case_ids": CASE_IDS},
            extra={"obj": _Custom()},
        )
    with pytest.raises(ValueError, match=r"Unsupported global: GLOBAL numpy"):  # e.g. a numpy scalar metric
        write_checkpoint_part(
            tmp_path / "ck",
            rank=0,
            latent_state=LatentTable(range(N), dim=DIM),
            hyper_state=hyper,
            config=_config(),
            meta={"epoch": 0, "global_step": 0, "world_size": 1, "case_ids": CASE_IDS},
            extra={"history": [{"loss": np.float64(0.5)}]},
        )
    assert not (tmp_path / "ck" / ckpt_mod.META_FILE).exists()


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "my_notes.txt").write_text("precious")
    with pytest.raises(RunError, match="not part of a checkpoint"):
        _save(tmp_path / "out", epoch=1)
    assert (tmp_path / "out" / "my_notes.txt").read_text() == "precious"


def test_interrupted_swap_points_to_the_previous_checkpoint(tmp_path):
    path = _save(tmp_path / "ck", epoch=1)
    path.rename(tmp_path / ".ck.old-abcd1234")  # what a crash between the two renames leaves
    with pytest.raises(RunError, match=r"previous complete checkpoint is .*\.ck\.old-abcd1234"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------- latents.csv
def test_latents_csv_round_trip(tmp_path):
    table = _shards()[0]
    path = tmp_path / "run" / "table.csv"
    idx = torch.tensor(table.indices[::-1])
    write_latents_csv(path, idx, [f"id,{i}" for i in idx.tolist()], table.values(idx))
    lines = path.read_text().splitlines()
    assert lines[0] == "index,case_id,z0,z1,z2" and lines[1].startswith('0,"id,0",')
    indices, case_ids, values = read_latents_csv(path)
    assert indices.tolist() == table.indices and case_ids == [f"id,{i}" for i in table.indices]
    assert values.dtype == np.float64
    assert np.array_equal(values.astype(np.float32), table.values().numpy())  # float32 round-trips exactly
    z64 = np.random.default_rng(0).normal(size=(3, 2))
    write_latents_csv(path, [2, 0, 1], ["c", "a", "b"], z64)
    assert np.array_equal(read_latents_csv(path)[2], z64[[1, 2, 0]])  # float64 round-trips exactly
    assert not list(path.parent.glob(".*tmp-*"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r": empty file"),
        ("idx,case_id,z0\n0,a,1\n", r":1: the header must start with index,case_id"),
        ("index,case_id\n0,a\n", r":1: no latent columns"),
        ("index,case_id,z0,z2\n0,a,1,2\n", r":1: latent column 4 is 'z2', expected 'z1'"),
        ("index,case_id,z0,z1\n0,a,1,2\n1,b,3\n", r":3: 3 fields, the header has 4"),
        ("index,case_id,z0\n0,a,1\nx,b,2\n", r":3: index 'x' is not an integer"),
        ("index,case_id,z0,z1\n0,a,1,oops\n", r":2: z1 = 'oops' is not a number"),
        ("index,case_id,z0\n0,a,1\n1,b,2\n0,c,3\n", r":4: index 0 already appears on line 2"),
    ],
)
def test_bad_latents_csv_is_named_with_line(tmp_path, text, message):
    path = tmp_path / "table.csv"
    path.write_text(text)
    with pytest.raises(RunError, match=rf"table\.csv{message}"):
        read_latents_csv(path)


def test_missing_latents_csv(tmp_path):
    with pytest.raises(RunError, match="latents file not found"):
        read_latents_csv(tmp_path / "table.csv")


def test_invalid_config_is_reported_against_the_checkpoint_file(tmp_path):
    import hashlib

    folder = tmp_path / "ck"
    _write_two_ranks(folder, _shards())
    text = (folder / ckpt_mod.CONFIG_FILE).read_text().replace("training:\n", "training:\n  epohcs: 3\n", 1)
    (folder / ckpt_mod.CONFIG_FILE).write_text(text)
    meta = json.loads((folder / ckpt_mod.META_FILE).read_text())
    meta["files"][ckpt_mod.CONFIG_FILE] = hashlib.sha256(text.encode()).hexdigest()
    (folder / ckpt_mod.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(
        RunError, match=r"config\.yaml: the checkpoint's config is not valid(.|\n)*training\.epohcs"
    ):
        load_checkpoint(folder)
