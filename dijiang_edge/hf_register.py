"""``import dijiang_edge`` registers the ``dijiang`` model type with transformers' Auto
classes, without importing transformers or torch itself.

Registering needs the config and model classes, and those import transformers and
torch (about 10 s on a small machine, and the ONNX runtime path has no torch at all).
So ``install`` only adds a finder to ``sys.meta_path`` that waits for transformers'
own Auto modules: right after ``transformers.models.auto.configuration_auto`` has run
(``AutoConfig``) the config is registered, and right after ``modeling_auto``
(``AutoModelForCausalLM``, ``pipeline``) the model: ``AutoConfig.register`` and
``AutoModelForCausalLM.register``, in-process, no ``trust_remote_code``.  Where those
modules are loaded already, registering happens at once.  The cost of the import
itself stays a few file lookups.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Callable, Sequence

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"


def register_config(auto: ModuleType) -> None:
    from .hf_config import MODEL_TYPE, DiJiangConfig
    auto.AutoConfig.register(MODEL_TYPE, DiJiangConfig, exist_ok=True)


def register_model(auto: ModuleType) -> None:
    from .hf_config import DiJiangConfig
    from .hf_model import DiJiangHFForCausalLM
    auto.AutoModelForCausalLM.register(DiJiangConfig, DiJiangHFForCausalLM, exist_ok=True)


HOOKS: dict[str, Callable[[ModuleType], None]] = {CONFIG_MODULE: register_config, MODEL_MODULE: register_model}


def _run(hook: Callable[[ModuleType], None], module: ModuleType) -> None:
    """A registration that fails (e.g. a transformers without the linear-attention cache
    layers) must not break the user's import of transformers: one warning instead."""
    try:
        hook(module)
    except Exception as e:       # whatever the installed transformers raises
        warnings.warn(f"dijiang_edge: could not register the 'dijiang' model type with transformers "
                      f"({type(e).__name__}: {str(e)[:160]})", stacklevel=2)


class AfterImport:
    """A ``sys.meta_path`` finder that finds nothing itself: for the named modules it
    takes the spec the other finders give and runs a hook once the module has executed."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]):
        self.hooks = dict(hooks)

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            hook = self.hooks.pop(name, None)
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)
            if hook is not None:
                _run(hook, module)

        spec.loader.exec_module = exec_module      # this spec's own loader instance
        return spec


def _installed(name: str) -> bool:
    """``find_spec`` that counts a finder's ImportError (one that blocks the module, as a
    test that hides torch does) as "not installed"."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install() -> None:
    """Register now what transformers has loaded, and the rest when it loads it; nothing
    without both transformers and torch installed."""
    if any(f.__class__.__name__ == AfterImport.__name__ for f in sys.meta_path):
        return
    if not (_installed("transformers") and _installed("torch")):
        return
    pending = {}
    for name, hook in HOOKS.items():
        if name in sys.modules:
            _run(hook, sys.modules[name])
        else:
            pending[name] = hook
    if pending:
        sys.meta_path.insert(0, AfterImport(pending))
