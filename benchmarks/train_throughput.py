"""Training throughput (images/s) of every network at the default scale's S, and how close
ResNet50's training step comes to the machine's matrix-multiply peak.

    .venv/bin/python benchmarks/train_throughput.py                      # cpu scale: S = 64, batch 32
    .venv/bin/python benchmarks/train_throughput.py --sizes 64 224 --batch 16 --out bench.csv

Median of timed `train_on_batch` steps after warm-up (which includes tracing), all networks in
one process so the numbers compare with each other; single-image forward time; the training FLOPs
per image counted from the layers' shapes (`cellstudy.learning.flops`: 3 x the convolutions', dense layers'
and attention's forward multiply-adds x 2) and the effective GFLOP/s they imply; the fp32 (and
bf16) matmul peak measured in TensorFlow in the same process. This machine's memory is cold after
idling: compare only numbers from the same run.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

from cellstudy.learning import benchmark, flops, models  # noqa: E402
from cellstudy import config
from cellstudy.learning.models.describe import forward_time_ms  # noqa: E402


def main() -> None:
    cpu = config.get_scale("cpu")
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[cpu["image_size"]])
    ap.add_argument("--batch", type=int, default=cpu["batch_size"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--networks", nargs="*", default=list(models.NETWORKS))
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    peak = {dt: flops.matmul_peak_gflops(a.matmul_n, dtype=dt) for dt in ("float32", "bfloat16")}
    for dt, p in peak.items():
        print(f"matmul {a.matmul_n}^3 {dt}: median {p['gflops_median']:.0f} GFLOP/s, best {p['gflops_best']:.0f}",
              flush=True)
    rows = []
    for size in a.sizes:
        for name in a.networks:
            t0 = time.perf_counter()
            r = benchmark.throughput(lambda: models.build(name, size), size=size, batch_size=a.batch,
                                 steps=a.steps, warmup=a.warmup)
            m = models.build(name, size)
            fwd = forward_time_ms(m)
            tf_img = flops.training_flops(m)
            eff = tf_img * r["images_per_s"] / 1e9
            rows.append({"network": name, "size": size, "batch": a.batch,
                         "train_images_per_s": round(r["images_per_s"], 2),
                         "forward_ms_single_image": round(fwd, 2), "params": m.count_params(),
                         "train_gflop_per_image": round(tf_img / 1e9, 3),
                         "effective_gflops": round(eff, 1),
                         "share_of_fp32_matmul_peak": round(eff / peak["float32"]["gflops_median"], 3),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    r50 = df[df["network"] == "resnet50"]
    for r in r50.itertuples():
        print(f"ResNet50 at {r.size} px, batch {r.batch}: {r.train_images_per_s} images/s x "
              f"{r.train_gflop_per_image} GFLOP = {r.effective_gflops} GFLOP/s, "
              f"{r.share_of_fp32_matmul_peak:.0%} of the fp32 matmul peak "
              f"({peak['float32']['gflops_median']:.0f} GFLOP/s; bf16 {peak['bfloat16']['gflops_median']:.0f})")
    if a.out:
        df.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
