"""Models by Hugging Face Hub id: `load_pretrained("AILab-CVC/CV-VAE", subfolder="vae3d_sd3")` and any diffusers
`AutoencoderKL` repo (`"stabilityai/sd-vae-ft-mse"`, or `"stabilityai/stable-diffusion-2-1", subfolder="vae"`).

`resolve_model_path` turns what a user passed into a local folder: a path that exists locally always wins (then
`subfolder` is a folder inside it); otherwise an `OWNER/NAME` id is fetched with `huggingface_hub.snapshot_download`
into its cache (`cache_dir`, default `HF_HUB_CACHE`, i.e. `~/.cache/huggingface/hub`), downloading only the config
and the weights of the requested `variant`, and the snapshot folder is returned. With `HF_HUB_OFFLINE=1` (read by
`huggingface_hub` when it is imported) or `local_files_only=True` nothing is downloaded: the cache must hold the
revision (`refs/<revision>` or a commit hash under `snapshots/`).

    folder = resolve_model_path("AILab-CVC/CV-VAE", subfolder="vae3d_sd3", revision="main")
"""
from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub import constants, errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from cvvae_jax.weights import weight_files

__all__ = ["is_hub_id", "resolve_model_path", "download_patterns"]

CONFIG_NAME = "config.json"
# Our Flax export (pretrained.py) may also live on the Hub.
FLAX_PATTERNS = ("model.json", "params/**")


def is_hub_id(name: str) -> bool:
  """Whether `name` has the form of a Hub model id `OWNER/NAME` (it may still not exist)."""
  if not isinstance(name, str) or name.count("/") != 1:
    return False
  try:
    validate_repo_id(name)
  except errors.HFValidationError:
    return False
  return True


def download_patterns(subfolder: str | None, variant: str | None) -> list[str]:
  """The files to fetch: the config, the weights of `variant` (one file, or a shard index and its shards), our Flax
  export's files; without a subfolder also every `*/config.json` (to name the subfolders in an error). PyTorch
  pickles are never fetched."""
  prefix = f"{subfolder.strip('/')}/" if subfolder else ""
  single = weight_files.weights_name(variant)
  stem = single[:-len(".safetensors")]
  patterns = [prefix + CONFIG_NAME, prefix + single, f"{prefix}{stem}-*.safetensors",
              prefix + weight_files.index_name(variant)] + [prefix + p for p in FLAX_PATTERNS]
  if not subfolder:
    patterns.append(f"*/{CONFIG_NAME}")
  return patterns


def _model_folders(root: str) -> list[str]:
  """Sub-folders of a snapshot that hold a config.json (candidates for `subfolder`)."""
  found = []
  for folder, _, files in os.walk(root):
    if CONFIG_NAME in files and folder != root:
      found.append(os.path.relpath(folder, root))
  return sorted(found)


def _snapshot(repo_id: str, subfolder: str | None, revision: str | None, variant: str | None,
              cache_dir: str | None, local_files_only: bool) -> str:
  cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
  offline = local_files_only or constants.HF_HUB_OFFLINE
  where = f"hub repo {repo_id!r} (revision {revision or 'main'!r})"
  try:
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
        allow_patterns=download_patterns(subfolder, variant), library_name="cvvae-jax")
  except errors.GatedRepoError as e:
    raise PermissionError(f"{where} is gated: accept its terms on huggingface.co and log in (`hf auth login`): "
                          f"{e}") from e
  except errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(f"no {where} on the Hub and no local path {repo_id!r} (a private repo needs a login: "
                            f"`hf auth login`)") from e
  except errors.RevisionNotFoundError as e:
    raise FileNotFoundError(f"{where}: the repo has no such revision (a branch, tag or commit hash)") from e
  except errors.LocalEntryNotFoundError as e:
    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    reason = ("downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else
              "the Hub could not be reached")
    if not os.path.isdir(storage):
      raise FileNotFoundError(f"no local path {repo_id!r}, and {where} is not in the Hub cache {cache} "
                              f"(no {os.path.basename(storage)}/); {reason}") from e
    refs = sorted(os.listdir(os.path.join(storage, "refs"))) if os.path.isdir(os.path.join(storage, "refs")) else []
    raise FileNotFoundError(f"{where} is not in the Hub cache {storage} (cached refs: {refs}); {reason}") from e
  except errors.IncompleteSnapshotError as e:
    raise FileNotFoundError(f"{where}: the cached snapshot is incomplete and downloads are off or failed: {e}") from e


def _lacks_wanted(root: str, subfolder: str | None, variant: str | None) -> bool:
  """Whether the snapshot lacks the subfolder, or the weights of a model folder (then the repo's listing is asked)."""
  folder = os.path.join(root, subfolder) if subfolder else root
  if not os.path.isdir(folder):
    return True
  return _lacks_weights(os.listdir(folder), variant)


def _wanted_weights(variant: str | None) -> set[str]:
  return {weight_files.weights_name(variant), weight_files.index_name(variant)}


def _lacks_weights(names, variant: str | None) -> bool:
  """Whether a folder's file `names` are a PyTorch-layout model folder (a config, not our Flax export) without the
  weights file of `variant`."""
  return CONFIG_NAME in names and FLAX_PATTERNS[0] not in names and _wanted_weights(variant).isdisjoint(names)


def _check_listing(repo_id: str, commit: str, subfolder: str | None, variant: str | None, what: str) -> None:
  """Online: a missing subfolder or weights file is named against the repo's own file list (the snapshot holds only
  what the patterns fetched, so it cannot tell what else the repo has)."""
  try:
    files = huggingface_hub.list_repo_files(repo_id, revision=commit)
  except errors.HfHubHTTPError:
    return  # the listing failed: the checks on the snapshot's files below still run
  prefix = f"{subfolder.strip('/')}/" if subfolder else ""
  folders = sorted(f[:-len(CONFIG_NAME) - 1] for f in files if f.endswith("/" + CONFIG_NAME))
  if subfolder and not any(f.startswith(prefix) for f in files):
    raise FileNotFoundError(f"{what} has no subfolder {subfolder!r}; folders with a {CONFIG_NAME}: {folders}")
  here = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
  if _lacks_weights(here, variant):  # (else: the weights are there, or no model folder, or our Flax export)
    held = weight_files.variants_of(here)
    if not held and any(n in weight_files.PICKLE_NAMES for n in here):
      raise ValueError(f"{what}: {prefix or 'the repo root'} holds PyTorch pickles only; they are never downloaded "
                       f"or loaded here (unpickling runs code from the file). Expected {weight_files.WEIGHTS_NAME}")
    raise FileNotFoundError(f"{what}: expected {' or '.join(sorted(_wanted_weights(variant)))} in "
                            f"{prefix or 'the repo root'}; the repo holds the variant(s) {held} there "
                            f"(pass variant=...)")


def resolve_model_path(path: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None,
                       variant: str | None = None, cache_dir: str | os.PathLike | None = None,
                       local_files_only: bool = False) -> str:
  """The local folder that `path` names (see the module docstring), or `path` unchanged when it is neither a local
  path nor a Hub id (e.g. `gs://...`: the loaders decide). Raises FileNotFoundError for a missing repo, revision or
  subfolder, naming what exists."""
  path = os.fspath(path)
  if subfolder is not None and (not isinstance(subfolder, str) or os.path.isabs(subfolder)
                                or ".." in subfolder.split("/")):
    raise ValueError(f"subfolder: expected a relative folder name such as 'vae3d_sd3', got {subfolder!r}")
  local = os.path.exists(path)
  if not local and not is_hub_id(path):
    if revision is not None:
      raise ValueError(f"revision={revision!r} is for Hub ids (OWNER/NAME); {path!r} is neither a local path nor one")
    return os.path.join(path, subfolder) if subfolder else path
  if local:
    if revision is not None:
      raise ValueError(f"revision={revision!r} is for Hub ids, but {path!r} is a local path (local paths win)")
    root, what = path, f"local path {path!r}"
  else:
    root = _snapshot(path, subfolder, revision, variant, cache_dir, local_files_only)
    what = f"hub repo {path!r} (revision {revision or 'main'!r}, snapshot {root})"
    if not (local_files_only or constants.HF_HUB_OFFLINE) and _lacks_wanted(root, subfolder, variant):
      _check_listing(path, os.path.basename(root), subfolder, variant, what)
  if subfolder:
    folder = os.path.join(root, subfolder)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{what} has no subfolder {subfolder!r}; folders with a {CONFIG_NAME}: "
                              f"{_model_folders(root)}")
    return folder
  if not local and not os.path.isfile(os.path.join(root, CONFIG_NAME)) and not os.path.isfile(
      os.path.join(root, FLAX_PATTERNS[0])):
    raise FileNotFoundError(f"{what} has no {CONFIG_NAME} at its root; pass subfolder= one of "
                            f"{_model_folders(root)}")
  return root
