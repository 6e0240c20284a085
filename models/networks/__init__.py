"""The networks and losses of DAAD (Hou et al., ICCV 2021) and its baselines: plain ``nn.Module`` s
configured by a :class:`ModelConfig`, with no training logic."""
from .baseline import MeanImageGenerator
from .config import MEAN_IMAGE, MODEL_NAMES, ModelConfig, Variant, check_size, parse_model
from .detector import AnomalyDetector, Scores, fit_mean_image
from .discriminator import FEATURE_DIM, Discriminator
from .generator import Generator, GeneratorOutput
from .tiler import TiledDetector, Tiling

__all__ = ["FEATURE_DIM", "MEAN_IMAGE", "MODEL_NAMES", "AnomalyDetector", "Discriminator", "Generator",
           "GeneratorOutput", "MeanImageGenerator", "ModelConfig", "Scores", "TiledDetector", "Tiling", "Variant",
           "check_size", "fit_mean_image", "parse_model"]
