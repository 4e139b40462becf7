"""Rewrites a prepared TFDS dataset with each split spread over N record files.

Why: file-sharded input (each worker of a multi-worker run reads its own
record files) needs a split with at least as many files as workers, and the
committed quick-start sample has one file per split. Tests and
`benchmarks/input_sharding.py` use this to get a multi-file copy of it, the
shape ImageNet has (1,024 training files).

How: the serialized records are copied byte for byte, in order, into N
files of consecutive records (sizes differ by at most one), named by TFDS's
scheme (`<name>-<split>.tfrecord-0000i-of-0000N`); dataset_info.json's shard
lengths (and num_bytes, which TFDS uses for percent slicing) describe the new
files; every other file of the version directory is copied unchanged.

    .venv/bin/python tools/reshard_tfds.py quickstart_data/cifar10_jpeg/1.0.0 /tmp/data 4
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, Optional

import tensorflow as tf


def reshard(version_dir: str, out_data_dir: str, num_files: int, keep: Optional[Dict[str, int]] = None) -> str:
    """Writes `<out_data_dir>/<name>/<version>/` with every split in `num_files`
    files; returns that directory. `keep` {split: n} keeps only a split's first
    n records (small test datasets)."""
    with open(os.path.join(version_dir, "dataset_info.json")) as f:
        info = json.load(f)
    name, version = info["name"], info["version"]
    out = os.path.join(out_data_dir, name, version)
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(version_dir):
        if ".tfrecord-" not in entry and entry != "dataset_info.json":
            shutil.copy(os.path.join(version_dir, entry), out)
    for split in info["splits"]:
        count = len(split["shardLengths"])
        sources = [
            os.path.join(version_dir, f"{name}-{split['name']}.tfrecord-{i:05d}-of-{count:05d}") for i in range(count)
        ]
        records = [r.numpy() for r in tf.data.TFRecordDataset(sources)]
        records = records[:(keep or {}).get(split["name"], len(records))]
        bounds = [len(records) * i // num_files for i in range(num_files + 1)]
        for i in range(num_files):
            path = os.path.join(out, f"{name}-{split['name']}.tfrecord-{i:05d}-of-{num_files:05d}")
            with tf.io.TFRecordWriter(path) as writer:
                for record in records[bounds[i]:bounds[i + 1]]:
                    writer.write(record)
        split["shardLengths"] = [str(bounds[i + 1] - bounds[i]) for i in range(num_files)]
        split["numBytes"] = str(sum(len(r) for r in records))
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(reshard(sys.argv[1], sys.argv[2], int(sys.argv[3])))
