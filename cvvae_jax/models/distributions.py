"""The diagonal Gaussian posterior of a VAE encoder."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@flax.struct.dataclass
class DiagonalGaussian:
  """q(z | x) = N(mean, exp(logvar)), elementwise. A pytree, so it can leave `jit` and `apply`.

  `mean` and `logvar` have the latent's shape, e.g. `[B, 1 + k, h, w, C]` for video or `[B, h, w, C]` for
  images. `logvar` is clamped to [-30, 20] as in the original.
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits encoder moments `[..., 2C]` into mean (first C channels) and log-variance (last C)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """A reparameterised sample mean + std * eps, eps ~ N(0, I)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over every non-batch axis: `[B]`."""
    kl = 0.5 * (jnp.square(self.mean) + self.var - 1.0 - self.logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))
