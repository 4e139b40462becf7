"""Builds the small REAL CIFAR-10 sample committed at quickstart_data/.

Why: a fresh clone should train, test and demo offline in minutes, on real
images (synthetic data says nothing about whether a model learns). The
sample is the first N train / M test examples of the prepared `cifar10_jpeg`
TFDS dataset, kept in TFDS's own prepared format so that

    tfds.load("cifar10_jpeg", data_dir="quickstart_data", split="train")

works exactly like the full dataset (same features, same loader code).

How: the serialized `tf.train.Example` records are copied byte for byte
(no decode/re-encode, so pixels are identical to the full dataset's) into
new tfrecord files with the same naming scheme; features.json and the label
file are copied; dataset_info.json is rewritten so that each split's shard
lengths and num_bytes (TFDS's sum of serialized record sizes, which it uses
for split slicing such as "train[:10%]") describe the new files.

Usage (from the repo root):

    .venv/bin/python tools/make_quickstart_data.py \
        [--src ../shared/tensorflow_datasets] [--out quickstart_data] \
        [--train 5000] [--test 1000]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

NAME = "cifar10_jpeg"
VERSION = "1.0.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
COPIED_FILES = ("features.json", "label.labels.txt")


def _shard_name(split: str, shard: int = 0, num_shards: int = 1) -> str:
    # TFDS template "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}".
    return f"{NAME}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"


def _label_of(record: bytes) -> int:
    example = tf.train.Example.FromString(record)
    return int(example.features.feature["label"].int64_list.value[0])


def copy_split(src_dir: Path, dst_dir: Path, split: str, info: dict, count: int):
    """Copies the first `count` records of `split`; returns (bytes, labels)."""
    split_info = next(s for s in info["splits"] if s["name"] == split)
    num_shards = len(split_info["shardLengths"])
    files = [str(src_dir / _shard_name(split, i, num_shards)) for i in range(num_shards)]
    available = sum(int(n) for n in split_info["shardLengths"])
    if count > available:
        raise ValueError(f"{split}: asked for {count} of {available} examples")

    num_bytes = 0
    labels = collections.Counter()
    with tf.io.TFRecordWriter(str(dst_dir / _shard_name(split))) as writer:
        # Files in shard order, records in file order: exactly the order in
        # which TFDS serves the split without shuffle_files.
        for record in tf.data.TFRecordDataset(files).take(count):
            raw = record.numpy()
            writer.write(raw)
            num_bytes += len(raw)
            labels[_label_of(raw)] += 1

    split_info["shardLengths"] = [str(count)]
    split_info["numBytes"] = str(num_bytes)
    return num_bytes, labels


def build(src_root: Path, out_root: Path, counts: dict) -> Path:
    src_dir = src_root / NAME / VERSION
    if not (src_dir / "dataset_info.json").exists():
        raise FileNotFoundError(f"No prepared {NAME} at {src_dir}")
    info = json.loads((src_dir / "dataset_info.json").read_text())
    names = (src_dir / "label.labels.txt").read_text().split()

    out_root.mkdir(parents=True, exist_ok=True)
    # Write next to the destination, then swap, so a failed run never leaves
    # a half-written dataset that TFDS would happily load.
    tmp = Path(tempfile.mkdtemp(prefix=".quickstart-", dir=out_root))
    try:
        for split, count in counts.items():
            num_bytes, labels = copy_split(src_dir, tmp, split, info, count)
            per_class = ", ".join(f"{names[k]}={labels[k]}" for k in sorted(labels))
            print(f"{split}: {count} examples, {num_bytes} bytes; {per_class}")
            lo, hi = min(labels.values()), max(labels.values())
            if len(labels) != len(names) or hi > 1.5 * lo:
                print(f"  WARNING: {split} sample is unbalanced ({lo}..{hi})")
        # Drop splits that were not copied, so that TFDS does not list them.
        info["splits"] = [s for s in info["splits"] if s["name"] in counts]
        info["description"] = (
            info.get("description", "").rstrip()
            + " Quickstart sample: the first "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + " examples, records copied unchanged (tools/make_quickstart_data.py)."
        )
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for name in COPIED_FILES:
            shutil.copyfile(src_dir / name, tmp / name)

        dst = out_root / NAME / VERSION
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dst)
        dst.chmod(0o755)  # mkdtemp made it private
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def verify(out_root: Path, counts: dict) -> None:
    """Loads the sample through TFDS, as users will, and decodes every image."""
    import tensorflow_datasets as tfds

    for split, count in counts.items():
        ds = tfds.load(NAME, data_dir=str(out_root), split=split,
                       as_supervised=True, download=False)
        n = 0
        for image, label in ds:
            assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
            assert 0 <= int(label) < 10
            n += 1
        assert n == count, (split, n, count)
        print(f"verified {split}: {n} decoded 32x32x3 images through tfds.load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path,
                        default=REPO_ROOT.parent / "shared" / "tensorflow_datasets",
                        help="TFDS data_dir holding the full prepared cifar10_jpeg")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "quickstart_data")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    counts = {"train": args.train, "test": args.test}
    dst = build(args.src, args.out, counts)
    total = sum(p.stat().st_size for p in dst.iterdir())
    print(f"wrote {dst} ({total / 1e6:.2f} MB)")
    verify(args.out, counts)


if __name__ == "__main__":
    main()
