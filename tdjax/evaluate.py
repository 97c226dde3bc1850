r"""The ADM evaluation suite on sample batches: FID, sFID, Inception Score, precision, recall.

  python -m tdjax.evaluate --samples S.npz --reference R.npz --inception inception.npz [--out M.json]
  python -m tdjax.evaluate --samples S.npz --reference R.npz --judge CLASSIFIER_DIR
  python -m tdjax.evaluate --samples S.npz --reference split:test --judge CLASSIFIER_DIR

S.npz is what `tdjax.sample --out S.npz` writes (arr_0 uint8 NHWC, labels); R.npz the same format
(ADM's reference batches), or `split:NAME` for as many real images of the judge's dataset split as
there are samples.  A reference .npz without images but with stored feature statistics (`mu`,
`sigma`, optionally sFID's `mu_s`, `sigma_s`: the FID statistics files of MAR / TransDiff /
torch-fidelity) gives FID (and sFID) from those statistics and IS from the samples; precision and
recall need reference images and come out null, with the reason under "not_computed".  A file with
both images and statistics (ADM's VIRTUAL_*.npz) is evaluated on its images (statistics of this
feature net; ADM's evaluator reads its stored TF-graph statistics instead).  The feature net is a classifier trained on the dataset (`configs/classifier.py`):
pooled features for FID and precision/recall (k = 3), the first 7 channels of its second stage for
sFID, its logits for IS, and class accuracy when the samples carry labels.  With `--inception` the
feature net is the FID InceptionV3 instead (`tdjax.nn.inception`, weights converted from pytorch-fid's
file by `python -m tdjax.convert --kind inception`): ImageNet numbers comparable with the papers',
up to the resize (pytorch-fid's half-pixel bilinear, not TF's).  The formulas are ADM's
(`tdjax.evaluation`), statistics in float64.  Started on several processes (`--multihost`, as
the launch scripts do), each computes the metrics on its own devices and process 0 reports them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags, logging

from tdjax import cli, evaluation, metrics, parallel
from tdjax.data import pipeline

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("samples", None, "Samples .npz (arr_0 uint8 NHWC, optional labels).")
  flags.DEFINE_string("reference", None, "Reference .npz (images as arr_0, or statistics only: "
                      "mu, sigma[, mu_s, sigma_s]), or split:NAME (real images of the judge's "
                      "dataset).")
  flags.DEFINE_string("judge", None, "Classifier workdir whose features the metrics use.")
  flags.DEFINE_string("inception", None, "InceptionV3 weights .npz (tdjax.convert --kind "
                      "inception): ADM's feature net instead of a classifier.")
  flags.DEFINE_string("out", None, "Write the metrics here as JSON as well.")
  flags.DEFINE_integer("batch_size", 500, "Images per feature batch.")
  flags.DEFINE_integer("k", 3, "Neighbourhood size of precision/recall.")
  cli.define_multihost_flag("every process computes the metrics on its own devices, process "
                            "0 prints and writes them")


def real_images(judge, split: str, num: int):
  """`num` real images (uint8, record order) of `split` of the judge's dataset."""
  cfg = pipeline.with_defaults(judge.config.input)
  cfg.update(dict(batch_size=min(num, 1000), shuffle=False, augment="none"))
  it = pipeline.make_image_pipeline(cfg, seed=0, split=split, train=False)
  images = np.concatenate([next(it)["image"] for _ in range(-(-num // cfg.batch_size))])[:num]
  return metrics.to_uint8(images)


def reference_batch(path: str):
  """A reference .npz -> its uint8 images (arr_0), or, when it holds no images, its stored
  statistics (dict: mu, sigma[, mu_s, sigma_s]); the format error of load_image_batch when it holds
  neither."""
  if os.path.exists(path):
    with np.load(path) as f:
      has_images = "arr_0" in f.files
    if not has_images:
      stats = evaluation.load_reference_statistics(path)
      if stats is not None:
        logging.info("%s: no images, FID%s from its stored statistics", path,
                     " and sFID" if "mu_s" in stats else "")
        return stats
  return evaluation.load_image_batch(path)[0]


def evaluate(samples: str, reference: str, judge_dir: str | None = None, *,
             inception: str | None = None, batch_size: int = 500, k: int = 3) -> dict:
  if bool(judge_dir) == bool(inception):
    raise ValueError("give exactly one feature net: --judge CLASSIFIER_DIR or --inception "
                     "WEIGHTS.npz")
  if inception:
    judge, features = evaluation.InceptionJudge(inception), f"InceptionV3 {inception}"
  else:
    judge, features = evaluation.ClassifierJudge(judge_dir), f"classifier {judge_dir}"
  images, labels = evaluation.load_image_batch(samples)
  if reference.startswith("split:"):
    if inception:
      raise ValueError(f"--reference={reference}: real splits come from a classifier judge's "
                       f"dataset; with --inception give a reference .npz")
    ref = real_images(judge, reference[len("split:"):], len(images))
  else:
    ref = reference_batch(reference)
  # class accuracy only for the classifier: Inception's 1008 outputs are not the dataset's labels
  result = evaluation.evaluate_batches(judge.extract, images, ref, None if inception else labels,
                                       batch_size=batch_size, k=k)
  result.update(samples=samples, reference=reference, features=features)
  return result


def main(argv):
  del argv
  parallel.initialize_distributed(FLAGS.multihost)    # before any other JAX call
  result = evaluate(FLAGS.samples, FLAGS.reference, FLAGS.judge, inception=FLAGS.inception,
                    batch_size=FLAGS.batch_size, k=FLAGS.k)
  if jax.process_index() != 0:
    return
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)
    logging.info("wrote %s", FLAGS.out)
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["samples", "reference"])
  cli.run(main)
