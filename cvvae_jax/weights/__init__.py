"""Model files: PyTorch <-> Flax conversion, loading and saving whole models, inflation of image-VAE params."""
