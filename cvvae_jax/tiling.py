"""The old path of `cvvae_jax.inference.plan` and `cvvae_jax.inference.tiling` (kept for users' imports)."""
from cvvae_jax.inference.plan import *  # noqa: F401,F403
from cvvae_jax.inference.plan import __all__ as _plan_all
from cvvae_jax.inference.tiling import *  # noqa: F401,F403
from cvvae_jax.inference.tiling import __all__ as _tiling_all

__all__ = [*_plan_all, *_tiling_all]
