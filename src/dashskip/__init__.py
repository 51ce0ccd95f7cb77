"""dashskip: token-level dynamic layer skipping and mixed precision (DASH) for Hugging Face decoder LLMs."""

from dashskip.api import DashModel, apply, from_pretrained
from dashskip.backbone import Backbone
from dashskip.cache import KVRule
from dashskip.calibration import Calibration, calibrate
from dashskip.decisions import Decider, FixedStates, TokenStates
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.loading import ALIASES, load_model
from dashskip.states import State

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "Backbone",
    "Calibration",
    "DashModel",
    "DashskipError",
    "Decider",
    "Engine",
    "FixedStates",
    "KVRule",
    "State",
    "TokenStates",
    "apply",
    "calibrate",
    "from_pretrained",
    "load_model",
]
