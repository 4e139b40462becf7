"""deploy/: the TFJob manifest and the sbatch script start the command README.md documents."""

import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT

SLURM_BINDING = "--gin_param=get_strategy.cluster_resolver = 'slurm'"


def shell_command(text):
    """argv of a shell command written over several lines with trailing backslashes."""
    return shlex.split(text.replace("\\\n", " "))


def readme_command():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Training on a cluster\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return shell_command(block)


def test_readme_documents_the_multi_worker_imagenet_command():
    argv = readme_command()
    assert argv[:3] == ["python", "-m", "dhm_keras.main"]
    assert "--gin_file=gin/imagenet/resnet50_dhm.gin" in argv
    assert "--gin_param=get_strategy.name = 'multi_worker'" in argv
    assert any(a.startswith("--model_dir=/mnt/nfs/") for a in argv)
    assert (REPO_ROOT / "gin" / "imagenet" / "resnet50_dhm.gin").exists()


def test_tfjob_manifest_runs_the_documented_command():
    manifest = yaml.safe_load((REPO_ROOT / "deploy" / "tfjob.yaml").read_text())
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "TFJob"
    workers = manifest["spec"]["tfReplicaSpecs"]["Worker"]
    assert workers["replicas"] >= 2 and workers["restartPolicy"] == "OnFailure"
    (container,) = workers["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"  # the container the training operator sets TF_CONFIG for
    assert container["command"] + container["args"] == readme_command()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mnt/nfs" in mounts  # model_dir and data_dir on the shared volume


def test_sbatch_script_parses_and_runs_the_documented_command_under_slurm():
    script = REPO_ROOT / "deploy" / "slurm_imagenet.sbatch"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("srun "))
    last = next(i for i in range(first, len(lines)) if not lines[i].rstrip().endswith("\\"))
    argv = shell_command("\n".join(lines[first:last + 1]))
    start = argv.index("python")
    assert argv[start:] == readme_command() + [SLURM_BINDING]
