"""No positional encoding (NoPE): causal attention alone orders the tokens."""
from ...config import ModelConfig
from .registry import POSITIONS
from .base import PositionEncoding


@POSITIONS.register("none")
class NoPositions(PositionEncoding):
    def __init__(self, model: ModelConfig):
        super().__init__()
