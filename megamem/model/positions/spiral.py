"""π-Spiral: an additive embedding of the Weyl phase φ_n = 2π·frac(n·α), computed exactly.

Embedding (hidden_dim d even, no parameters), harmonics k = 1..d/2:
    e_n[k−1] = sqrt(2/d)·cos(k·φ_n),   e_n[d/2 + k−1] = sqrt(2/d)·sin(k·φ_n)      (‖e_n‖ = 1)
added to the token embeddings. frac(n·α) in float32 is 0.1 turns off at n = 10⁶ and float64 loses
digits too, so phases are fixed-point: frac(α) is held as a 93-bit integer A (three 31-bit limbs) and
frac(k·n·α) = ((k·(n·A mod 2^93)) mod 2^93) / 2^93, exact integer arithmetic in int64 limbs; only the
final 93-bit fraction is rounded to float64 (error < 2^−52 turns, plus n·2^−93 from A).
α: pi, e, sqrt2, phi (golden ratio), or prng: 93 bits drawn from random.Random(0) (reproducible).
"""
from __future__ import annotations

import math
import random
from typing import Tuple

import torch

from ...config import ModelConfig
from .registry import POSITIONS
from .base import PositionEncoding

BITS, LIMB = 93, 31
_MASK = (1 << LIMB) - 1


def _pi_fixed(bits: int) -> int:
    """floor(π·2^bits) by Machin's formula in integers (guard bits absorb the truncations)."""
    one = 1 << (bits + 32)

    def arctan_inv(x: int) -> int:
        total, term, k, sign = 0, one // x, 1, 1
        while term:
            total += sign * (term // k)
            term //= x * x
            k, sign = k + 2, -sign
        return total

    return (16 * arctan_inv(5) - 4 * arctan_inv(239)) >> 32


def _e_fixed(bits: int) -> int:
    one, total, term, k = 1 << (bits + 32), 0, 1 << (bits + 32), 1
    while term:
        total, term, k = total + term, term // k, k + 1
    return total >> 32


def irrational_fraction(name: str, bits: int = BITS) -> int:
    """floor(frac(α)·2^bits) for α named by model.pos_encoding.irrational."""
    if name == "pi":
        whole = _pi_fixed(bits)
    elif name == "e":
        whole = _e_fixed(bits)
    elif name == "sqrt2":
        whole = math.isqrt(2 << (2 * bits))
    elif name == "phi":
        whole = ((1 << bits) + math.isqrt(5 << (2 * bits))) >> 1
    elif name == "prng":
        whole = random.Random(0).getrandbits(bits)
    else:
        raise ValueError(f"model.pos_encoding.irrational {name!r}; valid: pi, e, sqrt2, phi, prng")
    return whole & ((1 << bits) - 1)


def _limbs(value: int, device=None) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.tensor((value >> (LIMB * i)) & _MASK, dtype=torch.int64, device=device) for i in range(3))


def mulmod(x: torch.Tensor, limbs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """(x · L) mod 2^93 for int64 x in [0, 2^31) and L in 31-bit limbs (low first); no int64 overflow."""
    out, carry = [], torch.zeros((), dtype=torch.int64, device=x.device)
    for limb in limbs:
        t = x * limb + carry  # < 2^62 + 2^32
        out.append(t & _MASK)
        carry = t >> LIMB
    return tuple(out)


def limbs_to_turns(limbs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A 93-bit fraction in limbs → float64 turns in [0, 1)."""
    low, mid, high = (t.double() for t in limbs)
    return high * 2.0 ** -31 + mid * 2.0 ** -62 + low * 2.0 ** -93


def check_positions(positions: torch.Tensor) -> None:
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= 2 ** 31):
        raise ValueError("pi_spiral phases are exact for positions in [0, 2^31) only")


def weyl_turns(positions: torch.Tensor, fraction: int, harmonics: int = 1) -> torch.Tensor:
    """frac(k·n·α) in float64, [S, harmonics] for k = 1..harmonics (fraction = floor(frac(α)·2^93))."""
    check_positions(positions)
    phase = mulmod(positions.long()[:, None], _limbs(fraction, positions.device))
    k = torch.arange(1, harmonics + 1, dtype=torch.int64, device=positions.device)[None, :]
    return limbs_to_turns(mulmod(k, phase))


def spiral_embedding(positions: torch.Tensor, fraction: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[S, dim]: sqrt(2/dim)·[cos(k·φ_n) for k = 1..dim/2, sin(k·φ_n) for k = 1..dim/2]."""
    angle = 2 * math.pi * weyl_turns(positions, fraction, dim // 2)
    return (math.sqrt(2.0 / dim) * torch.cat((angle.cos(), angle.sin()), dim=-1)).to(dtype)


@POSITIONS.register("pi_spiral")
class SpiralPositions(PositionEncoding):
    """The spiral embedding alone (no rotation, no bias); no parameters and no buffers to rebuild."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        self.dim = model.hidden_dim
        self.fraction = irrational_fraction(model.pos_encoding.irrational or "pi")

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + spiral_embedding(positions, self.fraction, self.dim, x.dtype)
