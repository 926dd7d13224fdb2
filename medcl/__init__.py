"""medcl: contrastive pretraining of 2D/3D medical scan encoders, few-label evaluation, TensorBoard inspection.

Python API mirrors the CLI: medcl.pretrain(...), medcl.finetune(...), medcl.embed(...), medcl.evaluate(...), medcl.select(...),
medcl.predict(...), medcl.demo(...); medcl.load_classifier(FT_DIR).predict(paths_or_arrays) and
medcl.load_encoder(RUN_DIR)(tensor) for your own code.
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
    if name == "predict":
        from .predict import predict
        return predict
    if name == "load_classifier":
        from .predict import load_classifier
        return load_classifier
    if name == "load_encoder":
        from .encoders import open_encoder
        return open_encoder
    if name == "demo":
        from .demo import demo
        return demo
    raise AttributeError(name)
