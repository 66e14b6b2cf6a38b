"""Training backend: everything needed to train the registration networks of the DDMR designs.

Modules (one concern each; import them directly, this package imports nothing):

- ``losses``        image similarity (global / local NCC, SSIM), label overlap (generalised / macro soft
                    Dice), erosion Hausdorff loss, flow regularisers (diffusion, bending energy)
- ``uncertainty``   ``UncertaintyWeighting``: learnable weights combining the data terms (softmax or
                    Kendall log-variance form) and the regulariser
- ``augmentation``  the synthetic-pair generator: the fixed image is the input resampled through a random
                    rigid + thin-plate-spline transform, the moving image is the input itself, so the
                    ground-truth flow is exact (warp(moving, flow) == fixed)

- ``config``        strict YAML training configs (unknown keys are errors), scripts/configs/*.yaml
- ``designs``       the six loss designs of the paper (BL-N, BL-NS, SG-ND, SG-NSD, UW-NSD, UW-NSDH)
- ``trainer``       the training loop: gradient accumulation, plateau LR, early stopping, checkpoints and
                    resume, TensorBoard, transfer learning, tf.distribute
- ``dataset``       ``dareg prepare``: subjects on the model grid in HDF5, the seeded split, streaming

The DDMR original's quirks (uncentred NCC, zero-gradient Hausdorff, decaying regulariser weight...) are
reproducible through named options, documented where they apply; the defaults do what the paper intends.
"""
