"""SpeeD: timestep-aware diffusion transformer training."""
