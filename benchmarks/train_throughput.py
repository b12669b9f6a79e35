"""Training throughput (images/s) of every network, and single-image forward time.

    .venv/bin/python benchmarks/train_throughput.py --sizes 48 224 --batch 16 --out bench.csv

Median of timed `train_on_batch` steps after warm-up (which includes tracing), all networks in
one process so the numbers compare with each other. This machine's memory is cold after idling:
compare only numbers from the same run.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

from cellstudy import models, train  # noqa: E402
from cellstudy.models.describe import forward_time_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 224])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--networks", nargs="*", default=list(models.NETWORKS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for size in a.sizes:
        for name in a.networks:
            t0 = time.perf_counter()
            r = train.throughput(lambda: models.build(name, size), size=size, batch_size=a.batch,
                                 steps=a.steps, warmup=a.warmup)
            m = models.build(name, size)
            fwd = forward_time_ms(m)
            rows.append({"network": name, "size": size, "batch": a.batch,
                         "train_images_per_s": round(r["images_per_s"], 2),
                         "forward_ms_single_image": round(fwd, 2), "params": m.count_params(),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    if a.out:
        df.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
