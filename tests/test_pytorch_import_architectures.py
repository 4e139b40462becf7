"""`--mode=import` of every architecture the reference defines, head by head.

For each: the PyTorch yardstick (`torch_reference_models`) with random weights
and BatchNorm statistics, saved as the reference scripts save (alternately a
`save_checkpoint` dict with DataParallel's `module.` keys and a bare state
dict), imported through the CLI; every head's eval-mode logits of the imported
checkpoint must equal PyTorch's to a relative 1e-4. A file of its own, so that
the test runner can spread these slow cases over its workers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is the optional [torch] extra that --mode=import needs (CI installs it)")
import torch_reference_models as reference  # noqa: E402  (needs torch)
from reference_checkpoints import (  # noqa: E402
    input_size, keras_heads, max_relative_difference, reference_model, run_cli, save_reference, torch_logits,
)


# Every architecture the reference defines; alternate the two ways of saving.
@pytest.mark.parametrize("arch", reference.ARCHITECTURES)
def test_import_matches_reference_logits_of_every_head(tmp_path, arch):
    model = reference_model(arch)
    wrapped = reference.ARCHITECTURES.index(arch) % 2 == 0
    checkpoint = save_reference(model, tmp_path / f"{arch}.pth.tar", wrapped=wrapped)
    model_dir = tmp_path / "run"
    proc = run_cli(tmp_path, arch, model_dir, checkpoint)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["imported"]["heads"] == ["b0", "b1", "b2"]

    size = input_size(arch)
    images = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype("float32")
    want = torch_logits(model, images)
    got = keras_heads(arch, summary["checkpoint"])(images)
    for index, head in enumerate(("b0", "b1", "b2")):
        assert np.std(want[index]) > 1e-3, "degenerate reference logits"
        assert max_relative_difference(got[head], want[index]) <= 1e-4, head
