"""The kinds of problem a DHM run can solve, registered by name.

Importing this package registers the built-in tasks with
`official.core.task_factory`; `task.name` in Gin picks one. A new task is a
subclass of `ImageClassificationTask` (or of `official.core.base_task.Task`)
decorated with `@task_factory.register_task("name")`, in any module the Gin
file imports: the trainer needs no change.
"""

from dhm_keras.tasks.image_classification import ImageClassificationTask
from dhm_keras.tasks.person_reid import PersonReidTask
from official.core import task_factory


def get_task(config):
    """The task instance `config.task.name` names, configured by `config`."""
    return task_factory.get_task_cls(config.task.name)(config)


__all__ = ["ImageClassificationTask", "PersonReidTask", "get_task"]
