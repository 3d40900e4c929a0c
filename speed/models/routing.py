"""Token routing (TREAD, arXiv 2501.04765): during training, per sample, a random share of the
tokens skips a span of blocks and is put back in place after it.

The draw is one CPU generator per step (stream ``routing``, keyed by the step) over the whole
global batch; each rank takes its rows by global sample index, like the noise. So a resumed run
routes exactly as an uninterrupted one, and the routing does not depend on the world size.

The model only applies a ``Route`` in training mode: evaluation, sampling and export always see
every token. The number of kept tokens is the same for every sample, so shapes stay static
(``torch.compile`` sees two token counts: all, and kept).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from speed import seeding


class Route(NamedTuple):
    """Tokens ``keep`` [N, K] (sorted indices into the T tokens) go through blocks
    ``start`` .. ``end - 1``; the others wait and rejoin before block ``end``."""

    keep: torch.Tensor
    start: int
    end: int


def resolve_span(start_block: Optional[int], end_block: Optional[int], depth: int) -> Tuple[int, int]:
    """The routed blocks [start, end) of a ``depth``-block model; unset ends leave the first and
    the last block with every token where the depth allows."""
    start = min(1, depth - 1) if start_block is None else start_block
    end = max(depth - 1, start + 1) if end_block is None else end_block
    if not 0 <= start < end <= depth:
        raise ValueError(
            f"model.routing.start_block={start} and model.routing.end_block={end} do not give a span of blocks of "
            f"this {depth}-block model; need 0 <= start_block < end_block <= {depth}"
        )
    return start, end


def num_kept(num_tokens: int, fraction: float) -> int:
    """Tokens that go through the routed span: all but round(fraction * T), at least one."""
    return max(1, num_tokens - int(round(fraction * num_tokens)))


class TokenRouter:
    """Draws the routes of a step; ``enabled`` is False when ``fraction`` is 0."""

    def __init__(self, fraction: float, start_block: Optional[int], end_block: Optional[int], depth: int,
                 num_tokens: int):
        self.fraction = float(fraction)
        self.enabled = self.fraction > 0
        self.num_tokens = num_tokens
        self.start, self.end = resolve_span(start_block, end_block, depth) if self.enabled else (0, 0)
        self.kept = num_kept(num_tokens, self.fraction) if self.enabled else num_tokens

    @classmethod
    def from_config(cls, routing, depth: int, num_tokens: int) -> "TokenRouter":
        """From a ``model.routing`` section (``RoutingConfig``)."""
        return cls(routing.fraction, routing.start_block, routing.end_block, depth, num_tokens)

    def draw(self, seed: int, step: int, global_batch: int) -> torch.Tensor:
        """Kept-token indices [B, K] of the whole global batch (CPU, sorted per row)."""
        return draw_keep(global_batch, self.num_tokens, self.kept, seeding.generator(seed, "routing", step))

    def route(self, keep: torch.Tensor) -> Route:
        return Route(keep, self.start, self.end)


def draw_keep(batch: int, num_tokens: int, kept: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random subset of ``kept`` of ``num_tokens`` tokens per row, sorted: [batch, kept]."""
    scores = torch.rand(batch, num_tokens, generator=generator)  # [B, T]
    return scores.argsort(dim=1)[:, :kept].sort(dim=1).values  # [B, K]


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [N, T, D], keep [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, kept: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Put the processed ``kept`` [N, K, D] back at ``keep`` into ``full`` [N, T, D] (out of place)."""
    return full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept.to(full.dtype))
