"""The precision-policy resolver ("auto") with faked CPU flags and devices, so the
results do not depend on the machine running the tests."""

import collections

import keras
import pytest
import tensorflow as tf

from official.modeling import performance

X86_PLAIN = {"fpu", "sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}  # no BF16
X86_AVX512_BF16 = X86_PLAIN | {"avx512_bf16"}  # e.g. AMD Zen 4
X86_AMX = X86_PLAIN | {"amx_tile", "amx_int8", "amx_bf16"}  # AMX only, without avx512_bf16


def gpu(major, minor, name="GPU"):
    return {"type": "GPU", "name": name, "compute_capability": (major, minor)}


@pytest.fixture(autouse=True)
def float32_policy_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def machine(monkeypatch):
    """Fakes this machine's CPU flags and accelerators as `set_precision_policy` reads them."""

    def fake(flags, accelerators=(), onednn="1"):
        monkeypatch.setattr(performance, "read_cpu_flags", lambda *a, **k: frozenset(flags))
        monkeypatch.setattr(performance, "local_accelerators", lambda: list(accelerators))
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)

    return fake


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("flags, expected", [
    (X86_AVX512_BF16, "mixed_bfloat16"),
    (X86_AMX, "mixed_bfloat16"),
    (X86_AVX512_BF16 | X86_AMX, "mixed_bfloat16"),
    (X86_PLAIN, "float32"),
    (set(), "float32"),  # no /proc/cpuinfo (another OS) or an unreadable one
    ({"fp", "asimd", "bf16"}, "float32"),  # ARM's BF16 is not one we measured: float32
])
def test_auto_on_cpu_follows_the_bf16_flags(flags, expected):
    resolved, reason = performance.resolve_precision_policy("auto", cpu_flags=flags, accelerators=[], onednn=True)
    assert resolved == expected
    assert reason.startswith("auto: CPU")
    for flag in performance.native_bf16_flags(flags):
        assert flag in reason  # names the flags it went by


def test_auto_on_cpu_needs_onednn():
    resolved, reason = performance.resolve_precision_policy(
        "auto", cpu_flags=X86_AVX512_BF16, accelerators=[], onednn=False
    )
    assert resolved == "float32" and "oneDNN" in reason


@pytest.mark.parametrize("value, enabled", [("1", True), ("0", False), ("false", False), ("", True)])
def test_onednn_switch_is_read_from_the_environment(value, enabled):
    assert performance.onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": value}) is enabled
    assert performance.onednn_enabled({}) is True  # importing `official` turns it on by default


# ----------------------------------------------------------------------------- accelerators


@pytest.mark.parametrize("accelerators, expected", [
    ([gpu(8, 0, "A100")], "mixed_bfloat16"),
    ([gpu(9, 0, "H100"), gpu(9, 0, "H100")], "mixed_bfloat16"),
    ([gpu(8, 6, "A10")], "mixed_bfloat16"),
    ([gpu(7, 0, "V100")], "float32"),
    ([gpu(7, 5, "T4")], "float32"),
    ([gpu(8, 0), gpu(7, 0)], "float32"),  # every replica must have it
    ([{"type": "GPU", "name": "GPU", "compute_capability": None}], "float32"),  # unknown
    ([{"type": "TPU", "name": "/device:TPU:0"}], "mixed_bfloat16"),
])
def test_auto_on_accelerators(accelerators, expected):
    # The CPU's flags do not matter when an accelerator computes, either way.
    for flags in (X86_PLAIN, X86_AVX512_BF16):
        resolved, reason = performance.resolve_precision_policy("auto", cpu_flags=flags, accelerators=accelerators)
        assert resolved == expected, reason
        assert "GPU" in reason or "TPU" in reason


def test_old_gpu_is_named_in_the_reason():
    _, reason = performance.resolve_precision_policy("auto", accelerators=[gpu(8, 0, "A100"), gpu(7, 0, "V100")])
    assert "V100" in reason and "7.0" in reason


def test_local_accelerators_reads_compute_capability(monkeypatch):
    Device = collections.namedtuple("Device", "name device_type")
    gpus = [Device("/physical_device:GPU:0", "GPU"), Device("/physical_device:GPU:1", "GPU")]
    details = {gpus[0]: {"device_name": "NVIDIA H200", "compute_capability": (9, 0)}, gpus[1]: {}}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: details[device])
    found = performance.local_accelerators()
    assert found == [
        {"type": "GPU", "name": "NVIDIA H200", "compute_capability": (9, 0)},
        {"type": "GPU", "name": "/physical_device:GPU:1", "compute_capability": None},
    ]
    assert performance.resolve_precision_policy("auto", accelerators=found[:1])[0] == "mixed_bfloat16"
    assert performance.resolve_precision_policy("auto", accelerators=found)[0] == "float32"


# ----------------------------------------------------------------------------- explicit policies


@pytest.mark.parametrize("policy", performance.PRECISIONS)
@pytest.mark.parametrize("flags, accelerators", [
    (X86_PLAIN, []), (X86_AVX512_BF16, []), (X86_PLAIN, [gpu(9, 0)]), (X86_PLAIN, [gpu(7, 0)]),
])
def test_explicit_policy_is_never_overridden(policy, flags, accelerators):
    resolved, reason = performance.resolve_precision_policy(policy, cpu_flags=flags, accelerators=accelerators)
    assert resolved == policy and "explicit" in reason


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "AUTO", "", None])
def test_unknown_policy_is_refused(policy):
    with pytest.raises(ValueError, match="Unknown precision policy"):
        performance.resolve_precision_policy(policy, cpu_flags=X86_AVX512_BF16, accelerators=[])


# ----------------------------------------------------------------------------- set_precision_policy


@pytest.mark.parametrize("flags, expected", [(X86_AVX512_BF16, "mixed_bfloat16"), (X86_PLAIN, "float32")])
def test_set_precision_policy_auto_sets_and_returns_the_resolved_policy(machine, flags, expected):
    machine(flags)
    assert performance.set_precision_policy("auto") == expected
    assert keras.mixed_precision.global_policy().name == expected


def test_set_precision_policy_auto_on_a_gpu(machine):
    machine(X86_PLAIN, accelerators=[gpu(8, 0, "A100")])
    assert performance.set_precision_policy("auto") == "mixed_bfloat16"
    machine(X86_AVX512_BF16, accelerators=[gpu(7, 5, "T4")])
    assert performance.set_precision_policy("auto") == "float32"


@pytest.mark.parametrize("policy", performance.PRECISIONS)
def test_set_precision_policy_explicit_wins_on_a_bf16_machine(machine, policy):
    machine(X86_AVX512_BF16 | X86_AMX, accelerators=[gpu(9, 0)])
    assert performance.set_precision_policy(policy) == policy
    assert keras.mixed_precision.global_policy().name == policy


def test_set_precision_policy_logs_choice_and_reason(machine, monkeypatch):
    messages = []
    monkeypatch.setattr(performance.logging, "info", lambda fmt, *args: messages.append(fmt % args))
    machine(X86_AVX512_BF16)
    performance.set_precision_policy("auto")
    assert messages == ["Precision policy mixed_bfloat16 (auto: CPU with native bfloat16 (avx512_bf16) and oneDNN on)"]


def test_default_policy_stays_float32(machine):
    # The default is float32 (issue #19 accuracy check, docs/performance.md); config.json
    # of every earlier run recorded {"policy": "float32"}.
    machine(X86_AVX512_BF16)
    assert performance.set_precision_policy() == "float32"


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("recorded, flags, expected", [
    # Started on a BF16 machine, resumed on one without: keeps bfloat16, and vice versa.
    ({"policy": "auto", "resolved": "mixed_bfloat16"}, X86_PLAIN, "mixed_bfloat16"),
    ({"policy": "auto", "resolved": "float32"}, X86_AVX512_BF16, "float32"),
    # Written before "resolved" existed: the explicit policy it recorded.
    ({"policy": "float32"}, X86_AVX512_BF16, "float32"),
    ({"policy": "mixed_bfloat16"}, X86_PLAIN, "mixed_bfloat16"),
    # A new run (no config.json, or one without a precision section): resolve here.
    (None, X86_AVX512_BF16, "mixed_bfloat16"),
    ({}, X86_PLAIN, "float32"),
])
def test_resumed_auto_run_keeps_its_policy(recorded, flags, expected):
    resolved, reason = performance.resolve_for_resume("auto", recorded, cpu_flags=flags, accelerators=[])
    assert resolved == expected
    if recorded:
        assert "resumed" in reason


def test_resume_reason_says_when_this_machine_would_differ():
    _, reason = performance.resolve_for_resume(
        "auto", {"policy": "auto", "resolved": "mixed_bfloat16"}, cpu_flags=X86_PLAIN, accelerators=[]
    )
    assert "would pick float32" in reason
    _, reason = performance.resolve_for_resume(
        "auto", {"policy": "auto", "resolved": "mixed_bfloat16"}, cpu_flags=X86_AMX, accelerators=[]
    )
    assert "would pick" not in reason


@pytest.mark.parametrize("requested", performance.PRECISIONS)
def test_resume_with_an_explicit_policy_returns_it(requested):
    recorded = {"policy": "auto", "resolved": "mixed_bfloat16"}
    assert performance.resolve_for_resume(requested, recorded, cpu_flags=X86_PLAIN, accelerators=[])[0] == requested


# ----------------------------------------------------------------------------- /proc/cpuinfo


def test_read_cpu_flags_and_model_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
        "flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    )
    assert performance.read_cpu_flags(str(x86)) == {"fpu", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert performance.read_cpu_model(str(x86)) == "AMD EPYC 9B14"
    assert performance.native_bf16_flags(performance.read_cpu_flags(str(x86))) == ("avx512_bf16",)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16\n")
    assert "bf16" in performance.read_cpu_flags(str(arm))
    assert performance.native_bf16_flags(performance.read_cpu_flags(str(arm))) == ()
    assert performance.read_cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_cpu_description_names_the_model_and_its_bf16_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16\n")
    line = performance.cpu_description(str(cpuinfo))
    assert line.startswith("AMD EPYC 9B14, ") and line.endswith("native BF16: avx512_bf16")
    cpuinfo.write_text("model name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2\n")
    assert "no native BF16" in performance.cpu_description(str(cpuinfo))


def test_auto_bf16_keeps_the_sensitive_numbers_float32(machine):
    """What 'auto' picks on a BF16 CPU computes convolutions in bfloat16 while the heads'
    logits, the loss, the BN moving statistics and the optimizer's state stay float32."""
    import numpy as np

    from dhm_keras import models
    from dhm_keras.model import DHMModel
    from official.modeling import optimization

    machine(X86_AMX)
    assert performance.set_precision_policy("auto") == "mixed_bfloat16"
    keras.utils.set_random_seed(0)
    network = models.build("resnet32", 10, mode="dhm", input_shape=(16, 16, 3), blocks_per_stage=1, branch_blocks=1)
    model = DHMModel(network, mode="dhm")
    model.compile(optimizer=optimization.L2SGD(0.1, momentum=0.9), jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 3)).astype("float32")
    logs = model.train_on_batch(x, rng.integers(0, 10, 8).astype("int32"), return_dict=True)

    assert np.isfinite(logs["loss"])
    assert network.get_layer("stage1_block0_conv1").compute_dtype == "bfloat16"
    moving = [v for v in network.weights if "moving" in v.path]
    assert moving and all(v.dtype == "float32" for v in network.weights)
    assert model.optimizer.variables and all(v.dtype in ("float32", "int64") for v in model.optimizer.variables)
    assert all(z.dtype == tf.float32 for z in model._inference_logits(x[:2]).values())


@pytest.mark.parametrize("requested, recorded, flags, expected", [
    ("auto", None, X86_AVX512_BF16, "mixed_bfloat16"),  # a new run on a BF16 CPU
    ("auto", None, X86_PLAIN, "float32"),
    ("auto", {"policy": "auto", "resolved": "mixed_bfloat16"}, X86_PLAIN, "mixed_bfloat16"),  # resumed
    ("float32", None, X86_AVX512_BF16, "float32"),  # explicit
    ("float32", {"policy": "float32"}, X86_AVX512_BF16, "float32"),  # an older run resumed
])
def test_apply_precision_policy_returns_the_config_json_section(machine, monkeypatch, requested, recorded, flags,
                                                                expected):
    messages = []
    # "auto" is logged as a warning (shown without --verbosity), an explicit policy as info.
    level = "warning" if requested == "auto" else "info"
    monkeypatch.setattr(performance.logging, level, lambda fmt, *args: messages.append(fmt % args))
    machine(flags)
    section = performance.apply_precision_policy(requested, recorded)
    assert section == {"policy": requested, "resolved": expected}
    assert keras.mixed_precision.global_policy().name == expected
    assert len(messages) == 1 and messages[0].startswith(f"Precision policy {expected} (")
