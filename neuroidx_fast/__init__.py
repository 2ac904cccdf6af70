"""neuroidx_fast: index what the units of a trained CNN respond to, fast.

Low-level ops (stable API for other tools): ``neuroidx_fast.ops.spatial_reduce`` and ``TopK``.
SPEC.md defines every number; ``neuroidx_fast.backends`` says which implementation runs.
"""

from ._version import __version__
from .topk import TopK
from . import ops
from .ops import spatial_reduce
from .neuron_index import LayerIndex, NeuronIndex
from .indexing import index_dataset
from .receptive_fields import ReceptiveField, receptive_field
from . import models
from .features import NeuronFeatures, neuron_features, save_grid, save_unit
from .color import color_selectivity

__all__ = ["__version__", "TopK", "ops", "spatial_reduce", "LayerIndex", "NeuronIndex", "index_dataset",
           "ReceptiveField", "receptive_field", "models", "NeuronFeatures", "neuron_features", "save_grid",
           "save_unit", "color_selectivity"]
