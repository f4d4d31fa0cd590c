"""Conventions every command line shares: one flag name for one thing, and `error: ...` for a user's mistake.

The commands (`cvvae-train`, `cvvae-eval`, `cvvae-reconstruct`, `cvvae-convert`, `cvvae-prepare`) name the same
things alike: `--model` (anything `load_pretrained` reads), `--data`, `--out`, `--frames`, `--stride`,
`--resolution` (S for SxS, or HxW), `--dtype`, `--conv_impl`, and the tiling flags `--tiling --tile --chunk
--overlap` (defined with their defaults next to `TilingConfig`, `inference.plan.add_tiling_arguments`). A user
error (a bad value, a missing or unreadable file) ends the command with one line `error: ...` on stderr and a
non-zero exit status (2; a training run 1, as schedulers read a failed job), not a traceback; set `CVVAE_DEBUG=1` to
see the traceback.
"""
from __future__ import annotations

import argparse
import logging as std_logging
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np
from absl import flags, logging

# What a user can cause: bad values and paths (ValueError covers every checked input of the library, e.g.
# ConversionError, EvaluationError, BadInput), and missing, unreadable or unwritable files (OSError).
USER_ERRORS = (ValueError, OSError)
DEBUG_ENV = "CVVAE_DEBUG"
DTYPE_NAMES = ("float32", "bfloat16")
# `models.conv_impl.CONV_IMPLS` (this base module imports no part of the package; a test keeps the two equal).
CONV_IMPL_NAMES = ("auto", "xla", "cpu", "cpu_taps", "cpu_frames")


def parse_resolution(text: str | int | Sequence[int], *, multiple: int = 1) -> tuple[int, int]:
  """"256" (or 256) -> (256, 256); "256x384" (or (256, 384)) -> (H, W); both multiples of `multiple`."""
  if isinstance(text, (int, np.integer)):
    parts = [text]
  elif isinstance(text, str):
    try:
      parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
      parts = []
  else:
    parts = [int(v) for v in text]
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < max(1, multiple) or parts[0] % multiple or parts[1] % multiple:
    rule = f" (multiples of {multiple})" if multiple > 1 else ""
    raise ValueError(f"resolution: expected 256 or HxW such as 256x384{rule}, got {text!r}")
  return parts[0], parts[1]


def resolution_type(multiple: int = 1) -> Callable[[str], tuple[int, int]]:
  """`parse_resolution` as an argparse `type` (a bad value is a usage error naming the flag)."""
  def parse(text: str) -> tuple[int, int]:
    try:
      return parse_resolution(text, multiple=multiple)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e).removeprefix("resolution: ")) from None
  return parse


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An argument parser whose help shows the module docstring `doc` (first line as the description)."""
  first, _, rest = (doc or "").strip().partition("\n")
  return argparse.ArgumentParser(prog=prog, description=first, epilog=rest.strip() or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_argument(p: argparse.ArgumentParser, flag: str = "--model", *, required: bool = True,
                       help: str = "a model: an original PyTorch folder (CV-VAE or SD image VAE), our Flax export, "
                                   "or a training workdir") -> None:
  p.add_argument(flag, required=required, default="" if not required else None, help=help)


def add_clip_arguments(p: argparse.ArgumentParser, *, frames: int | None, stride: int, resolution: str | None,
                       multiple: int = 1, resolution_help: str = "", aliases: Mapping[str, Sequence[str]] = {}) -> None:
  """--frames, --stride and --resolution (the clip read from each video); `aliases` adds older names of a flag."""
  p.add_argument("--frames", *aliases.get("--frames", ()), type=int, default=frames,
                 help="frames per clip (1 + 4k for a CV-VAE; extra frames are dropped)"
                 + (f"; default {frames}" if frames else "; default: all"))
  p.add_argument("--stride", *aliases.get("--stride", ()), type=int, default=stride,
                 help=f"keep every n-th frame (default {stride})")
  p.add_argument("--resolution", *aliases.get("--resolution", ()), type=resolution_type(multiple), default=resolution,
                 help="S or HxW: short side resized to cover it, then centre-cropped"
                 + (f" (default {resolution})" if resolution else f" (default: {resolution_help})"))


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dtype", default=DTYPE_NAMES[0], choices=DTYPE_NAMES,
                 help="compute dtype of the VAEs (params stay float32)")


def add_conv_impl_argument(p: argparse.ArgumentParser) -> None:
  p.add_argument("--conv_impl", default=CONV_IMPL_NAMES[0], choices=CONV_IMPL_NAMES,
                 help="how the VAEs compute convolutions (same results): auto (xla on TPU/GPU, the CPU forms on CPU), "
                 "xla (3D lax convolutions), cpu (taps or frame loop by frame size), cpu_taps, cpu_frames")


def show_info_logs() -> None:
  """absl INFO logs on stderr, as under absl's `app.run` (the library logs with absl)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # argparse parsed the command line; absl need not warn that flags are unparsed
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  quiet_io_logs()


def quiet_io_logs() -> None:
  """Warnings only from the file-system libraries under `gs://` paths, which log every file read at INFO."""
  for name in ("gcsfs", "fsspec"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def run(main: Callable[[], int | None], error_status: int = 2) -> int:
  """Calls `main()`; a user error becomes `error: ...` on stderr and `error_status` (the traceback with
  CVVAE_DEBUG=1). Returns the exit status."""
  try:
    return int(main() or 0)
  except USER_ERRORS as e:
    if os.environ.get(DEBUG_ENV):
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    return error_status
