"""CPU: ``ssf-tasks predict`` of this checkout against another commit's, on one registry and manifest (vit_tiny,
8 tasks, 1,024 JPEG files), two runs each.

Usage: ``python benchmarks/compare_predict_cpu.py COMMIT``."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

here = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(here / "benchmarks"))
from serving import make_registry  # noqa: E402

other = Path(tempfile.mkdtemp()) / "other"
subprocess.run(["git", "-C", str(here), "worktree", "add", "-q", str(other), sys.argv[1]], check=True)
folder = Path(tempfile.gettempdir()) / "ssf_compare_predict"
if not (folder / "manifest.csv").exists():
    make_registry(folder, "vit_tiny_patch16_224", 8, 1024)
url = f"sqlite:///{folder / 'registry.db'}"
rows = []
for label, code in (("this checkout", str(here)), (f"commit {sys.argv[1][:7]}", str(other))):
    env = {**os.environ, "PYTHONPATH": f"{code}:{folder / f'cli_{label[0]}'}"}
    os.makedirs(str(folder / f"cli_{label[0]}"), exist_ok=True)
    link = str(folder / f"cli_{label[0]}" / "ssf_tasks_cli")
    if not os.path.exists(link):
        os.symlink(f"{code}/cli", link)
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from ssf_tasks_cli.main import app; app()",
                "--registry",
                url,
                "predict",
                str(folder / "manifest.csv"),
                "--out",
                str(folder / "p.csv"),
                "--device",
                "cpu",
                "--batch-size",
                "64",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=str(folder),
        )
        seconds = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-500:]
        rows.append(
            {
                "what": f"ssf-tasks predict, {label}, 1024 JPEGs, vit_tiny_patch16_224, 8 tasks, CPU fp32",
                "seconds": round(seconds, 2),
                "img_s": round(1024 / seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(other)], check=True)
