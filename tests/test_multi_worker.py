"""Multi-worker training: two local worker processes, MultiWorkerMirroredStrategy.

Each worker runs `train_lib.train` through a small driver (written into
tmp_path) that parses the Gin bindings the CLI would, records every file the
worker writes, and dumps the worker's final weights outside the model
directory. Checks: both finish, both end with identical weights (equal to the
chief's last checkpoint), and only the chief writes into model_dir.

`run_workers` is shared with tests/test_input_sharding.py and
tests/test_lost_worker.py: the driver can also record what each worker's
training stream holds (DHM_TEST_RECORD_INPUTS) and SIGKILL its own process
at a given (epoch, batch) (DHM_TEST_KILL_AT), a preempted machine.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np

from conftest import REPO_ROOT

TIMEOUT_S = 420  # a hang fails the test; a normal run takes 1-4 min on 2 shared cores

DRIVER = textwrap.dedent(
    """
    import builtins, json, os, sys
    repo, model_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, repo)
    import official  # noqa: F401
    import keras

    writes = []
    real_open = builtins.open
    def recording_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+"):
            writes.append(os.path.abspath(str(file)))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = recording_open
    real_save = keras.Model.save_weights
    def recording_save(self, filepath, *args, **kwargs):
        writes.append(os.path.abspath(str(filepath)))
        return real_save(self, filepath, *args, **kwargs)
    keras.Model.save_weights = recording_save
    backup_dirs = []
    real_backup_init = keras.callbacks.BackupAndRestore.__init__
    def recording_backup_init(self, backup_dir, *args, **kwargs):
        backup_dirs.append(os.path.abspath(backup_dir))
        real_backup_init(self, backup_dir, *args, **kwargs)
    keras.callbacks.BackupAndRestore.__init__ = recording_backup_init

    kill_at = os.environ.get("DHM_TEST_KILL_AT")
    if kill_at:  # "epoch,batch" (0-based): die there like a preempted machine
        import signal
        kill_epoch, kill_batch = (int(v) for v in kill_at.split(","))
        class Preempted(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch
            def on_train_batch_begin(self, batch, logs=None):
                if (self.epoch, batch) == (kill_epoch, kill_batch):
                    print("DRIVER KILLING ITSELF", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
        real_fit = keras.Model.fit
        def fit_then_die(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Preempted()]
            return real_fit(self, *args, **kwargs)
        keras.Model.fit = fit_then_die

    from dhm_keras import main, train_lib
    from dhm_keras.data import pipeline
    captured = {"contexts": [], "reads": []}
    real_read_split = pipeline.read_split
    def recording_read_split(*args, **kwargs):
        read = real_read_split(*args, **kwargs)
        mine = read.shards[read.worker::read.workers]
        captured["reads"].append({"workers": read.workers, "worker": read.worker,
                                  "files": [os.path.basename(f) for f, _, _ in mine],
                                  "all_files": [os.path.basename(f) for f, _, _ in read.shards]})
        return read
    pipeline.read_split = recording_read_split
    build = train_lib.build_experiment
    def capture(*args, **kwargs):
        captured["exp"] = exp = build(*args, **kwargs)
        real_inputs = exp.task.build_train_inputs
        def recording_inputs(first_epoch=0, input_context=None):
            captured["contexts"].append(input_context)
            return real_inputs(first_epoch, input_context=input_context)
        exp.task.build_train_inputs = recording_inputs
        return exp
    train_lib.build_experiment = capture

    def real_inputs_of(exp):
        return type(exp.task).build_train_inputs.__get__(exp.task)

    main.parse_gin([], json.loads(os.environ["DHM_TEST_BINDINGS"]))
    from dhm_keras.errors import UserError
    try:
        result = train_lib.train(model_dir)
    except UserError as error:  # as dhm_keras.main reports it
        print(f"error: {type(error).__name__}: {error}", flush=True)
        sys.exit(error.exit_code)
    exp = captured["exp"]
    assert exp.strategy.num_replicas_in_sync == 2, exp.strategy.num_replicas_in_sync
    real_save(exp.model, os.path.join(out, "final.weights.h5"))
    report = {"writes": writes, "backup_dirs": backup_dirs, "result": result, "chief": bool(result),
              "reads": captured["reads"],
              "contexts": [None if c is None else [c.num_input_pipelines, c.input_pipeline_id]
                           for c in captured["contexts"]]}
    if os.environ.get("DHM_TEST_RECORD_INPUTS"):
        # What this worker's stream holds in epochs 1 and 2 (images hashed; the
        # test trains without augmentation, so an image is its example's identity).
        import hashlib, numpy as np
        def identities(ds, batches):
            out = []
            for images, _ in ds.take(batches):
                out += [hashlib.md5(np.round(x, 4).tobytes()).hexdigest() for x in images.numpy()]
            return out
        steps = exp.task.steps_per_epoch()
        context = captured["contexts"][0]
        stream = identities(real_inputs_of(exp)(0, input_context=context), 2 * steps)
        report["epochs"] = [stream[:len(stream) // 2], stream[len(stream) // 2:]]
        report["whole_split"] = identities(real_inputs_of(exp)(0), steps)
    with real_open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)
    print("DRIVER DONE")
    """
)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def bindings(data_dir):
    return [
        "get_strategy.name = 'multi_worker'",
        "get_strategy.collective_implementation = 'ring'",
        "dataset.name = 'cifar10_jpeg'",
        f"dataset.data_dir = '{data_dir}'",
        "dataset.train_split = 'train[:256]'",
        "dataset.eval_split = 'test[:128]'",
        "model.name = 'resnet32'",
        "model.mode = 'dhm'",
        "model.overrides = {'blocks_per_stage': 1, 'branch_blocks': 1}",
        "train.epochs = 2",
        "train.batch_size = 64",
        "train.seed = 0",
        "train.verbose = 0",
        "build_sgd.learning_rate = 0.05",
        "build_sgd.momentum = 0.9",
        "build_sgd.weight_decay = 1e-4",
    ]


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def run_workers(tmp_path, binding_list=None, attempt="", worker_env=None, expect=(0, 0)):
    """Starts two local workers of one run in tmp_path/model_dir and waits for
    both; `worker_env` {index: {variable: value}} adds to one worker's
    environment; `expect` is the exit codes required (None: any). Returns
    (model_dir, [each worker's output dir], exit codes, seconds)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    model_dir = tmp_path / "model_dir"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    procs, outs, logs = [], [], []
    started = time.monotonic()
    for index in range(2):
        out = tmp_path / f"worker{index}{attempt}"
        out.mkdir()
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "DHM_TEST_BINDINGS": json.dumps(binding_list or bindings(REPO_ROOT / "quickstart_data")),
            **(worker_env or {}).get(index, {}),
        }
        log = open(out / "log.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(driver), str(REPO_ROOT), str(model_dir), str(out)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        outs.append(out)
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            # One failed worker would leave the other waiting in a collective: stop early
            # (unless failures are expected: then the survivor must stop by itself).
            failed = any(p.poll() not in (None, 0) for p in procs)
            if time.monotonic() > deadline or (failed and expect is not None):
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    seconds = time.monotonic() - started
    codes = [p.returncode for p in procs]
    tails = "\n".join(f"--- worker {i} (rc {c}) ---\n" + (o / "log.txt").read_text()[-3000:]
                      for i, (c, o) in enumerate(zip(codes, outs)))
    if expect is not None:
        assert codes == list(expect), tails
    return model_dir, outs, codes, seconds


def test_two_workers_train_identically_and_only_the_chief_writes(tmp_path):
    model_dir, (chief_out, worker_out), _, _ = run_workers(tmp_path)
    chief = json.loads((chief_out / "report.json").read_text())
    worker = json.loads((worker_out / "report.json").read_text())
    assert chief["chief"] and not worker["chief"]

    # Identical weights on both workers, and equal to the chief's last checkpoint.
    final = [h5_arrays(out / "final.weights.h5") for out in (chief_out, worker_out)]
    checkpoint = h5_arrays(model_dir / "checkpoints" / "epoch_002.weights.h5")
    assert final[0].keys() == final[1].keys() == checkpoint.keys() and len(checkpoint) > 20
    for name in checkpoint:
        np.testing.assert_array_equal(final[0][name], final[1][name], err_msg=name)
        np.testing.assert_array_equal(final[0][name], checkpoint[name], err_msg=name)
    initial_moved = any(not np.allclose(v, 0) for v in checkpoint.values())
    assert initial_moved

    # The chief wrote the model directory; the other worker wrote nothing there.
    root = str(model_dir.resolve())
    inside = lambda path: os.path.realpath(path).startswith(root + os.sep)
    assert [p for p in worker["writes"] if inside(p)] == [], worker["writes"]
    assert worker["backup_dirs"] and not any(inside(p) for p in worker["backup_dirs"])
    assert not os.path.exists(worker["backup_dirs"][0])  # its backup is deleted after training
    assert chief["backup_dirs"] == [os.path.join(root, "backup")]
    assert any(p.startswith(os.path.join(root, "backup")) for p in chief["writes"])
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch_001.weights.h5", "epoch_002.weights.h5"]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["completed"] and results["epochs_completed"] == 2
    assert (model_dir / "export" / "1" / "saved_model.pb").exists()
    assert not (model_dir / "backup").exists()  # removed by BackupAndRestore at the end
