"""apo_jax: Anchored Preference Optimization, CLAIR and their family in JAX.

`import apo_jax` stays light: no TensorFlow, no datasets (GPU machines may lack them).
"""

from apo_jax import losses

__version__ = "0.1.0"
__all__ = ["losses"]
