"""detrax: DETR (End-to-End Object Detection with Transformers) in JAX and Flax NNX."""

from detrax.api import Detector, load
from detrax.config import presets
from detrax.config.schema import Config, ModelConfig
from detrax.criterion.loss import set_loss
from detrax.models.detr import DETR
from detrax.serving import export
from detrax.serving.postprocess import postprocess

__all__ = ["DETR", "Config", "Detector", "ModelConfig", "export", "load", "postprocess", "presets", "set_loss"]
__version__ = "0.1.0"
