"""dareg: deep abdominal CT deformable registration, headless core of DeepAbdominalRegistration.

Layout (one concern per module; numpy/SimpleITK modules never import TensorFlow):

- ``errors``    the single user-error type (``DaregError``)
- ``io``        images, label maps, ``.seg.nrrd``, displacement-field transforms, landmarks
- ``geometry``  the ONE place where voxel indices, LPS millimetres and the model grid meet
- ``initialize`` rigid/affine initialisation (SimpleITK)
- ``models``    U-Net presets, spatial transformer, model files, bundled-model registry (TensorFlow)
- ``optimize``  instance optimisation of the field at the model grid (TensorFlow)
- ``register``  the inference pipeline -> ``RegistrationResult``
- ``baseline``  ANTs SyN on the same inputs, written the same way (``dareg ants``)
- ``assessment`` the one place that measures a result (before / initial / registered) and warns
- ``outputs``   the all-or-nothing result folder
- ``metrics``   NCC, SSIM, DSC, HD/HD95, TRE, Jacobian statistics (mm everywhere)
- ``phantom``   procedural abdominal CT phantom + seeded synthetic deformations
- ``training``  losses, uncertainty weighting, augmentation layer (training backend, in progress)
- ``cli``, ``commands``  ``dareg register | ants | demo``

The core never imports slicer, qt or vtk.
"""

__version__ = "0.1.0"
