"""`import megamem` makes AutoConfig / AutoModelForCausalLM know model_type "megamem" (no remote code).

Importing transformers' model machinery costs seconds, so `import megamem` does not: it registers
at once if transformers' auto classes are already imported, and otherwise when they are (an import
hook that wraps the loading of those two modules); the model class itself is imported on the first
lookup in AutoModelForCausalLM's mapping. `register()` does it all at once.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers import AutoConfig

    from .configuration import MODEL_TYPE, MegamemHFConfig

    AutoConfig.register(MODEL_TYPE, MegamemHFConfig, exist_ok=True)


def register_model() -> None:
    from transformers import AutoModelForCausalLM

    from .configuration import MegamemHFConfig
    from .modeling import MegamemForCausalLM

    register_config()
    AutoModelForCausalLM.register(MegamemHFConfig, MegamemForCausalLM, exist_ok=True)


def register() -> None:
    """Register now (imports transformers' auto classes)."""
    register_model()


class _PendingModel(dict):
    """AutoModelForCausalLM's extra mapping, which adds megamem's model class on its first lookup.

    Loading transformers' auto module (AutoTokenizer does) must not import the model machinery.
    """

    def _ready(self):
        if not getattr(self, "_done", False):
            self._done = True
            from .configuration import MegamemHFConfig
            from .modeling import MegamemForCausalLM

            dict.__setitem__(self, MegamemHFConfig, MegamemForCausalLM)

    def _reading(name):  # noqa: N805 - builds the methods below
        def method(self, *args, **kwargs):
            self._ready()
            return getattr(dict, name)(self, *args, **kwargs)
        return method

    for _name in ("__contains__", "__getitem__", "__iter__", "__len__", "get", "keys", "values", "items", "copy"):
        locals()[_name] = _reading(_name)
    del _name, _reading


def register_model_lazily() -> None:
    from transformers import AutoModelForCausalLM

    register_config()
    mapping = AutoModelForCausalLM._model_mapping
    if not isinstance(getattr(mapping, "_extra_content", None), dict):  # another transformers layout: eagerly
        register_model()
    elif not isinstance(mapping._extra_content, _PendingModel):
        mapping._extra_content = _PendingModel(mapping._extra_content)


_ACTIONS = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model_lazily}


class _AfterLoad(importlib.abc.Loader):
    def __init__(self, loader, action):
        self.loader, self.action = loader, action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        sys.modules[module.__name__] = module
        try:
            self.action()
        except ImportError:  # a partially imported transformers: megamem.hf.register.register() still works
            pass


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PENDING:
            return None
        _PENDING.discard(name)
        spec = importlib.util.find_spec(name)  # the other finders (this hook now passes on the name)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterLoad(spec.loader, _ACTIONS[name])
        return spec


_PENDING = set(_ACTIONS)


def install() -> None:
    """Register with whatever of transformers is imported; hook the rest."""
    for name, action in _ACTIONS.items():
        if name in sys.modules:
            _PENDING.discard(name)
            action()
    if _PENDING and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
