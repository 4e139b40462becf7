"""Dynamic Hierarchical Mimicking (CVPR 2020) in TensorFlow/Keras.

Public entry points: `dhm_keras.models.build`, `dhm_keras.losses.mimicking_loss`,
`dhm_keras.model.DHMModel`, and the CLI `python -m dhm_keras.main` (`dhm-train`
once the package is installed, see pyproject.toml).
"""

import official  # noqa: F401  (sets TensorFlow's CPU defaults before TF is imported)
