"""Build a training dataset: ``python scripts/prepare_dataset.py --inputs FOLDER|CSV --out DIR [...]``.

The same as ``dareg prepare`` (see ``dareg prepare --help``): one HDF5 file per subject on the model grid,
a seeded train/val/test split (split.json) and the subjects left out, with reasons (skipped.csv).
"""

import sys

from dareg.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
