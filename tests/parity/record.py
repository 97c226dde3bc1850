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
teacher-forced logits under its group-causal mask and 2D RoPE), detailflow_gpt_parallel (the same
with causal_num=0: every group parallel), detailflow_tokenizer (DetailFlow's VQ tokenizer: encoder
latents, codes, prefix decodings), transdiff_decoder (TransDiff's diffusion decoder: velocities for
x_t, t, a condition), transdiff_mrar (TransDiff's MRAR AR transformer: block-causal conditions
with reference images).  MAR's KL-16 VAE is not among them: the live test builds the full-size
one (tens of millions of weights), far over the 200 KB a fixture may take.  The builders are those
of the reference tests (tests/test_reference_repos.py, tests/test_reference_transdiff.py; the
tokenizer's encoder at its decoder's width, to fit).  Re-record after a deliberate change of a
fixture's recipe only: the point of the files is that they do not move.
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


def detailflow_gpt(rr, torch, causal_num=None) -> tuple[dict, dict, dict, dict]:
  """DetailFlow's GPT (autoregressive/models/gpt.py) at the reference's default causal_num (None:
  the first group token-causal) or the given one (0: every group parallel, the live `gpt_pair`'s
  second case): logits of the teacher-forced training forward (`basic_group_inference=True`)."""
  n, g, v, classes = 16, 4, 64, 10
  dims = dict(dim=32, n_layer=2, n_head=2, multiple_of=32)
  gpt = rr.reference_module("DetailFlow", "autoregressive.models.gpt")
  layout = {} if causal_num is None else dict(causal_num=causal_num)
  args = gpt.ModelArgs(**dims, vocab_size=v, num_classes=classes, block_size=n, group_size=g,
                       cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0,
                       ffn_dropout_p=0.0, class_dropout_prob=0.1, **layout)
  torch.manual_seed(0)
  ref = _exact16(rr.randomize(gpt.Transformer(args), seed=1))
  rng = np.random.default_rng(0)
  codes = rng.integers(0, v, (3, n)).astype(np.int64)
  labels = np.array([0, 7, classes], np.int64)                  # `classes`: the null class
  with torch.no_grad():
    logits, _ = ref(torch.from_numpy(codes[:, :n - g]), torch.from_numpy(labels),
                    basic_group_inference=True)
  return (_state_dict(ref), dict(codes=codes, labels=labels), dict(logits=logits.numpy()),
          dict(tokens=n, group=g, vocab=v, classes=classes, **dims, **layout))


def detailflow_gpt_parallel(rr, torch) -> tuple[dict, dict, dict, dict]:
  """`detailflow_gpt` with causal_num=0 (no token-causal first group: all groups parallel)."""
  return detailflow_gpt(rr, torch, causal_num=0)


def _half(a: np.ndarray) -> np.ndarray:
  """float32 inputs rounded to float16 (stored so: exact, and half the bytes)."""
  return np.asarray(a, np.float32).astype(np.float16)


def detailflow_tokenizer(rr, torch) -> tuple[dict, dict, dict, dict]:
  """DetailFlow's VQ tokenizer (modelling/tokenizer.py: causal SigLIP2 encoder, l2-normalised
  codebook, bidirectional decoder) as the live `tokenizer_pair` fixture builds it (tiny: 32 px,
  patch 8, 8 tokens in groups of 2), its state dict as a checkpoint's "model" entry: the
  quant_conv latents z, the codes and z_q of two images, and the decodings of z_q's prefixes
  (t tokens at resolution res) for the `DECODES` pairs."""
  import pathlib
  import tempfile
  from unittest import mock

  with tempfile.TemporaryDirectory() as tmp:
    class Factory:                             # pytest's tmp_path_factory, as the fixture uses it
      def mktemp(self, name):
        return pathlib.Path(tempfile.mkdtemp(prefix=name, dir=tmp))
    with mock.patch.dict(rr.ENC, TOKENIZER_ENC):
      ref, _, _ = rr.tokenizer_pair.__wrapped__(Factory())
    ref = _exact16(ref)
    x = _half(rr._images(b=2, seed=0)[0])
    x_t = torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2).copy())
    outputs = {}
    with torch.no_grad():
      outputs["z"] = ref.quant_conv(ref.encoder(x_t).latent_token).numpy()
      quant, _, info = ref.encode(x_t)
      outputs.update(z_q=quant.numpy(), indices=info[2].numpy().reshape(x.shape[0], -1))
      for t, res in DECODES:
        outputs[f"decode_{t}_{res}"] = ref.decode(quant, t, res).pixel_value.numpy() \
            .transpose(0, 2, 3, 1)
  sd = {k: v for k, v in _state_dict(ref).items() if not k.startswith(TOKENIZER_TRAINING_ONLY)}
  return (sd, dict(images=x), outputs,
          dict(**rr.TOK, enc_heads=TOKENIZER_ENC["num_heads"], dec_heads=rr.DEC["num_heads"],
               decodes=DECODES))


DECODES = [(8, 24), (4, 16)]        # (prefix length, resolution) of the tokenizer's decodings
# the live fixture's encoder is 48 wide; at 32 (its decoder's width) the weights fit the 200 KB
TOKENIZER_ENC = dict(embed_dim=32, num_heads=4)
# buffers the converter drops (the 65536-entry code-usage counter alone would take 128 KB)
TOKENIZER_TRAINING_ONLY = ("quantize.codebook_used", "repa_model.", "global_token_proj.")


def transdiff_mrar(rr, torch) -> tuple[dict, dict, dict, dict]:
  """TransDiff's MRAR AR transformer (models/transdiff_mrar.py: class buffer, 64 mask slots and
  up to 3 reference images as 2x2 patches, block-causal mask) of the tiny model of
  tests/test_reference_transdiff.py (`_pair(mrar=True)`), its AR keys only (the decoder is
  `transdiff_decoder`'s): `forward_encoder` + `diffusion_pos_embed_learned` with 3 references.
  Its rows are block-causal, so those of fewer references are this output's first 64 (k + 1)
  rows (checked here against the reference's own runs with 1 and 0 references)."""
  import pytest
  import test_reference_transdiff as rt
  with pytest.MonkeyPatch.context() as mp:        # that module's float32 CPU adaptations
    dd = rr.reference_module("TransDiff", "models.diffdecoder")
    mp.setattr(dd, "torch", rt._Proxy(bfloat16=torch.float32))
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref, _, _ = rt._pair(mrar=True)
    ref = _exact16(ref)
    imgs = _half(rt._latents(3, 2, 3))            # [B, 3 references, 16, 16, C]
    labels = np.array([4, 6], np.int64)
    conds = {}
    with torch.no_grad():
      for k in (3, 1, 0):
        z = ref.forward_encoder(rt._mrar_tokens(ref, imgs.astype(np.float32), k),
                                ref.class_emb(torch.from_numpy(labels)))
        conds[k] = (z + ref.diffusion_pos_embed_learned[:, :z.shape[1]]).numpy()
  for k in (1, 0):
    np.testing.assert_allclose(conds[k], conds[3][:, :conds[k].shape[1]], rtol=1e-5, atol=1e-5)
  sd = {k: v for k, v in _state_dict(ref).items() if not k.startswith("diffdecoder.")}
  return (sd, dict(images=imgs, labels=labels), dict(conditions=conds[3]),
          dict(channels=rt.C, grid=rt.GRID, classes=rt.CLASSES, width=rt.REF["encoder_embed_dim"],
               num_heads=rt.HEADS, ar_depth=2 * rt.REF["encoder_depth"], refs=3, block=64))


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
            "transdiff_decoder": transdiff_decoder,
            "detailflow_gpt_parallel": detailflow_gpt_parallel,
            "detailflow_tokenizer": detailflow_tokenizer, "transdiff_mrar": transdiff_mrar}


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
