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
from .data import Shapes, Digits
from .selectivity import class_selectivity, class_selectivity_morcos, top_image_labels
from .table import neuron_table, save_table, load_table
from .train import train_classifier, evaluate_classifier
from . import plots
from .maximization import maximize, maximize_towards, unit_activations, save_maximized, TowardsResult
from .clustering import cluster_units, cluster_categories, Clusters
from .contributions import contributions, Contributions
from .ablation import AblationResult, ablation_drops, ablation_correlations, naive_ablation_counts

__all__ = ["__version__", "TopK", "ops", "spatial_reduce", "LayerIndex", "NeuronIndex", "index_dataset",
           "ReceptiveField", "receptive_field", "models", "NeuronFeatures", "neuron_features", "save_grid",
           "save_unit", "color_selectivity", "Shapes", "Digits", "class_selectivity", "class_selectivity_morcos",
           "top_image_labels", "neuron_table", "save_table", "load_table", "train_classifier", "evaluate_classifier",
           "plots", "maximize", "maximize_towards", "unit_activations", "save_maximized", "TowardsResult",
           "cluster_units", "cluster_categories", "Clusters", "contributions", "Contributions",
           "AblationResult", "ablation_drops", "ablation_correlations", "naive_ablation_counts"]
