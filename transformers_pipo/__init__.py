"""transformers-pipo: Pair-In, Pair-Out decoding for any Hugging Face decoder-only LM.

Importing the package is cheap (no torch, no transformers): the public classes load on first use, and the PIPO
classes are registered with `AutoConfig` / `AutoModelForCausalLM` as soon as transformers is imported (now, when it
already is). So `import transformers_pipo` followed by `AutoModelForCausalLM.from_pretrained(pipo_folder)` works
without `trust_remote_code`, while `pipo --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "PipoConfig": "configuration_pipo",
    "PipoForCausalLM": "modeling_pipo",
    "PipoModel": "modeling_pipo",
    "PipoModelOutput": "modeling_pipo",
    "PipoPreTrainedModel": "modeling_pipo",
    "PipoCausalLMOutput": "modeling_pipo",
    "PipoGenerateOutput": "generation_pipo",
}
# Training classes load on first use, so importing the package never pulls in peft/trl.
_TRAINING_EXPORTS = ("PipoDataCollator", "PipoSFTConfig", "PipoSFTTrainer", "PipoOPDConfig", "PipoOPDTrainer")
_registered = False
_registering = False
_after_transformers: list = []  # callbacks waiting for transformers (see after_transformers_import)


def register_auto_classes() -> None:
    """Register `PipoConfig` / `PipoModel` / `PipoForCausalLM` with `AutoConfig` / `AutoModel` /
    `AutoModelForCausalLM` (idempotent)."""
    global _registered, _registering
    if _registered or _registering:
        return
    _registering = True
    try:
        _register()
    finally:
        _registering = False
    _registered = True
    _RegisterOnImport.uninstall()


def _register() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_pipo import PipoConfig
    from .modeling_pipo import PipoForCausalLM, PipoModel

    AutoConfig.register("pipo", PipoConfig, exist_ok=True)
    AutoModel.register(PipoConfig, PipoModel, exist_ok=True)
    AutoModelForCausalLM.register(PipoConfig, PipoForCausalLM, exist_ok=True)
    PipoConfig.register_for_auto_class()
    PipoForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _half_imported() -> bool:
    """True while a module of transformers or of this package is still executing (registering would re-enter it)."""
    for name, module in list(sys.modules.items()):
        if name == "transformers" or name.startswith(("transformers.", __name__ + ".")):
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return True
    return False


def after_transformers_import(callback) -> None:
    """Call `callback(transformers)` once transformers is fully imported: now if it is, else from the same import
    hook that registers the PIPO classes (before they are registered). The CLI quiets transformers this way without
    importing it for `pipo --help`."""
    module = sys.modules.get("transformers")
    if module is not None and not _half_imported():
        callback(module)
        return
    _after_transformers.append(callback)
    _RegisterOnImport.install()


def _register_when_ready() -> None:
    if "transformers" not in sys.modules or _half_imported():
        return
    while _after_transformers:
        _after_transformers.pop(0)(sys.modules["transformers"])
    if not _registered:
        register_auto_classes()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs `register_auto_classes` right after `transformers` (or a module of this package that imported it) has
    finished importing; removes itself once registration is done."""

    _installed: _RegisterOnImport | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module") or getattr(loader, "_pipo_wrapped", False):
            return spec
        original = loader.exec_module

        def exec_module(module, _original=original):
            _original(module)
            module.__spec__._initializing = False
            _register_when_ready()

        try:
            loader.exec_module = exec_module
            loader._pipo_wrapped = True
        except AttributeError:  # pragma: no cover  (a loader that refuses attributes: register lazily instead)
            pass
        return spec

    @classmethod
    def install(cls) -> None:
        if cls._installed is None:
            cls._installed = cls()
            sys.meta_path.insert(0, cls._installed)

    @classmethod
    def uninstall(cls) -> None:
        if cls._installed is not None:
            try:
                sys.meta_path.remove(cls._installed)
            except ValueError:  # pragma: no cover
                pass
            cls._installed = None


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        _register_when_ready()
        return getattr(module, name)
    if name in _TRAINING_EXPORTS:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "transformers" in sys.modules and not _half_imported():
    register_auto_classes()
else:
    _RegisterOnImport.install()


__all__ = [
    "PipoConfig",
    "PipoForCausalLM",
    "PipoModel",
    "PipoModelOutput",
    "PipoPreTrainedModel",
    "PipoCausalLMOutput",
    "PipoGenerateOutput",
    "register_auto_classes",
    "__version__",
]
