"""The cells of the compute-to-quality grid: objective x timestep strategy x accelerator.

A cell is a named bundle of config overrides. Objectives and accelerators need several keys set
together (a flow model needs ``model.learn_sigma=false`` and a flow sampler), so they are bundles
here rather than single search-space keys; the strategy is ``diffusion.timesteps.name`` (plus, for
the composed ones, ``diffusion.timesteps.weighting``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

BASELINE_CELL = "ddpm-uniform-none"  # the plain DiT recipe every cell is measured against


def objective_overrides(objective: str, ddpm_sampling_steps: int) -> Tuple[str, ...]:
    """Flow samples with Heun at half the steps: as many model calls as the DDPM sampler's steps."""
    if objective == "ddpm":
        return ()
    if objective == "flow":
        return ("diffusion.objective=flow", "model.learn_sigma=false", "sampling.sampler=heun",
                f"sampling.steps={max(1, (ddpm_sampling_steps + 1) // 2)}")
    raise ValueError(f"objective must be ddpm or flow, got {objective!r}")


ACCELERATORS: Dict[str, Tuple[str, ...]] = {
    "none": (),
    # TREAD-style: half the tokens skip the middle blocks (the first and last see every token).
    "routing": ("model.routing.fraction=0.5",),
    # LightningDiT's block changes.
    "modern": ("model.norm=rmsnorm", "model.mlp=swiglu", "model.qk_norm=true", "model.pos_embed=rope2d"),
}
ACCELERATORS["routing+modern"] = ACCELERATORS["routing"] + ACCELERATORS["modern"]

# Strategies spelled as "<sampling>+<weighting>" are composed (e.g. speed+learned).
def strategy_overrides(strategy: str) -> Tuple[str, ...]:
    if "+" in strategy:
        sampling, weighting = strategy.split("+", 1)
        return (f"diffusion.timesteps.name={sampling}", f"diffusion.timesteps.weighting={weighting}")
    return (f"diffusion.timesteps.name={strategy}",)


@dataclass(frozen=True)
class Cell:
    objective: str
    strategy: str
    accelerator: str

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.strategy}-{self.accelerator}"

    @property
    def run_name(self) -> str:
        """The name as a folder name ('+' of a composed strategy becomes '.')."""
        return self.name.replace("+", ".")

    @classmethod
    def from_run_name(cls, run_name: str) -> "Cell":
        """The cell of a folder named by ``run_name`` (its inverse)."""
        return cls.parse(run_name.replace(".", "+"))

    def overrides(self, ddpm_sampling_steps: int) -> List[str]:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {list(ACCELERATORS)}, got {self.accelerator!r}")
        return [*objective_overrides(self.objective, ddpm_sampling_steps), *strategy_overrides(self.strategy),
                *ACCELERATORS[self.accelerator]]

    @classmethod
    def parse(cls, name: str) -> "Cell":
        parts = name.split("-")
        if len(parts) != 3:
            raise ValueError(f"a cell is <objective>-<strategy>-<accelerator>, e.g. flow-speed-routing; got {name!r}")
        return cls(*parts)


def grid(objectives: Sequence[str], strategies: Sequence[str], accelerators: Sequence[str]) -> List[Cell]:
    """Every combination, the baseline cell first."""
    cells = [Cell(o, s, a) for o in objectives for s in strategies for a in accelerators]
    baseline = Cell.parse(BASELINE_CELL)
    return [baseline] + [c for c in cells if c != baseline]
