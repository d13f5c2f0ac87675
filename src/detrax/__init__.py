"""detrax: DETR (End-to-End Object Detection with Transformers) in JAX and Flax NNX."""

from detrax.api import Detector, load
from detrax.configs import Config, ModelConfig
from detrax.loss import set_loss
from detrax.model import DETR
from detrax.postprocess import postprocess

__all__ = ["DETR", "Config", "Detector", "ModelConfig", "load", "postprocess", "set_loss"]
__version__ = "0.1.0"
