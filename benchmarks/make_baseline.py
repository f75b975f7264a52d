"""Export the package at an older commit as an importable baseline for ``serve.py --baseline``.

``git archive REV hypersort_ray`` is unpacked into OUT and renamed ``old_hs`` (every ``hypersort_ray``
import rewritten), so the old and the current package live side by side in one process and one Ray
instance. Its config models ignore keys they do not know (a run written by today's code carries newer
ones), and ``OUT/old_wrap.py`` builds the old Serve app from today's ``ServeSettings``, keeping only the
fields the old settings know.

Usage::

    python benchmarks/make_baseline.py 182d31f /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/serve.py --sizes 64 128 --cache-sizes 32 \\
        --baseline old_wrap:build_application
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SHIM = '''"""Build the baseline endpoint (old_hs) from today's ServeSettings (written by make_baseline.py)."""
from old_hs.config import ServeSettings as OldSettings
from old_hs.serve.app import build_application as _old_build


def build_application(settings):
    known = set(OldSettings.model_fields)
    return _old_build(OldSettings(**{k: v for k, v in settings.model_dump().items() if k in known}))
'''


def export(rev: str, out: Path, repo: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "hypersort_ray"], check=True,
                             capture_output=True).stdout
    target = out / "old_hs"
    if target.exists():
        shutil.rmtree(target)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    (out / "hypersort_ray").rename(target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\bhypersort_ray\b", "old_hs", path.read_text()))
    config = target / "config.py"
    text = config.read_text()
    if 'extra="forbid"' not in text:
        raise SystemExit(f"{config}: no extra=\"forbid\" to relax; adapt make_baseline.py to this revision")
    config.write_text(text.replace('extra="forbid"', 'extra="ignore"'))
    (out / "old_wrap.py").write_text(SHIM)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="git revision whose hypersort_ray becomes the baseline")
    parser.add_argument("out", type=Path, help="folder to put on PYTHONPATH")
    args = parser.parse_args()
    target = export(args.rev, args.out, Path(__file__).resolve().parents[1])
    print(f"{target} (import old_wrap:build_application with PYTHONPATH={args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
