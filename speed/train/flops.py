"""Training FLOPs per image, counted once per run with ``torch.utils.flop_counter``.

The count is of one micro-batch's forward and backward pass through the model of the run's
config (with its token routing, and REPA's encoder forward and projector when on), on the meta
device: shapes only, no memory and no arithmetic, so it costs nothing even for DiT-XL. On meta
tensors PyTorch's attention kernels are counted too (the CPU kernel is not). What is counted are
the matrix products (linear, convolution, attention), the FLOPs that dominate and that papers
report; elementwise work is left out. Strategies are then compared by compute, not by steps.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from speed.models.registry import ModelDescription
from speed.models.repa import RepaAligner
from speed.models.routing import TokenRouter


def train_flops_per_image(description: ModelDescription, *, batch_size: int,
                          router: Optional[TokenRouter] = None, aligner: Optional[RepaAligner] = None,
                          image_shape: Optional[Tuple[int, int, int]] = None) -> float:
    """FLOPs of one training forward + backward, divided by ``batch_size``.

    ``aligner`` must be built on the meta device (``RepaAligner.build(..., device="meta")``);
    ``image_shape`` is the clean image its encoder sees (default: the model's input).
    """
    model = description.build(device="meta").train()
    n = batch_size
    shape = (description.in_channels, description.input_size, description.input_size)
    x = torch.zeros((n, *shape), device="meta")
    t = torch.zeros(n, dtype=torch.long, device="meta")
    y = torch.zeros(n, dtype=torch.long, device="meta")
    kwargs = {"drop_mask": torch.zeros(n, dtype=torch.bool, device="meta")}
    if router is not None and router.enabled:
        kwargs["route"] = router.route(router.draw(0, 0, n).to("meta"))
    with FlopCounterMode(display=False) as counter:
        if aligner is None:
            out = model(x, t, y, **kwargs)
            loss = out.float().square().mean()
        else:
            target = aligner.target(torch.zeros((n, *(image_shape or shape)), device="meta"))
            out, hidden, keep = model(x, t, y, capture_block=aligner.block, **kwargs)
            loss = out.float().square().mean() + aligner.loss(hidden, target, keep).mean()
        loss.backward()
    return counter.get_total_flops() / n
