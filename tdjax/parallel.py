"""The mesh and its sharding rules: the only module that touches JAX mesh APIs.

Mesh axes are ('data', 'fsdp', 'tensor').  Sizes come from config (`-1` fills with the devices
left over).  Model code names *logical* axes on every parameter (`nn.with_logical_partitioning`)
and activation (`nn.with_logical_constraint`); `LOGICAL_RULES` maps them to mesh axes:

  batch -> (data, fsdp)      the global batch is split over every data-parallel device
  embed -> fsdp              parameters are fully sharded along their model width (ZeRO-3)
  mlp, heads, vocab -> tensor (Megatron-style tensor parallelism)

Everything is the pjit model written as `jax.jit(..., in_shardings=..., out_shardings=...)`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("codebook", None),
    ("code_dim", None),
    ("channels", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("kernel", None),
    ("kernel_h", None),
    ("kernel_w", None),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {'data': -1, 'fsdp': 2, 'tensor': 1} to concrete sizes; one -1 fills the rest."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {known})")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types (linen logical rules need Auto; make_mesh defaults to Explicit).

  Devices of several TPU slices (multislice: `slice_index` differs) get a hybrid mesh: the `data`
  axis is split between the slices, which talk over the data-centre network (DCN), and each
  slice holds a `data / slices x fsdp x tensor` block over its own ICI; `data` must then be a
  multiple of the number of slices (FSDP and tensor traffic stay inside a slice)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if num_slices(devices) > 1:
    return jax.sharding.Mesh(hybrid_device_array(shape, devices), MESH_AXES, axis_types=auto)
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, auto)  # topology-aware device order
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def num_slices(devices: Sequence[Any]) -> int:
  """Number of TPU slices among `devices` (1 off TPU: other devices have no `slice_index`)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def hybrid_device_array(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The (data, fsdp, tensor) device array of a multislice job: `data` = slices x per-slice data
  (DCN outside, ICI inside; JAX's `create_hybrid_device_mesh`)."""
  slices = num_slices(devices)
  data, fsdp, tensor = shape
  if data % slices:
    raise ValueError(f"mesh: the devices span {slices} TPU slices (multislice) and only the data "
                     f"axis crosses slices; data={data} is not a multiple of {slices} (mesh "
                     f"{dict(zip(MESH_AXES, shape))}; e.g. --config.mesh.data={slices} "
                     f"--config.mesh.fsdp=-1)")
  return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1),
                                              devices)


def rules(extra: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
  """Default rules, with `extra` ones (from config) taking precedence."""
  extra = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in extra)
  names = {k for k, _ in extra}
  return extra + tuple(r for r in LOGICAL_RULES if r[0] not in names)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, axis_rules=LOGICAL_RULES):
  """Context for tracing model code: sets the mesh and the logical rules.

  Without an abstract mesh, `nn.with_logical_constraint` silently does nothing (flax 0.12).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


def logical_specs(boxed_tree) -> Any:
  """PartitionSpecs of logical names for a (possibly boxed) pytree; unboxed leaves get P()."""
  return nn.get_partition_spec(boxed_tree)


def shardings_for(logical_tree, mesh: jax.sharding.Mesh, axis_rules=LOGICAL_RULES):
  """Logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, axis_rules)


def fit_to_shapes(shardings, shapes):
  """Drops, per array dimension, the mesh axes whose size product does not divide that dimension
  (e.g. a 1152-wide SigLIP2 table on fsdp=256): that dimension is replicated instead of failing.
  `shapes`: a matching tree of arrays / ShapeDtypeStructs."""
  def fit(sh, x):
    if not isinstance(sh, NamedSharding) or not sh.spec:
      return sh
    entries = []
    for dim, entry in zip(x.shape, tuple(sh.spec) + (None,) * (len(x.shape) - len(sh.spec))):
      axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
      while axes and dim % math.prod(sh.mesh.shape[a] for a in axes):
        axes = axes[:-1]                       # drop the innermost axis until it divides
      entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(sh.mesh, P(*entries), memory_kind=sh.memory_kind)
  return jax.tree.map(fit, shardings, shapes, is_leaf=lambda x: isinstance(x, NamedSharding))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def data_shard(mesh: jax.sharding.Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(index, count): the part of every global batch that this process feeds to its devices is
  row block `index` of `count` equal blocks.

  The batch is split over the data-parallel positions (data x fsdp, in that order) of the mesh.
  Each process holds the positions of its own devices; when the `tensor` axis (or a data axis
  that is not split at a process boundary) spans processes, several processes hold the same
  positions and read the same rows.  So `count` is the number of distinct blocks, not the number
  of processes: a mesh whose tensor axis spans 2 processes has one block both read in full.  A
  process whose positions are not one contiguous range (a device order that interleaves
  processes) is refused: its rows could not be read as one slice of the batch."""
  me = jax.process_index() if process_index is None else process_index
  grid = np.asarray(mesh.devices)
  data, fsdp = grid.shape[0], grid.shape[1]
  positions: dict[int, set] = {}
  for (i, j, _), device in np.ndenumerate(grid):
    positions.setdefault(device.process_index, set()).add(i * fsdp + j)
  blocks = {}
  for p, pos in positions.items():
    lo, hi = min(pos), max(pos) + 1
    if len(pos) != hi - lo:
      raise ValueError(f"mesh {dict(mesh.shape)}: process {p}'s devices hold the data-parallel "
                       f"positions {sorted(pos)}, not one contiguous range, so its share of the "
                       f"batch is not one slice; reorder the mesh axes or the devices")
    blocks[p] = (lo, hi)
  distinct = sorted(set(blocks.values()))
  size = distinct[0][1] - distinct[0][0]
  if any(hi - lo != size for lo, hi in distinct) or [lo for lo, _ in distinct] != list(
      range(0, data * fsdp, size)):
    raise ValueError(f"mesh {dict(mesh.shape)}: the processes hold overlapping or unequal parts of "
                     f"the data-parallel positions {distinct}; each process must hold whole, "
                     f"equal blocks")
  if me not in blocks:
    raise ValueError(f"mesh {dict(mesh.shape)} has no device of process {me}")
  return distinct.index(blocks[me]), len(distinct)


def batch_sizes(global_batch: int, mesh: jax.sharding.Mesh) -> dict:
  """Global, per-process and per-device batch sizes, validated; logged by the loop."""
  dp = data_parallel_size(mesh)
  _, shards = data_shard(mesh)
  if global_batch % dp:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the data-parallel "
                     f"size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  return dict(global_batch=global_batch, per_process=global_batch // shards,
              per_device=global_batch // dp, data_parallel=dp, processes=jax.process_count(),
              input_shards=shards)


@functools.lru_cache(maxsize=16)
def _input_shards(mesh: jax.sharding.Mesh) -> int:
  return data_shard(mesh)[1]


def host_to_global(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """This process's rows of a global batch (block `data_shard(mesh)`) -> global `jax.Array`s
  sharded over the data axes."""
  shards = _input_shards(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                    (v.shape[0] * shards,) + v.shape[1:])
  return out


def per_device_bytes(tree) -> dict:
  """Bytes of `tree` held by each device, measured from the arrays' addressable shards."""
  held: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# Several processes (multi-host): start-up, agreement, host copies
# ------------------------------------------------------------------------------------------------

EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(enable: bool) -> None:
  """Joins this process to a multi-process job (`jax.distributed.initialize`) when `enable`.

  Must run before any other JAX call (JAX refuses afterwards): every entry point that can run on
  several processes calls it first, with its switch (`--config.distributed`, `--multihost`).
  The coordinator, the process count and this process's id come from
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID   when all three are
        set: any cluster, a pod job that sets them itself, the launch scripts' test stand-ins;
    otherwise JAX's own detection: Cloud TPU metadata, SLURM_* variables, Open MPI, Kubernetes.
  A second call is a no-op."""
  if not enable or jax.distributed.is_initialized():
    return
  given = {k: os.environ[k] for k in EXPLICIT_ENV if os.environ.get(k)}
  kwargs = {}
  if given:
    missing = [k for k in EXPLICIT_ENV if k not in given]
    if missing:
      raise ValueError(f"{', '.join(sorted(given))} set but not {', '.join(missing)}: set all "
                       f"three, or none for JAX's cluster detection (TPU, SLURM, MPI)")
    try:
      kwargs = dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(given["JAX_NUM_PROCESSES"]),
                    process_id=int(given["JAX_PROCESS_ID"]))
    except ValueError:
      raise ValueError(f"JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                       f"{given['JAX_PROCESS_ID']!r}: expected integers") from None
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
      raise ValueError(f"JAX_PROCESS_ID={kwargs['process_id']} is not in [0, JAX_NUM_PROCESSES="
                       f"{kwargs['num_processes']})")
  jax.distributed.initialize(**kwargs)
  check_visible_gpus()
  logging.info("jax.distributed: process %d of %d (coordinator %s)", jax.process_index(),
               jax.process_count(), kwargs.get("coordinator_address", "detected"))


def check_visible_gpus() -> None:
  """One line instead of a CUDA error at the first device query: the GPUs that JAX was told to
  use (JAX_LOCAL_DEVICE_IDS, or SLURM_LOCALID under SLURM) must exist among the
  CUDA_VISIBLE_DEVICES this process sees (CUDA numbers the visible ones from 0)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  wanted = str(jax.config.values.get("jax_cuda_visible_devices", "all"))
  if visible is None or wanted in ("all", ""):
    return
  count = len([v for v in visible.split(",") if v.strip()])
  bad = [int(i) for i in wanted.split(",") if int(i) >= count]
  if bad:
    raise ValueError(f"this process is to use GPU {wanted} (JAX_LOCAL_DEVICE_IDS, or SLURM_LOCALID "
                     f"by JAX's SLURM detection) but sees only {count} (CUDA_VISIBLE_DEVICES="
                     f"{visible!r}): leave CUDA_VISIBLE_DEVICES to SLURM and let launch/slurm.sh "
                     f"pick the GPU")


def all_processes(flag: bool) -> bool:
  """True where `flag` is true on every process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_first_process(value: int) -> int:
  """Process 0's `value` on every process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def preemption_sync_point(step: int) -> bool:
  """True, on every process at the same step, once any process of a multi-process job got
  SIGTERM (JAX's preemption service: the processes agree on the first step all of them can still
  reach, so no host waits alone in a save).  Always False without jax.distributed."""
  if not jax.distributed.is_initialized():
    return False
  return bool(multihost_utils.reached_preemption_sync_point(step))


def barrier(name: str) -> None:
  """Waits until every process got here (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """Host (numpy) copies of a tree of arrays, on every process: a global array sharded over
  several processes is gathered (a collective: every process calls it), others are copied."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def enable_compilation_cache(directory: str | None) -> None:
  """Persistent XLA compilation cache, so a restarted job does not recompile. Takes effect also in
  a process that has used another cache directory already (JAX_COMPILATION_CACHE_DIR, an earlier
  run in the same process): jax fixes the directory at the first compile, so it is reset."""
  if not directory:
    return
  if "://" not in directory:   # gs://...: JAX writes it through etils.epath; makedirs would
    os.makedirs(directory, exist_ok=True)   # create the local folder ./gs:/...
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax_compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
