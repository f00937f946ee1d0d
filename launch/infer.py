"""Answer questions about a video with Spava over several processes (the ``spava-infer`` console script).

    torchrun --standalone --nproc_per_node 2 launch/infer.py --check
    python launch/infer.py --help
"""

import sys

from spava_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
