"""Answer questions about a video with Spava over several processes (the ``spava-infer`` console script).

    torchrun --standalone --nproc_per_node 2 launch/infer.py --check
    python launch/infer.py --help
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spava_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
