"""`hypersort demo` end to end at a reduced size: every artefact exists and is well formed, the commands it
prints work as printed, and a re-run trains a new run beside the first (never over it)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import pytest

from hypersort_ray.runs import RunDir

pytestmark = pytest.mark.slow


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "hypersort_ray.cli", "demo", "--out", str(out), "--cases", "12", "--size", "24",
           "--epochs", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    run = RunDir(summary["run_dir"])
    # progress on stderr without Ray Train's per-report dump; the summary once, on stdout
    assert "Reporting training result" not in proc.stderr
    assert "model_uri" not in proc.stderr and "summary" in proc.stderr
    assert summary["styles"].split(":")[0].isdigit() and "outliers" in summary["styles"]
    assert len(run.sample_losses_csv.read_text().splitlines()) == 13

    # data, latents, checkpoint
    truth = (out / "data" / "truth.csv").read_text().splitlines()
    assert len(truth) == 13
    latents = run.latents_csv.read_text().splitlines()
    assert latents[0].startswith("index,case_id,z0,z1") and len(latents) == 13
    assert run.has_checkpoint()

    # analysis: report parses as HTML, suspicion ranks every case, metrics against truth
    report = Path(summary["report"])
    parser = _Tags()
    parser.feed(report.read_text())
    assert {"html", "table", "img"} <= set(parser.tags)
    suspicion = run.analysis.suspicion_csv.read_text().splitlines()
    header = "index,case_id,suspicion,flagged_by,latent_norm,mean_distance,outlier_score,style"
    assert suspicion[0].startswith(header) and len(suspicion) == 13
    metrics = run.read_metrics()
    assert metrics  # truth given -> metrics written
    assert summary["auroc_latent_norm"] is None or 0.0 <= summary["auroc_latent_norm"] <= 1.0
    assert summary["auroc_suspicion"] is None or 0.0 <= summary["auroc_suspicion"] <= 1.0

    # registered in the workspace store (./mlflow.db where the demo ran) under the champion alias
    from mlflow.tracking import MlflowClient

    assert summary["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    version = client.get_model_version_by_alias("hypersort-demo", "champion")
    assert summary["model_uri"].startswith("models:/hypersort-demo") and int(version.version) >= 1

    # the predict command the demo prints works exactly as printed, from where the user stands
    printed = shlex.split(summary["predict"])
    assert printed[0] == "hypersort" and "models:/hypersort-demo@champion" in printed
    predicted = subprocess.run([sys.executable, "-m", "hypersort_ray.cli", *printed[1:]], capture_output=True,
                               text=True, env=env, timeout=600, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    image = nib.load(printed[printed.index("--image") + 1])
    assert nib.load(tmp_path / "mask.nii.gz").shape == image.shape

    # a re-run reuses the dataset (same files, untouched)
    stamp = (out / "data" / "datalist.tsv").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the synthetic dataset" in proc.stderr
    assert (out / "data" / "datalist.tsv").stat().st_mtime_ns == stamp
    second = json.loads(proc.stdout)
    assert Path(second["run_dir"]) == out / "run-2", "a re-run never trains over the first run"
    assert run.has_checkpoint() and run.read_metrics() == metrics
