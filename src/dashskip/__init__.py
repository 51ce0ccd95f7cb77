"""dashskip: token-level dynamic layer skipping and mixed precision (DASH) for Hugging Face decoder LLMs."""

from dashskip.api import DashModel, DashOutput, apply, from_pretrained
from dashskip.core.cache import KVRule
from dashskip.core.decisions import Decider, FixedStates, TokenStates
from dashskip.core.states import State, StateSpec, register
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration, calibrate
from dashskip.models.backbone import Backbone
from dashskip.models.loading import ALIASES, load_model
from dashskip.runtime.engine import Engine
from dashskip.runtime.generation import GenerationConfig

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "Backbone",
    "Calibration",
    "DashModel",
    "DashOutput",
    "DashskipError",
    "Decider",
    "Engine",
    "FixedStates",
    "GenerationConfig",
    "KVRule",
    "State",
    "StateSpec",
    "TokenStates",
    "apply",
    "calibrate",
    "from_pretrained",
    "load_model",
    "register",
]
