"""Timestep respacing (IDDPM): run a diffusion on a subset of the original steps."""

from typing import Iterable, List, Set, Union

import numpy as np
import torch

from .gaussian import GaussianDiffusion, get_beta_schedule


def _ddim_steps(num_timesteps: int, desired: int) -> Set[int]:
    """Evenly strided steps 0, s, 2s, ... with exactly `desired` entries."""
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"section_counts 'ddim{desired}': no integer stride gives exactly {desired} of {num_timesteps} steps"
    )


def _section_steps(start: int, size: int, count: int) -> List[int]:
    """`count` steps spread evenly over [start, start + size), including both ends."""
    if count > size:
        raise ValueError(f"section_counts: cannot take {count} steps from a section of {size}")
    if count <= 1:
        return [start] if count == 1 else []
    stride = (size - 1) / (count - 1)
    return [start + round(i * stride) for i in range(count)]


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Iterable[int]]) -> Set[int]:
    """Which original steps to keep.

    section_counts: "" or None (all steps), "250" (250 evenly spread steps), "ddim50" (a fixed
    stride giving exactly 50 steps), or "10,15,20" (split [0, T) into 3 equal sections and take
    10, 15 and 20 evenly spaced steps from them). Ints and lists of ints work like the strings.
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"section_counts must look like 'ddimN', got {section_counts!r}") from None
            return _ddim_steps(num_timesteps, desired)
        try:
            counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                "section_counts must be '', 'N', 'ddimN' or a comma list like '10,15,20'; "
                f"got {section_counts!r}"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"section_counts must be non-negative, got {section_counts!r}")

    base_size, extra = divmod(num_timesteps, len(counts))
    kept: List[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base_size + (1 if i < extra else 0)  # earlier sections absorb the remainder
        kept += _section_steps(start, size, count)
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps of a base schedule.

    Betas are recomputed so alpha_bar at each kept step equals the base alpha_bar there
    (beta_i = 1 - abar_i / abar_prev_kept). The model is always called with the ORIGINAL step
    indices via ``timestep_map``.
    """

    def __init__(self, use_timesteps: Iterable[int], betas, learn_sigma: bool = True):
        base_betas = np.asarray(betas, dtype=np.float64)
        self.original_num_timesteps = int(base_betas.shape[0])
        self.use_timesteps = sorted(set(int(s) for s in use_timesteps))
        if not self.use_timesteps:
            raise ValueError("use_timesteps must keep at least one step")
        if self.use_timesteps[0] < 0 or self.use_timesteps[-1] >= self.original_num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.original_num_timesteps - 1}], "
                f"got {self.use_timesteps[0]}..{self.use_timesteps[-1]}"
            )
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept_alphas_cumprod = base_alphas_cumprod[self.use_timesteps]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(1.0 - kept_alphas_cumprod / previous, learn_sigma=learn_sigma)
        self.timestep_map = torch.tensor(self.use_timesteps, dtype=torch.long)


def create_diffusion(
    num_timesteps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    timestep_respacing: Union[str, int, Iterable[int], None] = "",
) -> GaussianDiffusion:
    """A GaussianDiffusion, or a SpacedDiffusion when ``timestep_respacing`` keeps fewer steps."""
    betas = get_beta_schedule(schedule, num_timesteps)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    if len(kept) == num_timesteps:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    return SpacedDiffusion(kept, betas, learn_sigma=learn_sigma)
