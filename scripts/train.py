"""Train a registration network from a config (the training backend's entry point).

``python scripts/train.py --config scripts/configs/UW-NSD.yaml --dataset DIR --out DIR``: the same as
``dareg train`` (see ``dareg train --help``); kept as a script for the training backend's layout.
"""

import sys

from dareg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
