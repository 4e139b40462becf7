"""Cluster resolvers of `get_strategy.cluster_resolver`: Slurm's variables -> cluster spec."""

import pytest

from official.common import distribute


def slurm_env(monkeypatch, procid, tasks, nodelist, tasks_per_node):
    for name in list(__import__("os").environ):
        if name.startswith("SLURM_") or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(tasks))
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)


@pytest.mark.parametrize("procid", [0, 1])
def test_slurm_two_nodes_one_task_each(monkeypatch, procid):
    # What Slurm sets for `sbatch --nodes=2 --ntasks-per-node=1` + `srun`.
    slurm_env(monkeypatch, procid, 2, "gpu-node[07-08]", "1(x2)")
    resolver = distribute.resolve_cluster("slurm", port_base=23456)
    assert resolver.cluster_spec().as_dict() == {"worker": ["gpu-node07:23456", "gpu-node08:23456"]}
    assert resolver.get_task_info() == ("worker", procid)
    assert "CUDA_VISIBLE_DEVICES" not in __import__("os").environ  # CPU nodes: left alone


@pytest.mark.parametrize("procid", [0, 1, 2, 3])
def test_slurm_two_nodes_two_tasks_each_get_their_own_ports(monkeypatch, procid):
    slurm_env(monkeypatch, procid, 4, "n1,n2", "2(x2)")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    resolver = distribute.resolve_cluster("slurm")
    assert resolver.cluster_spec().as_dict() == {"worker": ["n1:8888", "n1:8889", "n2:8888", "n2:8889"]}
    assert resolver.get_task_info() == ("worker", procid)
    # Two GPUs per task, the first pair for the node's first task.
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == ["0,1", "2,3"][procid % 2]


def test_slurm_outside_a_job_step_is_a_clear_error(monkeypatch):
    slurm_env(monkeypatch, 0, 2, "n[1-2]", "1(x2)")
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST unset: start the trainer with srun"):
        distribute.resolve_cluster("slurm")


def test_tf_config_resolver_and_unknown_names(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribute.resolve_cluster("tf_config")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    resolver = distribute.resolve_cluster("tf_config")
    assert resolver.cluster_spec().as_dict() == {"worker": ["a:1", "b:2"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    with pytest.raises(ValueError, match="Unknown cluster_resolver 'k8s'"):
        distribute.resolve_cluster("k8s")
    with pytest.raises(ValueError, match="collective_timeout_s must be positive"):
        distribute.get_strategy("multi_worker", collective_timeout_s=0)


def test_tasks_without_input_context_keep_data_sharding():
    class Old:
        def build_train_inputs(self, first_epoch=0):
            pass

    class New:
        def build_train_inputs(self, first_epoch=0, input_context=None):
            pass

    class Kwargs:
        def build_train_inputs(self, first_epoch=0, **kwargs):
            pass

    assert not distribute.accepts_input_context(Old().build_train_inputs)
    assert distribute.accepts_input_context(New().build_train_inputs)
    assert distribute.accepts_input_context(Kwargs().build_train_inputs)
