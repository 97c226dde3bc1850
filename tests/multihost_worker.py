"""One process of the multi-process tests: `python multihost_worker.py PID NPROC PORT SPEC`.

Started by tests/test_multihost.py with a few fake CPU devices per process; joins the job through
`tdjax.parallel.initialize_distributed` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, gloo CPU collectives), then runs what SPEC (a JSON object) names:

  {"kind": "train", "workdir": W, "steps": S, "mesh": {...}, "overrides": {...},
   "unreadable": [P, STEP]}
      the training loop on the toy task (config fields from "overrides"); "unreadable": process
      P fails to read checkpoint STEP (a transient read error on one host)
  {"kind": "init", "config": NAME, "arg": ARG, "overrides": {...}, "mesh": {...}}
      `trainer.Setup(config, mesh).init_state()` of configs/NAME.py:ARG (pretrained parts read
      from files); prints the sum of every parameter leaf, gathered to the host
"""

import json
import os
import sys

pid, nproc, port, spec = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(nproc),
                  JAX_PROCESS_ID=str(pid))
from tdjax import parallel  # noqa: E402

parallel.initialize_distributed(nproc > 1)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from tdjax import checkpoint as ckpt_lib  # noqa: E402
from tdjax import configlib, trainer  # noqa: E402
from toy_task import toy_config  # noqa: E402

logging.set_verbosity(logging.INFO)   # the loop's log lines (resumed from ..., mesh ...)
result = {"pid": jax.process_index(), "devices": jax.device_count(),
          "local": jax.local_device_count()}
if spec["kind"] == "train":
  if spec.get("unreadable") and spec["unreadable"][0] == pid:
    read = ckpt_lib.Checkpointer._read

    def flaky_read(self, step, abstract_state):
      if step == spec["unreadable"][1]:
        raise OSError(f"injected read error of step {step} on process {pid}")
      return read(self, step, abstract_state)
    ckpt_lib.Checkpointer._read = flaky_read
  config = toy_config(total_steps=int(spec["steps"]), ckpt_every=2, async_checkpoint=True)
  config.update(spec.get("overrides", {}))
  config.mesh.update(spec["mesh"])
  result["loss"] = trainer.train_and_evaluate(config, spec["workdir"])["loss"]
  result["data_shard"] = parallel.data_shard(parallel.make_mesh(spec["mesh"]))
elif spec["kind"] == "init":
  config = configlib.load_config(spec["config"], spec.get("arg", ""), spec.get("overrides"))
  mesh = parallel.make_mesh(spec["mesh"])
  state = trainer.Setup(config, mesh).init_state()
  host = parallel.to_host(state["params"])
  result["sums"] = {jax.tree_util.keystr(k): float(np.sum(v, dtype=np.float64))
                    for k, v in jax.tree_util.tree_leaves_with_path(host)}
  result["sharded_over_processes"] = sum(not x.is_fully_addressable
                                         for x in jax.tree.leaves(state["params"]))
print("RESULT", json.dumps(result), flush=True)
