"""Reusable, method-agnostic training infrastructure (strategy, optimization, export, flags).

Importing this package turns on TensorFlow's oneDNN CPU kernels unless the user
set TF_ENABLE_ONEDNN_OPTS already: on the project's AMD EPYC machines TF 2.21
leaves them off, and a ResNet-32 training step measured 2.4x faster with them
(57 -> 138 images/s at batch 128, 2 cores). The variable is read when
TensorFlow is first imported, so this must run before `import tensorflow`.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
