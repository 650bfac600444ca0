"""SiT's stochastic-interpolant transport: training losses and ODE/SDE samplers (willisma/SiT API)."""
from .path import DIFFUSION_FORMS, PATHS, TransportError
from .transport import LAST_STEPS, LOSS_WEIGHTS, PREDICTIONS, Sampler, Transport, create_transport
from .integrators import ODE_METHODS, SDE_METHODS

__all__ = ["create_transport", "Sampler", "Transport", "TransportError", "PATHS", "PREDICTIONS",
           "LOSS_WEIGHTS", "DIFFUSION_FORMS", "ODE_METHODS", "SDE_METHODS", "LAST_STEPS"]
