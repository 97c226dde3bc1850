"""tdjax against recorded outputs of the reference repositories' own code, in CI (no torch needed).

tests/parity/record.py ran the reference modules (MAR's SimpleMLPAdaLN, DetailFlow's GPT,
TransDiff's diffusion decoder) at tiny sizes with seeded random weights on fixed inputs and saved
their state dicts (official key names), inputs and outputs in tests/fixtures/parity/*.npz.  Here
each state dict goes through tdjax's converter and the tdjax module must give the recorded outputs
at the tolerances of the live reference tests (tests/test_reference_repos.py,
tests/test_reference_transdiff.py), which need torch and the checkouts.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdjax import configlib, convert
from tdjax.generators import next_detail as nd
from tdjax.generators.heads import make_head

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")


def load(name):
  """(state dict as float32, inputs, outputs, meta) of fixture `name`."""
  path = os.path.join(FIXTURES, name + ".npz")
  with np.load(path, allow_pickle=False) as f:
    part = lambda p: {k[len(p):]: f[k] for k in f.files if k.startswith(p)}
    sd = {k: v.astype(np.float32) for k, v in part("sd/").items()}
    return sd, part("in/"), part("out/"), json.loads(str(f["meta"]))


def close(got, want, tol):
  """rtol = tol, atol = tol x the largest |want| (as the reference tests' `_close`)."""
  want = np.asarray(want)
  assert np.asarray(got).shape == want.shape
  assert float(np.abs(want).max()) > 0.1               # random weights: the outputs are not ~0
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                             atol=tol * max(1.0, float(np.abs(want).max())))


def test_fixtures_are_small_and_complete():
  sizes = {n: os.path.getsize(os.path.join(FIXTURES, n)) for n in os.listdir(FIXTURES)
           if n.endswith(".npz")}
  assert set(sizes) == {"mar_head.npz", "detailflow_gpt.npz", "transdiff_decoder.npz"}
  assert max(sizes.values()) < 200 * 1024, sizes


def test_mar_head_matches_recorded_simplemlpadaln(tmp_path):
  """MAR's checkpoint keys (diffloss.net.*) -> `convert_mar_head` (the .npz it writes) ->
  MLPHead(x, t, c) = the reference's output for the integer steps 0..999."""
  sd, i, o, meta = load("mar_head")
  np.savez(str(tmp_path / "mar.npz"), **sd)
  info = convert.convert_mar_head(str(tmp_path / "mar.npz"), str(tmp_path / "head.npz"))
  assert (info["width"], info["depth"]) == (meta["width"], meta["depth"])
  head, params = convert.load_mar_head(str(tmp_path / "head.npz"))
  got = head.apply({"params": params}, jnp.asarray(i["x"])[:, None], jnp.asarray(i["t"]),
                   jnp.asarray(i["c"])[:, None])[:, 0]
  close(got, o["out"], 1e-5)


def test_detailflow_gpt_matches_recorded_logits():
  """DetailFlow's GPT state dict -> `detailflow_gpt_params` -> NextDetailTransformer's
  teacher-forced logits on the recorded codes and labels (the null class among them)."""
  sd, i, o, m = load("detailflow_gpt")
  dims = convert.gpt_dims(sd)
  assert (dims["group_size"], dims["vocab_size"], dims["num_classes"]) == (m["group"], m["vocab"],
                                                                          m["classes"])
  n, g = m["tokens"], m["group"]
  model = nd.NextDetailTransformer(vocab_size=m["vocab"], num_tokens=n, group_size=g,
                                   num_classes=m["classes"], dim=m["dim"], depth=m["n_layer"],
                                   num_heads=m["n_head"], mlp_dim=dims["mlp_dim"],
                                   class_dropout=0.0, token_dropout=0.0, dropout=0.0, scan=False)
  expected = jax.eval_shape(lambda: nn.unbox(nd.init_params(model, jax.random.key(0))))
  params = convert.detailflow_gpt_params(sd, m["n_layer"], m["n_head"], expected)
  ids = nd.layout_ids(jnp.asarray(nd.next_detail_inputs(i["codes"], g)), n, g)
  got = model.apply({"params": params}, ids, jnp.asarray(i["labels"]))
  close(got, o["logits"], 1e-4)


def test_transdiff_decoder_matches_recorded_velocities():
  """TransDiff's decoder keys (diffdecoder.net.*) -> `transdiff_params` -> the attention head of
  configs/transdiff.py (tiny, at the recorded width, depth and heads) on (x_t, 1000 t, c)."""
  sd, i, o, m = load("transdiff_decoder")
  cfg = ml_collections.ConfigDict(dict(configlib.load_config("transdiff", "size=tiny").head))
  cfg.update(dict(width=m["width"], depth=m["depth"], num_heads=m["num_heads"],
                  max_len=m["tokens"]))
  head = make_head(cfg, m["channels"])
  x, t, c = (jnp.asarray(i[k]) for k in ("x", "t", "cond"))
  expected = {"head": jax.eval_shape(lambda: nn.unbox(head.init(jax.random.key(0), x, t, c))
                                     ["params"])}
  params = convert.transdiff_params(sd, expected, m["num_heads"])["head"]
  got = head.apply({"params": params}, x, t, c)
  close(got, o["velocity"], 1e-4)


@pytest.mark.parametrize("name,key", [("mar_head", "diffloss.net.res_blocks.1.mlp.2.weight"),
                                      ("detailflow_gpt", "layers.1.attention.wo.weight"),
                                      ("transdiff_decoder", "diffdecoder.net.cond_embed.weight")])
def test_fixtures_hold_the_official_key_names(name, key):
  sd, _, _, _ = load(name)
  assert key in sd, sorted(sd)[:8]
