"""Device mesh, parameter/state shardings by rules, and batch sharding for the jitted trainer.

The mesh has three axes (`MESH_AXES`):
  * `data`: pure data parallelism (parameters replicated along it);
  * `fsdp`: data parallelism whose devices also split the parameters and optimizer moments (ZeRO-3 / FSDP);
  * `spatial`: one clip split over K devices along its height (`mesh.spatial`, default 1: no split). Activations
    are constrained at every level boundary of the autoencoders (`activation_sharding`, a static model field
    `models/partitioning.py` applies), XLA partitions the convolutions with halo exchanges and all-reduces
    GroupNorm's statistics. It is the last (fastest-varying) axis: a spatial group is K consecutive devices, which
    share a host and the fastest links (halos are exchanged at every convolution).
The batch is split over `data` and `fsdp` (videos `[B, T, H, W, C]` as `P(("data", "fsdp"), None, "spatial")`, images
`[B, H, W, C]` as `P(("data", "fsdp"), "spatial")`); parameters and optimizer moments over `fsdp` and, with a
spatial split, over `spatial` too (`param_axes`: the devices of one spatial group hold the same clips, so they can
split the state as FSDP's devices do; the step gathers the parameters for its compute, see `params_at_use`).

Parameter shardings come from one rule table (as big_vision's `sharding.py`): a tuple of
`(regex, policy)` pairs matched with `re.search` against the '/'-joined path of every leaf, first match
wins. Policies (`Policy`):
  * `"fsdp"`: split the leaf over the parameter axes (`param_axes`: `fsdp`, and `spatial` when it splits) along its
    largest dimension divisible by their size (ties: the last such dimension, e.g. output channels of a
    `[T, H, W, I, O]` kernel); replicate it when no dimension is divisible or it has fewer than `min_fsdp_size`
    elements;
  * `"replicate"`: a copy on every device (biases, norm scales, step counters, PRNG keys).
The rules work on any pytree of arrays or `jax.ShapeDtypeStruct` (from `jax.eval_shape`), so shardings are
computed before anything is allocated; optimizer states match too, since their leaves' paths end with the
parameter's path (`1/0/mu/encoder/conv_in/kernel`), and their scalars (`count`) are below the minimum size.

    mesh = sharding.make_mesh(config.mesh)                           # ("data", "fsdp", "spatial")
    abstract = jax.eval_shape(init_state, rng)
    shardings = sharding.state_shardings(abstract, mesh)              # DEFAULT_RULES; or parse_rules(table)
    state = jax.jit(init_state, out_shardings=shardings)(rng)
    batch = sharding.shard_host_batch(next(host_iterator), mesh)      # this process's examples
"""
from __future__ import annotations

import enum
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cvvae_jax.models import partitioning

MESH_AXES = ("data", "fsdp", "spatial")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these (the height over SPATIAL_AXIS)
PARAM_AXIS = "fsdp"
SPATIAL_AXIS = "spatial"
OPTIONAL_AXES = {SPATIAL_AXIS: 1}  # mesh fields a config may leave out (configs and checkpoints from before it)
DEFAULT_MIN_FSDP_SIZE = 2**14  # elements; smaller leaves are replicated (sharding them saves little memory)


class Policy(enum.Enum):
  FSDP = "fsdp"
  REPLICATE = "replicate"


class Rule(NamedTuple):
  pattern: re.Pattern
  policy: Policy


# (regex on the '/'-joined leaf path, policy); first match wins.
DEFAULT_RULE_TABLE: tuple[tuple[str, str], ...] = (
    (r"(^|/)(bias|scale)$", "replicate"),  # biases and norm scales (also their optimizer moments)
    (r"(^|/)[^/]*norm[^/]*/", "replicate"),  # every leaf inside a normalization layer
    (r".*", "fsdp"),  # everything else: shard if big enough and divisible
)


def parse_rules(table: Sequence[Sequence[str]]) -> tuple[Rule, ...]:
  """`(regex, policy)` pairs (e.g. `config.sharding.rules`) -> compiled `Rule`s. Raises naming the bad entry."""
  rules = []
  valid = [p.value for p in Policy]
  for i, entry in enumerate(table):
    if isinstance(entry, Rule):
      rules.append(entry)
      continue
    if isinstance(entry, str) or len(entry) != 2:
      raise ValueError(f"sharding rule {i}: expected a (regex, policy) pair, got {entry!r}")
    pattern, policy = entry
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"sharding rule {i}: invalid regex {pattern!r}: {e}") from e
    try:
      policy = policy if isinstance(policy, Policy) else Policy(policy)
    except ValueError:
      raise ValueError(f"sharding rule {i} ({pattern!r}): expected a policy in {valid}, got {policy!r}") from None
    rules.append(Rule(compiled, policy))
  return tuple(rules)


DEFAULT_RULES: tuple[Rule, ...] = parse_rules(DEFAULT_RULE_TABLE)


def _product_names(sizes: Mapping[str, int], axes: Sequence[str]) -> str:
  """'mesh.data * mesh.fsdp' (the spatial axis is named only when it is used, i.e. not 1)."""
  return " * ".join(f"mesh.{a}" for a in axes if not (a == SPATIAL_AXIS and sizes.get(a) == 1))


def mesh_shape(cfg: Mapping[str, int] | ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves `(data, fsdp, spatial)` from `config.mesh` for `num_devices`; at most one field may be -1 ("the
  rest"); `spatial` may be left out (1)."""
  sizes = {}
  for axis in MESH_AXES:
    if axis not in cfg and axis in OPTIONAL_AXES:
      sizes[axis] = OPTIONAL_AXES[axis]
      continue
    if axis not in cfg:
      raise ValueError(f"expected field mesh.{axis} (an int, -1 for all remaining devices); got fields "
                       f"{sorted(cfg.keys())}")
    value = cfg[axis]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (value < 1 and value != -1):
      raise ValueError(f"expected mesh.{axis} to be a positive int or -1, got {value!r}")
    sizes[axis] = int(value)
  free = [a for a in MESH_AXES if sizes[a] == -1]
  if len(free) > 1:
    raise ValueError("at most one mesh axis may be -1, got " + ", ".join(f"mesh.{a}=-1" for a in free))
  if free:
    fixed = math.prod(s for a, s in sizes.items() if a not in free)
    if num_devices % fixed:
      others = _product_names(sizes, [a for a in MESH_AXES if a not in free])
      raise ValueError(f"{others} = {fixed} does not divide the {num_devices} available devices "
                       f"(mesh.{free[0]}=-1 takes the rest)")
    sizes[free[0]] = num_devices // fixed
  product = math.prod(sizes.values())
  if product != num_devices:
    names = _product_names(sizes, MESH_AXES)
    raise ValueError(f"{names} = {product} but {num_devices} devices are available "
                     f"(set one of them to -1 to use all remaining devices)")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(cfg: Mapping[str, int] | ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The global `("data", "fsdp", "spatial")` mesh over `jax.devices()` (every process's devices) from
  `config.mesh`.

  Axes are `AxisType.Auto` (shardings given to `jit` / `with_sharding_constraint`, the compiler propagates
  the rest), not `jax.make_mesh`'s default `Explicit`.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def leaf_path(path) -> str:
  """A pytree key path as the '/'-joined string the rules match: `opt_state/1/0/mu/encoder/conv_in/kernel`."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def param_axes(mesh: Mesh) -> str | tuple[str, str]:
  """The mesh axes the `"fsdp"` policy splits a leaf over: `"fsdp"`, or `("fsdp", "spatial")` when the mesh splits
  the height (`mesh.spatial > 1`). Without a spatial split the specs (and programs) are those from before it."""
  if mesh.shape.get(SPATIAL_AXIS, 1) == 1:
    return PARAM_AXIS
  return (PARAM_AXIS, SPATIAL_AXIS)


def partition_spec(shape: Sequence[int], policy: Policy, fsdp_size: int,
                   min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE, axes: str | tuple[str, ...] = PARAM_AXIS) -> P:
  """The PartitionSpec of one leaf of `shape` under `policy` (see the module docstring), split over `axes` (of
  `fsdp_size` devices together) when it is."""
  shape = tuple(shape)
  if policy is Policy.REPLICATE or fsdp_size == 1 or math.prod(shape) < min_fsdp_size:
    return P()
  candidates = [d for d, n in enumerate(shape) if n % fsdp_size == 0 and n >= fsdp_size]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], d))  # largest; ties -> last
  return P(*(axes if d == dim else None for d in range(len(shape))))


def _policy_for(path: str, rules: Sequence[Rule]) -> Policy:
  for rule in rules:
    if rule.pattern.search(path):
      return rule.policy
  return Policy.REPLICATE  # no rule: replicate (never shard silently by accident)


def partition_specs(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *,
                    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Same-structure pytree of `PartitionSpec` for any pytree of arrays / `ShapeDtypeStruct` / scalars."""
  rules = parse_rules(rules)
  if PARAM_AXIS not in mesh.shape:
    raise ValueError(f"expected a mesh with axis {PARAM_AXIS!r}, got axes {tuple(mesh.shape)}")
  axes = param_axes(mesh)
  size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))

  def spec(path, leaf):
    return partition_spec(np.shape(leaf), _policy_for(leaf_path(path), rules), size, min_fsdp_size, axes)

  return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *,
                    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Same-structure pytree of `NamedSharding` for any state pytree (a TrainState of params, optimizer
  states, EMA params, step, rng; leaves are arrays or `jax.ShapeDtypeStruct`). Paths are matched by rules."""
  specs = partition_specs(abstract_state, mesh, rules, min_fsdp_size=min_fsdp_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *,
                    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Same-structure pytree of `NamedSharding` for a params pytree (see `state_shardings`)."""
  return state_shardings(abstract_params, mesh, rules, min_fsdp_size=min_fsdp_size)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `abstract` carrying `shardings` (what `checkpoint.restore_latest` takes)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else
                                                        np.asarray(a).dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------------------------- data


def batch_spec(ndim: int) -> P:
  """Videos `[B, T, H, W, C]`: `P(("data", "fsdp"), None, "spatial")`; images `[B, H, W, C]`:
  `P(("data", "fsdp"), "spatial")`; anything else `[B, ...]`: the batch dimension only."""
  if ndim == 5:
    return P(BATCH_AXES, None, SPATIAL_AXIS)
  if ndim == 4:
    return P(BATCH_AXES, SPATIAL_AXIS)
  return P(BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
  """An array of rank `ndim` split as `batch_spec` says (videos / images: batch and height); None: the leading
  (batch) dimension split over `("data", "fsdp")`, every other dimension whole, for any rank. Without a spatial split
  (`mesh.spatial == 1`) always the latter: the sharding of the trainer before the spatial axis existed."""
  if ndim is None or mesh.shape.get(SPATIAL_AXIS, 1) == 1:
    return NamedSharding(mesh, P(BATCH_AXES))
  return NamedSharding(mesh, batch_spec(ndim))


def activation_sharding(mesh: Mesh, gather_attention: bool = False) -> partitioning.ActivationSharding | None:
  """The models' `activation_sharding` field for `mesh`: None without a spatial split (`mesh.spatial == 1`: the
  program is exactly the one without it), else batch over `("data", "fsdp")` and height over `"spatial"`."""
  if mesh.shape.get(SPATIAL_AXIS, 1) == 1:
    return None
  return partitioning.ActivationSharding(mesh, BATCH_AXES, SPATIAL_AXIS, gather_attention=gather_attention)


def params_at_use(tree: Any, mesh: Mesh | None) -> Any:
  """`tree` (parameters, any pytree of arrays) as the step's layers take them: gathered (replicated) when the mesh
  splits the height (`mesh.spatial > 1`, the parameters are then split over `param_axes`), else `tree` itself (the
  program is unchanged on every other mesh).

  A workaround for an XLA SPMD partitioner bug (jax/jaxlib 0.10.2; the 2D repro below fails with Shardy and with
  GSPMD, its 3D form, as in the models, with Shardy, the default, only): in the backward pass of a convolution whose
  kernel is split over `fsdp` on its output channels and whose input is split over `fsdp` (batch) and `spatial`
  (height), the partitioner may gather the output cotangent over `spatial`, move its batch split to the channels
  (all-to-all over `fsdp`), contract each device's half of the channels, and then all-reduce the partial input
  gradient over every device instead of over `fsdp` only: the input gradient comes out `mesh.spatial` times too large,
  and with it every gradient before that layer (first seen in the adaptive GAN weight: on fsdp=2 x spatial=4 the
  discriminator's input gradient had 32x its norm, several layers compounding, and the weight was 27.7 instead of
  636). Replicated kernels give the partitioner nothing to split the contraction over. Minimal repro (8 fake CPU
  devices, mesh (fsdp=2, spatial=4); tests/train/test_spatial.py runs it):

      x: [2, 32, 16, 3] P("fsdp", "spatial");  k1: [3, 3, 3, 64] replicated;  k2: [3, 3, 64, 64] P(.., "fsdp")
      loss = mean(tanh(conv(tanh(conv(x, k1, stride 2)), k2, stride 1)));  jax.grad(loss)(x) is 4x the unsplit one

  Kernels split over `spatial` itself (`param_axes`) are gathered the same way (whether the bug shows there was not
  checked). This gathers a whole tree at the start of the step, so one full copy of it is live per device during the
  step (the optimizer moments stay split): the step uses it for the discriminator and LPIPS. The autoencoders gather
  each kernel where their layers use it instead (`models/partitioning.py:gather_at_use`, from their
  `activation_sharding`), inside the remat units, which the backward pass recomputes: no copy of their kernels stays
  alive across the step (bench/README_train.md; leaving the gathers to XLA, without either, measured more memory
  than both). Gradients through the constraint are reduced back to their shards by the step's output shardings.
  """
  if mesh is None or mesh.shape.get(SPATIAL_AXIS, 1) == 1:
    return tree
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated), tree)


def check_spatial_size(size: Sequence[int], mesh: Mesh, num_levels: int, field_name: str) -> None:
  """Checks that every level's height of an `(H, W)` input divides over `mesh.spatial` (level i has height
  `H / 2^i`, `num_levels` levels): H must be a multiple of `mesh.spatial * 2^(num_levels - 1)`."""
  k = mesh.shape.get(SPATIAL_AXIS, 1)
  if k == 1:
    return
  height = int(size[0])
  for level in range(num_levels):
    h = height // 2**level
    if h * 2**level != height or h % k:
      raise ValueError(f"{field_name}: height {height} does not split over mesh.spatial={k} at level {level} (height "
                       f"{height / 2**level:g}); expected a multiple of mesh.spatial * 2^{num_levels - 1} = "
                       f"{k * 2**(num_levels - 1)}")


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch dimension is split over (`mesh.data * mesh.fsdp`)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def data_groups(mesh: Mesh) -> tuple[int, int]:
  """`(group, groups)`: which slice of the global batch this process loads, of how many.

  Processes whose devices hold the same examples (a spatial group spanning processes: each holds some rows of the
  same clips) form one group and load the same clips; otherwise every process is its own group
  (`(jax.process_index(), jax.process_count())`). Raises when processes share only some of their examples.
  """
  coords = {}  # process -> the batch coordinates (flat (data, fsdp) index) of its devices
  devices = mesh.devices.reshape(batch_devices(mesh), -1)
  for b, row in enumerate(devices):
    for d in row:
      coords.setdefault(d.process_index, set()).add(b)
  groups = sorted({tuple(sorted(c)) for c in coords.values()})
  owners = [b for g in groups for b in g]
  if len(owners) != len(set(owners)):
    raise ValueError(f"mesh {dict(mesh.shape)}: processes hold overlapping but different sets of examples; order "
                     f"the devices so that each spatial group lies on whole processes")
  return groups.index(tuple(sorted(coords[jax.process_index()]))), len(groups)


def check_batch_divisible(global_batch: int, mesh: Mesh, field_name: str) -> int:
  """Checks the config's global batch size against the mesh; returns this process's batch size.

  `field_name` is the config field the value came from (e.g. `"config.batch_size"`), for the error.
  """
  n = batch_devices(mesh)
  if not isinstance(global_batch, (int, np.integer)) or global_batch < 1:
    raise ValueError(f"expected {field_name} to be a positive int, got {global_batch!r}")
  if global_batch % n:
    raise ValueError(f"{field_name}={global_batch} must be divisible by the number of devices on the batch "
                     f"axes, mesh.data * mesh.fsdp = {' * '.join(str(mesh.shape[a]) for a in BATCH_AXES)} = {n}")
  _, groups = data_groups(mesh)
  if global_batch % groups:
    raise ValueError(f"{field_name}={global_batch} must be divisible by the number of processes "
                     f"{jax.process_count()}" + (f" ({groups} groups of processes loading the same clips)"
                                                 if groups != jax.process_count() else ""))
  return global_batch // groups


def shard_host_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's examples `{name: np.ndarray [B_local, ...]}` -> global `jax.Array`s `[B_global, ...]`
  split as `batch_sharding` says. Each process passes its own shard (a single process: the whole batch; processes
  of one `data_groups` group: the same clips, whole, of which each device takes its rows)."""
  n, (_, groups) = batch_devices(mesh), data_groups(mesh)

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch{jax.tree_util.keystr(path)}: expected an array with a batch dimension, got a "
                       f"scalar")
    if (x.shape[0] * groups) % n:
      raise ValueError(f"batch{jax.tree_util.keystr(path)}: {x.shape[0]} examples on each of {groups} "
                       f"process(es) is not divisible by the {n} devices on the batch axes (data * fsdp)")
    if x.ndim in (4, 5) and x.shape[x.ndim - 3] % mesh.shape[SPATIAL_AXIS]:
      raise ValueError(f"batch{jax.tree_util.keystr(path)}: height {x.shape[x.ndim - 3]} is not divisible by "
                       f"mesh.spatial={mesh.shape[SPATIAL_AXIS]}")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                  (x.shape[0] * groups, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(put, dict(local_batch))
