"""``python -m dareg`` (what 3D Slicer runs as ``PythonSlicer -m dareg``)."""

import sys

from dareg.cli import main

sys.exit(main())
