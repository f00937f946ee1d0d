"""One job for test_multinode's two-node torchrun launch: the 2-D attention demo, then the inference CLI, in the
same processes (one launch proves the recipe for both; a launch of 4 processes costs CI's 2 cores most of a minute).

    python tests/two_node_job.py DEMO_ARGS -- CLI_ARGS      (under torchrun)
"""

from __future__ import annotations

import logging
import sys

from launch import demo_attention as demo  # the repository root is on PYTHONPATH
from spava_ds import cli, entry


def main(argv) -> int:
    split = argv.index("--")
    demo_args = demo.build_parser().parse_args(argv[:split])
    cli_args = cli.build_parser().parse_args(argv[split + 1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def job(_) -> int:
        demo.demo(demo_args)
        return cli.run(cli_args)

    return entry.run_main(job, cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
