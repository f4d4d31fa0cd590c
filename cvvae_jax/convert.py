"""The old path of `cvvae_jax.weights.convert` and `cvvae_jax.weights.torch_format` (kept for users' imports);
`python -m cvvae_jax.convert SRC OUT --to {torch,flax}` runs the conversion command line (`weights/cli.py`)."""
import sys

from cvvae_jax.models.registry import param_shapes as init_shapes
from cvvae_jax.weights.cli import main
from cvvae_jax.weights.convert import *  # noqa: F401,F403
from cvvae_jax.weights.convert import __all__ as _convert_all
from cvvae_jax.weights.torch_format import *  # noqa: F401,F403
from cvvae_jax.weights.torch_format import __all__ as _format_all

__all__ = [*_convert_all, *_format_all, "init_shapes", "main"]

if __name__ == "__main__":
  sys.exit(main())
