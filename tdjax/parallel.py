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
import logging
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
  """A mesh with Auto axis types (linen logical rules need Auto; make_mesh defaults to Explicit)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, auto)  # topology-aware device order
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


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


def batch_sizes(global_batch: int, mesh: jax.sharding.Mesh) -> dict:
  """Global, per-process and per-device batch sizes, validated; logged by the loop."""
  dp = data_parallel_size(mesh)
  nproc = jax.process_count()
  if global_batch % dp:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the data-parallel "
                     f"size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if global_batch % nproc:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the number of "
                     f"processes {nproc}")
  return dict(global_batch=global_batch, per_process=global_batch // nproc,
              per_device=global_batch // dp, data_parallel=dp, processes=nproc)


def host_to_global(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Per-process numpy batch -> global `jax.Array`s sharded over the data axes."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
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


def maybe_initialize_distributed(enable: bool, coordinator: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize` behind a flag (auto-detects TPU pods, SLURM, MPI when args are None)."""
  if not enable:
    return
  kwargs = {}
  if coordinator:
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def enable_compilation_cache(directory: str | None) -> None:
  """Persistent XLA compilation cache, so a restarted job does not recompile. Takes effect also in
  a process that has used another cache directory already (JAX_COMPILATION_CACHE_DIR, an earlier
  run in the same process): jax fixes the directory at the first compile, so it is reset."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax_compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
