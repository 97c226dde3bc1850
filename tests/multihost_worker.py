"""One process of the multi-host test: `python multihost_worker.py PID NPROC PORT WORKDIR STEPS MESH`.

Started by tests/test_multihost.py with 4 fake CPU devices per process; runs the real training loop
after `jax.distributed.initialize` with a local coordinator (gloo CPU collectives)."""

import json
import sys

pid, nproc, port, workdir, steps, mesh = sys.argv[1:7]
import jax  # noqa: E402

if int(nproc) > 1:
  jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))

from toy_task import toy_config  # noqa: E402
from tdjax import trainer  # noqa: E402

config = toy_config(total_steps=int(steps), ckpt_every=2, async_checkpoint=True)
config.mesh.update(json.loads(mesh))
result = trainer.train_and_evaluate(config, workdir)
print("RESULT", json.dumps({"pid": int(pid), "devices": jax.device_count(),
                            "local": jax.local_device_count(), "loss": result["loss"]}))
