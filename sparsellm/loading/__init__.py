from .adapters import Adapter, get_adapter, SUPPORTED_MODEL_TYPES
from .models import LoadedModel, load_model, resolve_model

__all__ = ["Adapter", "get_adapter", "SUPPORTED_MODEL_TYPES", "LoadedModel", "load_model", "resolve_model"]
