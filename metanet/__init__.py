"""metanet: meta-learning task-specific neural networks.

Two generators are meta-learned end to end through MAML-style adaptation: one maps a task
to a soft architecture over a YAML-defined cell search space, the other (a VAE-style
hypernetwork) maps the task and that architecture to initial weights. For a new task,
``generate`` emits a real network: genotype, weights, a standalone ``nn.Module``, a graph.
"""

from .config import VERSION as __version__
from .executor import Plan, compile, forward, forward_genotype, init_params, run
from .graph import Genotype, discretise
from .meta import MetaNet, ModelConfig, evaluate, meta_loss
from .network import GeneratedNetwork, generate, load_generated
from .ops import OPS, register_op
from .space import SearchSpace, SpaceError, load, loads
from .trainer import TrainConfig, load_run, train

__all__ = [
    "OPS",
    "register_op",
    "SearchSpace",
    "SpaceError",
    "load",
    "loads",
    "Genotype",
    "discretise",
    "Plan",
    "compile",
    "forward",
    "forward_genotype",
    "run",
    "init_params",
    "MetaNet",
    "ModelConfig",
    "meta_loss",
    "evaluate",
    "TrainConfig",
    "train",
    "load_run",
    "GeneratedNetwork",
    "generate",
    "load_generated",
]
