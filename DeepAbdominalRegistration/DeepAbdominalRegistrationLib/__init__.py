"""Slicer-side helpers of the DeepAbdominalRegistration module (MRML and processes; never qt).

The registration itself is done by the headless engine ``dareg``, run in a separate process; these
modules only move data between the scene and that process:

- ``process``       run ``python -m dareg ...`` in the background: progress lines, log, exit codes, cancel
- ``exchange``      MRML nodes <-> files (volumes, segmentations as label maps with one shared name -> id
                    table, landmarks, displacement-field transforms)
- ``request``       what a registration needs, checked before anything starts
- ``run``           one registration run: export, start the process(es), import the results
- ``results``       the metrics table (deep and ANTs SyN side by side) from metrics.json
- ``layout``        the fixed / deep / SyN compare layout
- ``dependencies``  which Python packages are missing and how to install them into Slicer's Python

Everything here works with slicer-core alone (no GUI), which is how the test suite runs it.
"""
