"""The reward and heatmap registries: names to factories, and resolving ``module:callable`` / ``file.py:callable``
specs. This module is a leaf: the built-ins (:mod:`fnf.rewards`) and the public reward models
(:mod:`fnf.reward_models`) are registered into it explicitly by :mod:`fnf.rewards`; user code may register its own
with :func:`register_reward` / :func:`register_heatmap`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Callable, Protocol, runtime_checkable

import torch

from .core import SpecError

__all__ = ["HEATMAPS", "HEATMAP_LOADERS", "REWARDS", "Reward", "SpecError", "load_object", "register_heatmap",
           "register_heatmap_loader", "register_reward"]


@runtime_checkable
class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


REWARDS: dict[str, Callable[..., Reward]] = {}
HEATMAPS: dict[str, Callable[..., Callable]] = {}


def register_reward(name: str, factory: Callable | None = None):
    """``register_reward("name", factory)``, or the decorator ``@register_reward("name")``, for a factory
    ``(**kwargs) -> reward`` (its optional ``factory.check(**kwargs)`` runs in preflight)."""
    def wrap(factory):
        REWARDS[name] = factory
        return factory
    return wrap if factory is None else wrap(factory)


def register_heatmap(name: str, factory: Callable | None = None):
    """As :func:`register_reward`, for a heatmap model factory ``(**kwargs) -> images -> (B, H, W)``."""
    def wrap(factory):
        HEATMAPS[name] = factory
        return factory
    return wrap if factory is None else wrap(factory)


HEATMAP_LOADERS: dict[str, tuple[Callable, Callable]] = {}


def register_heatmap_loader(prefix: str, loader: Callable, check: Callable) -> None:
    """The heatmap spec ``PREFIX:PATH`` builds ``loader(PATH, **kwargs)``; preflight runs ``check(PATH, **kwargs)``."""
    HEATMAP_LOADERS[prefix] = (loader, check)


# ------------------------------------------------------------------------------------------ loading
def load_object(spec: str, what: str = "reward"):
    """Resolve ``module:attr`` or ``file.py:attr`` to the object, with errors that say what went wrong."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"bad {what} spec {spec!r}: expected a registered name, 'module:callable' "
                        "or 'path/to/file.py:callable'")
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise SpecError(f"bad {what} spec {spec!r}: both sides of ':' must be non-empty")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise SpecError(f"bad {what} spec {spec!r}: file {target!r} does not exist")
        name = f"fnf_user_{abs(hash(path))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            del sys.modules[name]
            raise SpecError(f"bad {what} spec {spec!r}: executing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SpecError(f"bad {what} spec {spec!r}: cannot import module {target!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"bad {what} spec {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"bad {what} spec {spec!r}: {attr!r} is not callable")
    return obj


def _is_factory(obj) -> bool:
    """A callable that takes no required arguments and cannot take (images, prompts) builds the reward."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind()
    except TypeError:
        return False
    try:
        sig.bind(None, None)
    except TypeError:
        return True
    return False


def _instantiate(obj, kwargs: dict, spec: str, what: str):
    try:
        if inspect.isclass(obj) or kwargs or _is_factory(obj):
            return obj(**kwargs)
    except TypeError as e:
        raise SpecError(f"{what} {spec!r} does not accept kwargs {sorted(kwargs)}: {e}") from e
    return obj


def _check_call(obj, kwargs: dict, spec: str, what: str) -> None:
    """Would :func:`_instantiate` accept ``kwargs``? Binds them to the signature (nothing is built) and runs the
    factory's own cheap ``check(**kwargs)`` when it has one (e.g. that a checkpoint file exists)."""
    if not (inspect.isclass(obj) or kwargs or _is_factory(obj)):
        return
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as e:
        raise SpecError(f"{what} {spec!r} does not accept kwargs {sorted(kwargs)}: {e}") from None
    except ValueError:  # no signature (builtins): nothing to check
        pass
    check = getattr(obj, "check", None)
    if callable(check) and not inspect.isclass(obj):
        check(**kwargs)


def _check_spec(spec: str, kwargs: dict, registry: dict, what: str) -> None:
    if spec in registry:
        _check_call(registry[spec], kwargs, spec, what)
        return
    if ":" not in spec:
        raise SpecError(f"unknown {what} {spec!r}: expected one of {', '.join(sorted(registry))}, "
                        "'module:callable' or 'path/to/file.py:callable'")
    _check_call(load_object(spec, what), kwargs, spec, what)
