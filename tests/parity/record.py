r"""Records the reference outputs that tests/test_parity.py checks tdjax against in CI (no torch).

  TDJAX_REFERENCE_REPOS=$REFS python tests/parity/record.py      # or --refs $REFS [--only NAME]

$REFS holds checkouts of the reference repositories (DetailFlow/, TransDiff/, mar/, as in
tests/test_reference_repos.py), which are imported at run time here: nothing of theirs is copied.
Each fixture is one reference module at a tiny size with seeded random weights, run on fixed inputs
in float32 on the CPU, saved as tests/fixtures/parity/NAME.npz:

  sd/<key>   the module's state dict under the key names of the official checkpoints (float16
             where that is exact: the weights are rounded to float16 before the run, so the file is
             half the size and the outputs are those of the stored weights)
  in/<name>  the inputs;  out/<name>  the reference's outputs;  meta  a JSON string (the sizes)

Fixtures: mar_head (MAR's SimpleMLPAdaLN diffusion head), detailflow_gpt (DetailFlow's GPT,
teacher-forced logits under its group-causal mask and 2D RoPE), transdiff_decoder (TransDiff's
diffusion decoder: velocities for x_t, t, a condition).  The builders are those of the reference
tests (tests/test_reference_repos.py, tests/test_reference_transdiff.py).  Re-record after a
deliberate change of a fixture's recipe only: the point of the files is that they do not move.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(TESTS, "fixtures", "parity")
LIMIT = 200 * 1024          # bytes per fixture


def _exact16(module):
  """Rounds every parameter to the nearest float16 (kept in float32), so the stored float16
  weights are exactly the ones the reference ran with."""
  import torch
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(p.half().float())
  return module.eval()


def _state_dict(module, prefix: str = "") -> dict:
  out = {}
  for k, v in module.state_dict().items():
    a = v.detach().float().numpy().copy()
    half = a.astype(np.float16)
    out[prefix + k] = half if np.array_equal(half.astype(np.float32), a) else a
  return out


def mar_head(rr, torch) -> tuple[dict, dict, dict, dict]:
  """MAR's SimpleMLPAdaLN (models/diffloss.py) under `diffloss.net.`, as in MAR's checkpoints;
  t the integer steps 0..999 that MAR's diffusion feeds it."""
  C, Dc, W, depth = 4, 6, 32, 2
  net = _exact16(rr.mar_head(C, Dc, W, depth, seed=7))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, C)).astype(np.float32)
  c = rng.normal(size=(8, Dc)).astype(np.float32)
  t = np.array([0, 1, 5, 100, 500, 900, 998, 999], np.int64)
  with torch.no_grad():
    out = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()
  return (_state_dict(net, "diffloss.net."), dict(x=x, t=t, c=c), dict(out=out),
          dict(in_channels=C, z_channels=Dc, width=W, depth=depth))


def detailflow_gpt(rr, torch) -> tuple[dict, dict, dict, dict]:
  """DetailFlow's GPT (autoregressive/models/gpt.py) at the reference's default causal_num:
  logits of the teacher-forced training forward (`basic_group_inference=True`)."""
  n, g, v, classes = 16, 4, 64, 10
  dims = dict(dim=32, n_layer=2, n_head=2, multiple_of=32)
  gpt = rr.reference_module("DetailFlow", "autoregressive.models.gpt")
  args = gpt.ModelArgs(**dims, vocab_size=v, num_classes=classes, block_size=n, group_size=g,
                       cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0,
                       ffn_dropout_p=0.0, class_dropout_prob=0.1)
  torch.manual_seed(0)
  ref = _exact16(rr.randomize(gpt.Transformer(args), seed=1))
  rng = np.random.default_rng(0)
  codes = rng.integers(0, v, (3, n)).astype(np.int64)
  labels = np.array([0, 7, classes], np.int64)                  # `classes`: the null class
  with torch.no_grad():
    logits, _ = ref(torch.from_numpy(codes[:, :n - g]), torch.from_numpy(labels),
                    basic_group_inference=True)
  return (_state_dict(ref), dict(codes=codes, labels=labels), dict(logits=logits.numpy()),
          dict(tokens=n, group=g, vocab=v, classes=classes, **dims))


def transdiff_decoder(rr, torch) -> tuple[dict, dict, dict, dict]:
  """TransDiff's diffusion decoder (models/diffdecoder.py `DiffusionDeocder`, the blocks of
  models/crossattention.py) of the tiny model of tests/test_reference_transdiff.py, under
  `diffdecoder.net.` as in TransDiff's checkpoints: velocities for (x_t, c, 1000 t)."""
  import pytest
  import test_reference_transdiff as rt
  with pytest.MonkeyPatch.context() as mp:        # that module's float32 CPU adaptations
    dd = rr.reference_module("TransDiff", "models.diffdecoder")
    mp.setattr(dd, "torch", rt._Proxy(bfloat16=torch.float32))
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref, _, _ = rt._pair(mrar=False)
    net = _exact16(ref.diffdecoder.net)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, rt.L, rt.C)).astype(np.float32)
    cond = rng.normal(size=(2, 7, rt.REF["encoder_embed_dim"])).astype(np.float32)
    t = (np.array([0.04, 0.999], np.float32) * np.float32(1000)).astype(np.float32)
    with torch.no_grad():
      out = net(torch.from_numpy(x), torch.from_numpy(cond), torch.from_numpy(t)).numpy()
  return (_state_dict(net, "diffdecoder.net."), dict(x=x, cond=cond, t=t), dict(velocity=out),
          dict(channels=rt.C, width=rt.REF["decoder_embed_dim"], num_heads=rt.HEADS,
               depth=rt.REF["decoder_depth"], tokens=rt.L))


FIXTURES = {"mar_head": mar_head, "detailflow_gpt": detailflow_gpt,
            "transdiff_decoder": transdiff_decoder}


def save(path: str, sd: dict, inputs: dict, outputs: dict, meta: dict) -> int:
  arrays = {**{f"sd/{k}": v for k, v in sd.items()}, **{f"in/{k}": v for k, v in inputs.items()},
            **{f"out/{k}": v for k, v in outputs.items()}, "meta": np.array(json.dumps(meta))}
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--refs", default=os.environ.get("TDJAX_REFERENCE_REPOS", ""),
                 help="folder with the DetailFlow/, TransDiff/ and mar/ checkouts "
                      "(default: $TDJAX_REFERENCE_REPOS)")
  p.add_argument("--out", default=OUT, help=f"fixture folder (default: {OUT})")
  p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(FIXTURES)}")
  a = p.parse_args(argv)
  if not a.refs or not os.path.isdir(a.refs):
    p.error(f"--refs={a.refs!r}: give the folder of the reference checkouts")
  names = a.only.split(",") if a.only else list(FIXTURES)
  unknown = sorted(set(names) - set(FIXTURES))
  if unknown:
    p.error(f"--only: unknown fixtures {unknown}; expected some of {list(FIXTURES)}")
  os.environ["TDJAX_REFERENCE_REPOS"] = os.path.abspath(a.refs)   # read by the reference tests
  sys.path.insert(0, TESTS)
  import torch
  torch.set_num_threads(1)                    # deterministic float32 reductions on the CPU
  import test_reference_repos as rr          # reference_module, randomize and the builders
  os.makedirs(a.out, exist_ok=True)
  for name in names:
    size = save(os.path.join(a.out, name + ".npz"), *FIXTURES[name](rr, torch))
    print(f"{name}: {size / 1024:.1f} KiB")
    if size > LIMIT:
      raise SystemExit(f"{name}: {size} bytes, over the {LIMIT} bytes a fixture may take")


if __name__ == "__main__":
  main()
