"""Task distributions: regression families and N-way K-shot image episodes.

Every distribution follows the ``TaskDistribution`` protocol and is registered in
``TASKS`` under the exact name a config uses; ``make_tasks(name, **kwargs)`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Episode, TaskDistribution, TaskError, _unknown, fixed_episodes
from .images import DEFAULT_DOMAINS, IMAGE_SPLITS, MINI_SPLITS, ImageFolder, ImageStore, MiniImageNet, MultiDomain, domain_folder, domain_name
from .omniglot import DEFAULT_VAL_ALPHABETS, SPLITS, Omniglot, default_data_root, shared_data_root
from .regression import FAMILY_NAMES, Multimodal, Sinusoid

__all__ = [
    "Episode",
    "TaskDistribution",
    "TaskError",
    "fixed_episodes",
    "Sinusoid",
    "Multimodal",
    "FAMILY_NAMES",
    "Omniglot",
    "SPLITS",
    "DEFAULT_VAL_ALPHABETS",
    "default_data_root",
    "shared_data_root",
    "ImageFolder",
    "ImageStore",
    "MiniImageNet",
    "MultiDomain",
    "IMAGE_SPLITS",
    "MINI_SPLITS",
    "DEFAULT_DOMAINS",
    "domain_folder",
    "domain_name",
    "TASKS",
    "register_tasks",
    "make_tasks",
]

TASKS: dict[str, Callable[..., TaskDistribution]] = {
    "sinusoid": Sinusoid,
    "multimodal": Multimodal,
    "omniglot": Omniglot,
    "miniimagenet": MiniImageNet,
    "images": ImageFolder,
    "multidomain": MultiDomain,
}

_T = TypeVar("_T", bound=Callable[..., TaskDistribution])


def register_tasks(name: str) -> Callable[[_T], _T]:
    """Register a task distribution class (or factory) under ``name`` in ``TASKS``."""

    def register(factory: _T) -> _T:
        if name in TASKS:
            raise TaskError(f"task distribution {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return register


def make_tasks(name: str, **kwargs: Any) -> TaskDistribution:
    """Build the task distribution registered as ``name`` with ``kwargs``."""
    if name not in TASKS:
        raise _unknown("task distribution", name, TASKS)
    return TASKS[name](**kwargs)
