"""The training configs (`configs/*.py`) state every loss weight: none falls back to a dataclass default unseen."""
import dataclasses

import pytest

from configs import cvvae as cvvae_config
from configs import image_vae as image_vae_config
from cvvae_jax.train import losses

ARGS = ["sd21", "sd3", "sd21,demo", "sd3,demo"]


@pytest.mark.parametrize("module", [cvvae_config, image_vae_config], ids=["cvvae", "image_vae"])
@pytest.mark.parametrize("arg", ARGS)
def test_config_states_every_loss_weight(module, arg):
  loss = module.get_config(arg).loss
  fields = {f.name for f in dataclasses.fields(losses.LossWeights)}
  assert set(loss.keys()) == fields, (sorted(fields - set(loss.keys())), sorted(set(loss.keys()) - fields))
  losses.LossWeights(**loss)  # and the values pass its checks


def test_demo_recipe_is_l1_without_gan():
  """The demo trains both stages on L1 alone (README, quick start); the full recipe keeps LPIPS and the GAN."""
  for module in (cvvae_config, image_vae_config):
    demo, full = module.get_config("demo"), module.get_config("")
    assert demo.loss.perceptual_weight == 0.0 and demo.loss.disc_start > demo.train.num_steps
    assert full.loss.perceptual_weight == 0.5 and full.loss.disc_start < full.train.num_steps
  assert cvvae_config.get_config("demo").loss.reg_decoder_weight == 1.0  # the image-VAE regularizer stays on
