"""Peak memory of ``hgad predict`` on one image, for ordinary and hostile image shapes (issue 14).

Each case runs ``python -m hgad predict RUN IMAGE`` as a process of its own and reads that process's
peak resident set size (``ru_maxrss`` of the waited child), so the number is the whole command's:
imports, model, decoding, preprocessing, backbone, flows, maps and outputs. The images are written to a
temporary folder: a normal 256×256 photo crop, a 4000×3000 photo, a 1×20000 strip (70 KB as PNG,
which hgad 0.1 turned into a 6.5 GB tensor) and a 20000×1 column.

    python benchmarks/predict_memory.py --run runs/demo --out benchmarks/results/predict_memory-cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import finish, machine_info, markdown_table

HERE = Path(__file__).resolve().parent


def _images(folder: Path) -> dict[str, Path]:
    from skimage import data as skdata

    photo = Image.fromarray(skdata.coffee())
    rng = np.random.default_rng(0)
    cases = {
        "256x256 photo crop": photo.crop((100, 50, 356, 306)),
        "4000x3000 photo": photo.resize((4000, 3000), Image.Resampling.BILINEAR),
        "1x20000 strip": Image.fromarray(rng.integers(0, 256, (1, 20000, 3), dtype=np.uint8)),
        "20000x1 column": Image.fromarray(rng.integers(0, 256, (20000, 1, 3), dtype=np.uint8)),
    }
    paths = {}
    for i, (name, image) in enumerate(cases.items()):
        paths[name] = folder / f"case{i}.png"
        image.save(paths[name])
    return paths


def _peak_of(cmd: list[str]) -> tuple[int, float, float]:
    """Exit code, peak RSS (MiB) and wall seconds of a child process run alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="trained run folder (e.g. runs/demo from make demo)")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _images(Path(tmp)).items():
            out = Path(tmp) / f"pred-{path.stem}"
            cmd = [sys.executable, "-m", "hgad", "predict", str(args.run), str(path), "--out", str(out),
                   "--no-progress", "--device", "cpu"]
            rc, peak, secs = _peak_of(cmd)
            size = Image.open(path).size
            rows.append({"image": name, "file_kb": round(path.stat().st_size / 1024, 1),
                         "pixels": size[0] * size[1], "exit_code": rc, "peak_rss_mib": round(peak, 1),
                         "seconds": round(secs, 2)})
            print(f"{name}: exit {rc}, peak RSS {peak:.0f} MiB, {secs:.1f} s", flush=True)
    payload = {"machine": machine_info(["cpu"]), "run": str(args.run), "rows": rows,
               "peak_rss_max_mib": max(r["peak_rss_mib"] for r in rows)}
    table = markdown_table(rows, ["image", "file_kb", "pixels", "exit_code", "peak_rss_mib", "seconds"])
    finish(payload, table, args.out, notes=[f"largest peak RSS {payload['peak_rss_max_mib']:.0f} MiB "
                                            f"(target: at most 2048 MiB at the default preset)"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
