"""medcl: contrastive pretraining of 2D/3D medical scan encoders, few-label evaluation, TensorBoard inspection.

Python API mirrors the CLI: medcl.pretrain(...), medcl.finetune(...), medcl.embed(...), medcl.evaluate(...), medcl.select(...),
medcl.demo(...).
"""
import logging as _logging

__version__ = "0.1.0"
# MONAI warns at import time about an optional GPU DICOM codec we do not use
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)


def __getattr__(name):  # lazy: importing medcl stays cheap
    if name == "pretrain":
        from .train import pretrain
        return pretrain
    if name == "finetune":
        from .finetune import finetune
        return finetune
    if name == "embed":
        from .embed import embed
        return embed
    if name == "evaluate":
        from .evaluate import evaluate
        return evaluate
    if name == "select":
        from .select import select_scans
        return select_scans
    if name == "demo":
        from .demo import demo
        return demo
    raise AttributeError(name)
