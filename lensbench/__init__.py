"""lensbench: probes for looking inside any Hugging Face causal LM."""

from .errors import AnatomyError, InputError, LensbenchError, ModelLoadError
from .model import Anatomy, LensModel, load

__version__ = "0.1.0"
__all__ = ["load", "LensModel", "Anatomy", "LensbenchError", "InputError", "AnatomyError", "ModelLoadError"]
