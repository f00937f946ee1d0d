"""One job for test_multinode's two-node torchrun launch: the 2-D attention demo, then the inference CLI, in the
same processes (one launch proves the recipe for both; a launch of 4 processes costs CI's 2 cores most of a minute).

    python tests/two_node_job.py DEMO_ARGS -- CLI_ARGS      (under torchrun)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from spava_ds import cli, entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_attention", os.path.join(ROOT, "launch", "demo_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv) -> int:
    split = argv.index("--")
    demo = _demo_module()
    demo_args = demo.build_parser().parse_args(argv[:split])
    cli_args = cli.build_parser().parse_args(argv[split + 1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def job(_) -> int:
        demo.demo(demo_args)
        return cli.run(cli_args)

    return entry.run_main(job, cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
