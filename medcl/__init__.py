"""medcl: contrastive pretraining of 2D/3D medical scan encoders, few-label evaluation, TensorBoard inspection.

Python API mirrors the CLI: medcl.pretrain(...), medcl.finetune(...), medcl.embed(...), medcl.evaluate(...),
medcl.select(...), medcl.predict(...), medcl.export(...), medcl.demo(...);
medcl.Task(positive=..., operating_point=...) says which classes are diseased (finetune, evaluate);
medcl.load_classifier(FT_DIR).predict(paths_or_arrays) and medcl.load_encoder(RUN_DIR)(tensor) for your own code.
"""
import logging as _logging
import sys as _sys
import types as _types

__version__ = "0.1.0"
# MONAI warns at import time about an optional GPU DICOM codec we do not use
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)


# the public API, imported on first use so that `import medcl` stays cheap: name -> (module, attribute)
_API = {"pretrain": ("train", "pretrain"), "finetune": ("finetune", "finetune"), "embed": ("embed", "embed"),
        "evaluate": ("evaluate", "evaluate"), "select": ("select", "select_scans"), "predict": ("predict", "predict"),
        "export": ("export", "export_classifier"), "load_classifier": ("predict", "load_classifier"),
        "load_encoder": ("encoders", "open_encoder"), "demo": ("demo", "demo"), "Task": ("data.labels", "Task")}


def __getattr__(name):
    if name not in _API:
        raise AttributeError(name)
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


class _Package(_types.ModuleType):
    """Importing a submodule sets it as an attribute of its package: once medcl.finetune (the module) was loaded,
    medcl.finetune would be the module, not the function. The API's names stay functions; reach the modules with
    `from medcl.finetune import ...`."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
