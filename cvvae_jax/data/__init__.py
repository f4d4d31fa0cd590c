"""The input pipeline: folders or TFDS of videos and images -> `{"video": float32 [B, T, H, W, 3] in [-1, 1]}`.

Entry points:
  create_train_iterator(config, seed=..., start_step=...)   mixed, per-host, resumable training batches
  create_eval_iterator(config)                               centre-cropped eval clips with their paths
  prepare_embedded_dataset(data_dir)                         the built-in real data (offline)
  prepare_folder(kind, folder, data_dir)                     a user folder -> TFDS (array_record)
  DataStats                                                  skipped inputs, fallbacks, throughput

Using your own data (config = `cvvae_jax/data/config.py`, under `config.data` in the trainer):

1. Quick start, reading folders directly (files are probed once into an index, reused and updated on later
   starts: see index.py):
     --config.data.streams.video.source=folder --config.data.streams.video.path=/data/videos
     --config.data.streams.image.source=folder --config.data.streams.image.path=/data/images
   Folders are searched recursively. Videos: mp4, m4v, mov, webm, mkv, avi, mpg, mpeg, ogv, wmv,
   flv, 3gp, ts (anything PyAV decodes). Images: jpg, jpeg, png, webp, bmp, tif, tiff in any
   mode (grayscale, palette, alpha over white, CMYK, 16-bit; EXIF orientation applied: see images.py).
2. Prepare once, then train from TFDS (recommended for large sets and pods; no probing at start):
     python -m cvvae_jax.data.prepare --kind=video --data=/data/videos --data_dir=/data/tfds/videos
     python -m cvvae_jax.data.prepare --kind=image --data=/data/images --data_dir=/data/tfds/images
   (or `tfds build cvvae_video_folder --imports=cvvae_jax.data.builders --manual_dir=/data/videos
   --data_dir=/data/tfds/videos --file_format=array_record`, which also needs apache-beam), then
     --config.data.streams.video.source=tfds --config.data.streams.video.tfds_name=cvvae_video_folder
     --config.data.streams.video.data_dir=/data/tfds/videos      (same for image)
   A folder and its TFDS copy give the same batches. Any TFDS image dataset also works as an image
   stream: tfds_name=coco/2017, data_key=image.
3. Shapes and mix: streams.<name>.frames / stride / size / short_side / crop / batch_size (global)
   / weight, config.mixing ("alternate" or "weighted"). More streams (e.g. the paper's 9x256^2 and
   17x192^2 videos, 256^2 and 512^2 images) are more entries under config.streams.
4. Evaluation: config.eval (defaults: 33 frames at stride 3, short side 256, centre crop 256x256).

Bad inputs (unreadable, truncated or empty files, wrong extensions, float images, videos
too short even at stride 1) are skipped, counted in DataStats and logged once with their path;
a missing folder, an empty dataset or an unset path is an error at start-up.
"""

from cvvae_jax.data.builders import prepare_folder
from cvvae_jax.data.embedded import prepare_embedded_dataset
from cvvae_jax.data.media import BadInput
from cvvae_jax.data.mixing import MixingSchedule
from cvvae_jax.data.pipeline import EvalData, TrainIterator, create_eval_iterator, create_train_iterator
from cvvae_jax.data.sampling import ClipSpec
from cvvae_jax.data.stats import DataStats

__all__ = ["BadInput", "ClipSpec", "DataStats", "EvalData", "MixingSchedule", "TrainIterator",
           "create_eval_iterator", "create_train_iterator", "prepare_embedded_dataset", "prepare_folder"]
