"""Write a tiny random-weight checkpoint (``spava_ds.benchmarks.tiny``): the embedded Qwen2.5-VL test model, a
trainable ``--preset small`` starting point, or a tiny model of another family.

    python launch/make_tiny_model.py                       # -> spava_ds/assets/tiny-qwen2.5-vl/
    python launch/make_tiny_model.py --out /tmp/tiny       # anywhere else
    python launch/make_tiny_model.py --family qwen3_vl --out /tmp/tiny-qwen3-vl     # qwen3_vl, internvl, qwen2, llama
    python launch/make_tiny_model.py --preset small --out runs/small-init   # a trainable starting point
"""

from __future__ import annotations

import argparse
import os
import sys

from spava_ds import assets
from spava_ds.benchmarks.tiny import FAMILIES, PRESETS, SEED, write_checkpoint, write_family_checkpoint  # noqa: F401


DEFAULT_OUT = os.path.join(os.path.dirname(assets.__file__), "tiny-qwen2.5-vl")  # the embedded test model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: the packaged asset)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="tiny: the embedded test model (default); small: a trainable random-init start")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", *FAMILIES],
                        help="the architecture (default qwen2_5_vl; the others: --preset tiny only)")
    args = parser.parse_args(argv)
    if (args.preset != "tiny" or args.family != "qwen2_5_vl") and args.out == DEFAULT_OUT:
        parser.error("--preset small and --family need --out (the default folder holds the committed tiny model)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = write_checkpoint(args.out, args.seed, args.preset, args.family)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({size / 2**20:.2f} MiB): {', '.join(sorted(os.listdir(out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
