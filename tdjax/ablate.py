r"""Paper ablation tables by one command.

  python -m tdjax.ablate --table NAME --scale demo|quick|long|tiny|full --workdir DIR [--judge CLASSIFIER_DIR]
      [--rows 0,2] [--seed K] [--teacher TEACHER.npz]

Every row is a set of config arguments (never a copied config file).  `demo`, `quick` (the demo
models on shorter schedules: tokenizer 500, AR 750, TransDiff 500 steps; 50 samples per class),
`long` (the demo scale with the DetailFlow tokenizer trained three times as long, 3,000 steps) and
`tiny` (the seconds-long smoke scale of the tests) train and sample each row here, score the
samples with the classifier judge (class accuracy and Fréchet distance on its features, 100
samples per class at demo scale),
and write DIR/NAME.md, DIR/NAME.json, DIR/NAME.png (one bar per row) and DIR/NAME_samples.png (one
row of samples per table row); `full` prints the launch commands of the paper-scale runs and runs
nothing.  Beside the judged figures each row reports its generator's training step time (median of
its log), its sampling latency per image and, for TransDiff, the analytic FLOPs per image of one
sampling step (from tdjax.sample's judge file), and a table run in the folder of its family's seed
table (transdiff_seeds / detailflow_seeds) carries that table's spread.  Rows that share a stage (e.g. the tokenizer of
the CFG table) share its workdir, and so do rows whose arguments only restate a default (the
default row of Tables 3 and 4, the alpha sweep and the token count is one run: `canonical_args`);
samples are named by model and sampling flags, so rows that sample one model alike share them;
a finished stage is skipped on re-runs, so a stopped ablation resumes.  `--seed K` repeats a table
with every training seeded K (new run folders, DIR/NAME_seedK.*): its rows' run-to-run spread.
The paper's figures (from docs/reference/) sit beside ours, marked as such.

Tables: detailflow_table2 (Table 2: unordered tokens = causal_encoder=False, no R(n) supervision =
degrade_p=0, g = 1, then the additions; "parallel" and "+ self-correction" train the tokenizer with
first_group_causal=False (the reference's causal_num = 0, every group parallel; the AR model reads
it from the codes file), "+ first group causal" with the default c = g; the alignment row needs
SigLIP2 teacher weights, or `--teacher` names another teacher file: `with_teacher`), detailflow_cfg (Table 5), detailflow_degrade
(Table 3), detailflow_group (Table 4), detailflow_alpha (Fig. 4c), detailflow_tokens,
transdiff_heads (head type and the attention-in-head variants), survey_heads (the attention survey's
switches of the attention head: adaLN-zero, gated cross-attention, joint attention, qk-norm, a
condition t range, a time-dependent temperature, windowed / linear self-attention, token merging,
perturbed-attention guidance; today's heads as reference rows), transdiff_depth, transdiff_steps,
transdiff_mrar, transdiff_refs (MRAR with 1 / 2 / 3 references), transdiff_seeds and
detailflow_seeds (not paper tables: the TransDiff 1-step model, or the DetailFlow tokenizer and its
AR model, trained with seeds 0 / 1 / 2: the run-to-run spread).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import subprocess
import sys

import numpy as np
from absl import flags, logging
from PIL import Image, ImageDraw
from tqdm import tqdm

from tdjax import cli, configlib
from tdjax import metrics as metrics_lib

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Row:
  label: str
  tokenizer: str = ""          # DetailFlow: tokenizer config args added to the scale's base
  generator: str = ""          # AR / TransDiff config args added to the scale's base
  sample: dict = dataclasses.field(default_factory=dict)   # tdjax.sample flags
  paper: str = ""              # the paper's figures for this row, as text
  needs: str = ""              # what the row needs beyond this machine (skipped below full scale)


@dataclasses.dataclass
class Table:
  title: str
  family: str                  # 'detailflow' | 'transdiff'
  rows: list
  paper_source: str


_DF = "docs/reference/detailflow.md 3.2"
_TD = ("not in docs/reference/transdiff.md (TransDiff's ablation tables were not "
       "retrieved)")
# What docs/reference/transdiff.md 3.1 has: whole-model ImageNet 256 FID-50K from the official
# READMEs, for TransDiff-B / L / H (1-step and MRAR with 3 references) and for MAR (MLP head + DDPM)
_TD_MODELS = ("docs/reference/transdiff.md 3.1: whole-model ImageNet 256 FID-50K from the "
              "official READMEs (the paper's ablation tables were not retrieved)")
_TD_1STEP = "TransDiff-B / L / H 1-step: FID 2.47 / 1.69 / 1.61"
_TD_MRAR = "TransDiff-B / L / H MRAR (3 references): FID 2.25 / 1.49 / 1.42"
_HEAD_PAPER = {   # whole models, not a controlled ablation: MAR also differs in its masked AR
    "attention head, cross-attention (TransDiff)": _TD_1STEP,
    "MLP head, DDPM (MAR)": "MAR-B / L / H (masked AR, 256 steps): FID 2.31 / 1.78 / 1.55"}
# the TransDiff tables sample at 50 Euler-Maruyama steps (the steps table's plateau), so rows of one
# model (the default 1-step model, MRAR with 3 references) share their samples across tables
_TD_SAMPLE = {"steps": 50}
_T2_AR = "correction=0.0"     # the AR model's self-correction training belongs to its own row
_SIGLIP2 = "SigLIP2"          # the alignment teacher the paper names (`with_teacher` replaces it)
TABLES = {
    "detailflow_table2": Table("DetailFlow Table 2: cumulative additions", "detailflow", [
        Row("baseline (unordered 1D tokens)", tokenizer="causal_encoder=False,degrade_p=0.0,"
            "correction=False,group=1", generator=f"group=1,{_T2_AR}", paper="gFID 3.97, R 0.50, "
            "128 steps"),
        Row("+ causal encoder", tokenizer="degrade_p=0.0,correction=False,group=1",
            generator=f"group=1,{_T2_AR}", paper="gFID 3.66, R 0.53, 128 steps"),
        Row("+ coarse-to-fine (R(n) supervision)", tokenizer="correction=False,group=1",
            generator=f"group=1,{_T2_AR}", paper="gFID 3.33, R 0.54, 128 steps"),
        Row("+ parallel (g = 4, all groups parallel)",
            tokenizer="correction=False,first_group_causal=False", generator=_T2_AR,
            paper="gFID 4.11, R 0.50, 32 steps"),
        Row("+ self-correction", tokenizer="first_group_causal=False",
            paper="gFID 3.68, R 0.51, 32 steps"),
        Row("+ first group causal", paper="gFID 3.59, R 0.51, 35 steps"),
        Row(f"+ alignment loss (first token vs {_SIGLIP2})", tokenizer="align=1.0",
            paper="gFID 3.35, R 0.55, 35 steps",
            needs="SigLIP2 teacher weights: --config.loss.align_teacher_weights=siglip2.npz")],
        _DF),
    "detailflow_cfg": Table("DetailFlow Table 5: CFG scale", "detailflow", [
        Row(f"CFG {c}", sample={"cfg": c}, paper=p) for c, p in
        ((1.4, "gFID 2.79, IS 229.1"), (1.5, "gFID 2.75, IS 250.8"), (1.6, "gFID 2.81, IS 268.1"),
         (1.7, "gFID 3.02, IS 283.2"))], _DF),
    "detailflow_degrade": Table("DetailFlow Table 3: coarse-to-fine (degraded prefix) probability",
                                "detailflow", [
        Row(f"{p}%", tokenizer=f"degrade_p={p / 100}", paper=f) for p, f in
        ((10, "rFID 2.0, gFID 4.18"), (20, "rFID 1.8, gFID 3.81"), (30, "rFID 1.9, gFID 4.18"))],
        _DF),
    "detailflow_group": Table("DetailFlow Table 4: group size", "detailflow", [
        Row(f"g = {g}", tokenizer=f"group={g}", generator=f"group={g}", paper=f) for g, f in
        ((4, ""), (8, "gFID 2.75, rFID 0.80, PSNR 20.8 dB, 39 steps (N = 256)"),
         (16, "gFID 2.88, rFID 0.81, PSNR 20.8 dB, 31 steps (N = 256)"))],
        _DF),
    "detailflow_alpha": Table("DetailFlow Fig. 4c: R(n) power alpha", "detailflow", [
        Row(f"alpha {a}", tokenizer=f"alpha={a}", paper="best" if a == 1.5 else "")
        for a in (0.5, 1.0, 1.5, 2.0)],
        "docs/reference/detailflow.md 3.2 (Fig. 4c: optimum 1.5)"),
    "detailflow_tokens": Table("DetailFlow: token count", "detailflow", [
        Row(f"N = {n}", tokenizer=f"tokens={n}", generator=f"tokens={n}", paper=f) for n, f in
        ((16, "N = 128 (DetailFlow-16): gFID 2.96, rFID 1.22, PSNR 19.39 dB"),
         (32, "N = 256 (DetailFlow-32): gFID 2.75, rFID 0.80, PSNR 20.80 dB"),
         (64, "N = 512 (DetailFlow-64): gFID 2.62, rFID 0.55, PSNR 22.49 dB"))],
        "docs/reference/detailflow.md 1.9 and 3.2 (the paper's N at 256x256; the rows here use "
        "N / 8 at 32x32)"),
    "transdiff_heads": Table("Diffusion head: type and attention-in-head variants", "transdiff", [
        Row(label, generator=g, sample=_TD_SAMPLE, paper=_HEAD_PAPER.get(label, ""))
        for label, g in (
            ("attention head, cross-attention (TransDiff)", ""),
            ("MLP head, rectified flow", "head=mlp"),
            ("MLP head, DDPM (MAR)", "head=mlp,diffusion=ddpm"),
            ("attention head, no self-attention", "self_attention=False"),
            ("attention head, adaLN conditioning", "conditioning=adaln"),
            ("attention head, in-context conditioning", "conditioning=incontext"))], _TD_MODELS),
    # the attention-in-diffusion survey's switches of the attention head (heads.py docstring):
    # today's heads as reference rows, then one switch per row on the cross-attention head
    "survey_heads": Table("Attention diffusion head: the attention survey's switches",
                          "transdiff", [
        Row(label, generator=g, sample=dict(_TD_SAMPLE, **extra))
        for label, g, extra in (
            ("attention head, cross-attention (TransDiff)", "", {}),
            ("attention head, adaLN conditioning", "conditioning=adaln", {}),
            ("attention head, in-context conditioning", "conditioning=incontext", {}),
            ("MLP head, rectified flow", "head=mlp", {}),
            ("adaLN-zero (DiT)", "adaln=zero", {}),
            ("gated cross-attention", "cross_gate", {}),
            ("joint attention (MMDiT)", "conditioning=joint", {}),
            ("qk-norm", "qk_norm", {}),
            ("condition only for t in [0, 0.5] (near the data)", "t_range=0.0:0.5", {}),
            ("time-dependent attention temperature", "attn_temp=learned_t", {}),
            ("windowed self-attention (3 x 3)", "window=3", {}),
            ("linear self-attention (elu + 1)", "linear_attn", {}),
            ("token merging (r = 16 of 64)", "merge=16", {}),
            ("perturbed-attention guidance (scale 1.5)", "", {"pag_scale": 1.5}))],
        "not in docs/reference/ (the survey reports no controlled comparison of these switches)"),
    "transdiff_depth": Table("TransDiff: decoder depth", "transdiff", [
        Row(f"head depth {d}", generator=f"head_depth={d}", sample=_TD_SAMPLE)
        for d in (1, 2, 4)], _TD),
    "transdiff_steps": Table("TransDiff: sampling steps", "transdiff", [
        Row(f"{s} steps", sample={"steps": s}) for s in (10, 25, 50, 100)], _TD),
    "transdiff_mrar": Table("TransDiff: 1-step vs MRAR", "transdiff", [
        Row("1-step", sample=_TD_SAMPLE, paper=_TD_1STEP),
        Row("MRAR (3 references), from the 1-step run", generator="mrar=True",
            sample=_TD_SAMPLE, paper=_TD_MRAR)], _TD_MODELS),
    "transdiff_refs": Table("TransDiff MRAR: number of reference images", "transdiff", [
        Row("1-step (0 references)", sample=_TD_SAMPLE, paper=_TD_1STEP)] + [
        Row(f"MRAR, {r} reference{'s' * (r > 1)}", generator=f"mrar=True,refs={r}",
            sample=_TD_SAMPLE, paper=_TD_MRAR if r == 3 else "") for r in (1, 2, 3)], _TD_MODELS),
    # not a paper table: the run-to-run spread that every other table's gaps must exceed
    "transdiff_seeds": Table("TransDiff 1-step: training seed (run-to-run spread)", "transdiff", [
        Row(f"seed {s}", generator=f"seed={s}", sample=_TD_SAMPLE) for s in (0, 1, 2)],
        "not a paper table: the spread between trainings that differ only in the seed"),
    "detailflow_seeds": Table("DetailFlow: training seed of the tokenizer and its AR model "
                              "(run-to-run spread)", "detailflow", [
        Row(f"seed {s}", tokenizer=f"seed={s}", generator=f"seed={s}") for s in (0, 1, 2)],
        "not a paper table: the spread between trainings that differ only in the seed"),
}

_DEMO = dict(tokenizer="size=demo", ar="size=demo", transdiff="size=demo", num=100, ar_override="")
# per scale: base config args of each stage
SCALES = {
    "tiny": dict(tokenizer="size=tiny,steps=30,batch=16", ar="size=demo,steps=30,batch=16",
                 transdiff="size=demo,steps=20,batch=8", num=2,
                 ar_override="--config.model.depth=1"),
    "demo": _DEMO,
    # the demo models on shorter schedules (tokenizer and AR half, TransDiff a quarter), 50 samples
    # per class: a table in about an hour on 2 CPU cores
    "quick": dict(tokenizer="size=demo,steps=500", ar="size=demo,steps=750",
                  transdiff="size=demo,steps=500", num=50, ar_override=""),
    # the demo scale with the DetailFlow tokenizer trained 3x as long: the demo tokenizers stop while
    # still improving (+0.4 dB held-out PSNR per 250 steps at the end), which hides their
    # differences (token count, alpha, degradation); AR and TransDiff as at the demo scale
    "long": {**_DEMO, "tokenizer": "size=demo,steps=3000"},
    "full": dict(tokenizer="size=full,tokens=128", ar="size=L", transdiff="size=L", num=50,
                 ar_override=""),
}


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "base"


def _join(*args) -> str:
  return ",".join(a for a in args if a)


def _config(name: str, arg: str) -> dict:
  return configlib.load_config(name, arg).to_dict()


@functools.lru_cache(maxsize=None)   # row_stages and _result ask again for the same row
def canonical_args(config: str, base: str, args: str) -> str:
  """`args` less the items that leave configs/CONFIG.py:BASE,ARGS as it is (a row restating a
  default), so rows of one configuration share one run, across tables too: at the demo scale
  Table 3's 20 %, Table 4's g = 4, alpha 1.5 and N = 32 are all the default tokenizer."""
  items = [i for i in args.split(",") if i]
  full = _config(config, _join(base, *items))
  kept = [i for i in items
          if _config(config, _join(base, *(j for j in items if j != i))) != full]
  return ",".join(kept) if _config(config, _join(base, *kept)) == full else args


def _detailflow_args(row: Row, scale: str) -> tuple[str, str]:
  """(tokenizer, AR) row args in canonical form; the AR's are judged with the N, g and vocabulary
  its codes file will give it (those of the row's tokenizer)."""
  s = SCALES[scale]
  tok = canonical_args("detailflow_tokenizer", s["tokenizer"], row.tokenizer)
  m = _config("detailflow_tokenizer", _join(s["tokenizer"], tok))["model"]
  codes = f"tokens={m['num_tokens']},group={m['group']},vocab={m['codebook_size']}"
  return tok, canonical_args("next_detail", _join(s["ar"], codes), row.generator)


def _tokenizer_dir(workdir: str, row: Row, scale: str) -> str:
  return os.path.join(workdir, "tokenizer_" + _slug(_detailflow_args(row, scale)[0]))


def _generator_dir(workdir: str, row: Row, scale: str, family: str) -> str:
  """The run folder of the row's generator (AR model or TransDiff), named by its canonical args."""
  if family == "detailflow":
    return os.path.join(workdir, "ar_" + _slug("_".join(_detailflow_args(row, scale))))
  return os.path.join(workdir, "transdiff_" + _slug(
      canonical_args("transdiff", SCALES[scale]["transdiff"], row.generator)))


def row_stages(table: Table, row: Row, scale: str, workdir: str, judge: str | None,
               multihost: bool = False):
  """[(done_marker, argv)] for one row; shared stages have the same workdir (and marker).
  `multihost`: each stage joins the multi-process job this ablation runs in (every host runs
  `tdjax.ablate --multihost` under a launcher, and each host's stages together form one job)."""
  s = SCALES[scale]
  py = [sys.executable, "-m"]
  stages = []
  if table.family == "detailflow":
    # commands keep the row's own arguments; run folders are named by their canonical form
    tok_args = _join(s["tokenizer"], row.tokenizer)
    tok = _tokenizer_dir(workdir, row, scale)
    codes = os.path.join(tok, "codes.npz")
    ar_args = _join(s["ar"], row.generator, f"codes={codes}", f"tokenizer={tok}")
    gen = _generator_dir(workdir, row, scale, table.family)
    stages += [(os.path.join(tok, "config.json"),
                py + ["tdjax.train", f"--config=configs/detailflow_tokenizer.py:{tok_args}",
                      f"--workdir={tok}"]),
               (codes, py + ["tdjax.data.codes", f"--tokenizer_workdir={tok}", f"--out={codes}",
                             "--views=flip"]),
               (os.path.join(gen, "config.json"),
                py + ["tdjax.train", f"--config=configs/next_detail.py:{ar_args}",
                      f"--workdir={gen}"] + ([s["ar_override"]] if s["ar_override"] else []))]
  else:
    if "mrar=True" in row.generator:
      # MRAR fine-tunes from the 1-step run trained with the row's seed (`--seed`)
      seed = ",".join(i for i in row.generator.split(",") if i.startswith("seed="))
      base = os.path.join(workdir, "transdiff_" + _slug(canonical_args("transdiff", s["transdiff"],
                                                                         seed)))
      stages += [(os.path.join(base, "config.json"),
                  py + ["tdjax.train", f"--config=configs/transdiff.py:"
                        f"{_join(s['transdiff'], seed)}", f"--workdir={base}"])]
      args = _join(s["transdiff"], row.generator, f"init_from={base}")
    else:
      args = _join(s["transdiff"], row.generator)
    gen = _generator_dir(workdir, row, scale, table.family)
    stages += [(os.path.join(gen, "config.json"),
                py + ["tdjax.train", f"--config=configs/transdiff.py:{args}", f"--workdir={gen}"])]
  # named by the model and the sampling flags, so rows that sample one model alike share samples
  sampling = "_".join(f"{k}_{v}" for k, v in sorted(row.sample.items()))
  # tdjax.sample writes to a path every host mounts, not a URL: for a gs:// workdir, ./samples/
  samples = os.path.join("samples", _slug(workdir)) if "://" in workdir else os.path.join(workdir,
                                                                                          "samples")
  out = os.path.join(samples, _slug(os.path.basename(gen) + "_" + sampling) + ".png")
  # the runner decides what is finished (the judge file): a picture without one is redone
  sample = py + ["tdjax.sample", f"--workdir={gen}", f"--out={out}", "--overwrite", "--classes=all",
                 f"--num={s['num']}"] + [f"--{k}={v}" for k, v in row.sample.items()]
  if judge:
    sample.append(f"--judge={judge}")
  stages.append((out[:-4] + ("_judge.json" if judge else ".png"), sample))
  if multihost:
    stages = [(marker, argv + (["--config.distributed=True"] if "tdjax.train" in argv
                               else ["--multihost"])) for marker, argv in stages]
  return stages


def _finished(marker: str) -> bool:
  if marker.endswith("config.json"):   # a training stage: its last checkpoint is the final step
    d = os.path.dirname(marker)
    return os.path.exists(os.path.join(d, "metrics.jsonl")) and _trained(d)
  return os.path.exists(marker)


def _trained(workdir: str) -> bool:
  with open(os.path.join(workdir, "config.json")) as f:
    total = int(json.load(f)["total_steps"])
  steps = [r.get("step", 0) for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  return max(steps, default=0) >= total


def with_seed(table: Table, seed: int) -> Table:
  """The table with every training of every row seeded `seed` (tokenizer and AR model, or the
  TransDiff run and the 1-step run MRAR starts from): a repeat of the table whose row-to-row gaps
  can be held against the first run's.  Seed 0 is the configs' default, so it is the table itself
  (same runs); another seed names new run folders (`tokenizer_degrade_p_0_1_seed_1`)."""
  if not seed:
    return table
  if any("seed=" in r.tokenizer + r.generator for r in table.rows):
    raise ValueError(f"--seed={seed}: the rows of {table.title!r} set their own seeds")
  arg = f"seed={seed}"
  rows = [dataclasses.replace(r, tokenizer=_join(r.tokenizer, arg) if table.family == "detailflow"
                              else r.tokenizer, generator=_join(r.generator, arg))
          for r in table.rows]
  return dataclasses.replace(table, title=f"{table.title}, training seed {seed}", rows=rows)


def run_table(name: str, scale: str, workdir: str, judge: str | None = None,
              dry_run: bool = False, rows: list[int] | None = None, seed: int = 0,
              teacher: str = "", multihost: bool = False) -> dict:
  """Runs (or prints) each row's stages and writes the table (DIR/NAME.*, DIR/NAME_seedK.* for
  `seed` K > 0: `with_seed`).  `rows` (0-based indices) runs only those rows; the others are
  reported from their judge files if an earlier run wrote them.  `teacher`: `with_teacher`.
  `multihost`: started on every host of a multi-process job (launch/slurm.sh, tpu_pod.sh), each
  stage joins that job (`row_stages`); every host writes the same table, atomically."""
  if name not in TABLES:
    raise ValueError(f"--table={name!r}: expected one of {', '.join(sorted(TABLES))}")
  if scale not in SCALES:
    raise ValueError(f"--scale={scale!r}: expected one of {', '.join(SCALES)}")
  table = with_teacher(with_seed(TABLES[name], seed), teacher)
  bad = [i for i in rows or () if not 0 <= i < len(table.rows)]
  if bad:
    raise ValueError(f"--rows={bad}: table {name} has rows 0..{len(table.rows) - 1}")
  if scale == "full":
    dry_run = True
  elif not dry_run and (not judge or not os.path.isdir(judge)):
    raise ValueError(f"--judge={judge!r}: scale {scale} scores samples with a classifier workdir "
                     f"(python -m tdjax.train --config configs/classifier.py --workdir DIR)")
  if not dry_run:                       # printing the commands writes nothing (gs:// workdirs too)
    os.makedirs(workdir, exist_ok=True)
  results, printed, others = [], set(), []
  todo = [i for i, r in enumerate(table.rows)
          if not r.needs and (rows is None or i in rows)]
  bar = tqdm(total=sum(len(row_stages(table, table.rows[i], scale, workdir, judge)) for i in todo),
             desc=f"ablate {name}", unit="stage", disable=dry_run)
  for index, row in enumerate(table.rows):
    if row.needs and not dry_run:       # below full scale, whether or not --rows names it
      if rows is None or index in rows:
        logging.warning("skipping row %r: it needs %s", row.label, row.needs)
      results.append(dict(row=row.label, skipped=f"needs {row.needs}", paper=row.paper))
      continue
    if rows is not None and index not in rows:
      if not dry_run:     # read when the table is written: another process may finish it meanwhile
        others.append((len(results), row, row_stages(table, row, scale, workdir, judge)[-1][0]))
        results.append(None)
      continue
    for marker, argv in row_stages(table, row, scale, workdir, None if dry_run else judge,
                                   multihost):
      cmd = " ".join(argv[1:]) if dry_run else " ".join(argv)
      if dry_run:
        if cmd not in printed:
          print("python " + cmd)
          printed.add(cmd)
        continue
      bar.update()
      if _finished(marker):
        logging.info("done already: %s", cmd)
        continue
      bar.set_postfix_str(row.label)
      logging.info("running: %s", cmd)
      os.makedirs(os.path.dirname(marker), exist_ok=True)
      subprocess.run(argv, check=True, cwd=configlib.ROOT)
    if not dry_run:
      results.append(_result(row, marker, table.family, workdir, scale))
  bar.close()
  if dry_run:
    return {}
  for i, row, marker in others:
    results[i] = (_result(row, marker, table.family, workdir, scale) if os.path.exists(marker) else
                  dict(row=row.label, skipped="no result yet (--rows)", paper=row.paper))
  report = dict(table=name, title=table.title, scale=scale, seed=seed,
                paper_source=table.paper_source, rows=results)
  spread = seed_spread(workdir, table.family)
  if spread and name != f"{table.family}_seeds":
    report["seed_spread"] = spread
  write_report(report, os.path.join(workdir, table_stem(name, seed)))
  return report


def with_teacher(table: Table, teacher: str) -> Table:
  """The table with its alignment rows (tokenizer `align=...`) aligned to the teacher .npz
  `teacher` (layout of tdjax.losses.alignment; e.g. `python -m tdjax.convert --kind teacher`'s
  small ViT, a stand-in where no SigLIP2 file exists): they run below full scale, labelled with the
  file's name in place of SigLIP2, in run folders named by its path."""
  if not teacher:
    return table
  if not os.path.isfile(teacher):
    raise FileNotFoundError(f"--teacher: alignment teacher weights file not found: {teacher!r}")
  teacher = os.path.abspath(teacher)
  if "," in teacher or "=" in teacher:
    raise ValueError(f"--teacher={teacher!r}: the path may not hold ',' or '=' (config args)")
  rows = [dataclasses.replace(r, label=r.label.replace(_SIGLIP2, os.path.basename(teacher)),
                              tokenizer=_join(r.tokenizer, f"teacher={teacher}"), needs="")
          if "align=" in r.tokenizer else r for r in table.rows]
  return dataclasses.replace(table, rows=rows)


def table_stem(name: str, seed: int = 0) -> str:
  return f"{name}_seed{seed}" if seed else name


def _last_eval(workdir: str) -> dict:
  """The last `eval/*` record of a training run's metrics.jsonl ({} when there is none)."""
  last = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for record in metrics_lib.read_jsonl(path):
      if any(k.startswith("eval/") for k in record):
        last = record
  return last


def _train_step_seconds(run_dir: str) -> float | None:
  """Median wall seconds per training step of a run (its logged `step_sec` windows after the
  first, which may hold the compilation), or None without a log."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  secs = [r["step_sec"] for r in metrics_lib.read_jsonl(path) if "step_sec" in r]
  return statistics.median(secs[1:] or secs) if secs else None


def _result(row: Row, judge_file: str, family: str, workdir: str, scale: str) -> dict:
  """The row's judged samples and costs: the generator's training step time, the sampling
  latency per image and (TransDiff) the analytic FLOPs per image of one sampling step, when the
  run's log and judge file hold them; DetailFlow rows add their tokenizer's test PSNR and
  codebook usage (the reconstruction side of the paper's rFID column)."""
  with open(judge_file) as f:
    r = json.load(f)
  out = dict(row=row.label, class_accuracy=r["class_accuracy"],
             frechet_distance=r["frechet_distance"], paper=row.paper)
  costs = dict(train_step_seconds=_train_step_seconds(_generator_dir(workdir, row, scale, family)),
               sampling_seconds_per_image=r.get("sampling_seconds_per_image"),
               sampling_step_flops=r.get("sampling_step_flops"))
  out.update({k: v for k, v in costs.items() if v is not None})
  png = judge_file[:-len("_judge.json")] + ".png"
  if os.path.exists(png):         # the sample grid (rows = classes), relative: the table moves
    out["samples"] = os.path.relpath(png, workdir)
  if family == "detailflow":
    ev = _last_eval(_tokenizer_dir(workdir, row, scale))
    if "eval/psnr" in ev:
      out.update(tokenizer_psnr=ev["eval/psnr"], codebook_usage=ev.get("eval/codebook_usage"))
  return out


def seed_spread(workdir: str, family: str) -> dict | None:
  """The run-to-run spread beside a table: min / max of each figure over the rows of the
  family's seed table (`transdiff_seeds` / `detailflow_seeds`) if it ran in `workdir` (there its
  seed-0 row is the other tables' default row: the same run)."""
  path = os.path.join(workdir, f"{family}_seeds.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [r for r in json.load(f)["rows"] if "class_accuracy" in r]
  keys = ("class_accuracy", "frechet_distance", "tokenizer_psnr")
  out = {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in keys
         if rows and all(k in r for r in rows)}
  return dict(out, seeds=len(rows)) if out else None


def _replace_atomically(path: str, write) -> None:
  """`write(tmp_path)`, then rename: readers (and other hosts writing the same file) never see a
  half-written one."""
  tmp = f"{path}.{os.getpid()}.tmp"
  write(tmp)
  os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  _replace_atomically(path, write)


# (result key, column title, cell format) of the cost columns, shown when a row has the figure
_COST_COLUMNS = (
    ("train_step_seconds", "training step", lambda v: f"{v:.3f} s"),
    ("sampling_seconds_per_image", "sampling per image", lambda v: f"{1e3 * v:.1f} ms"),
    ("sampling_step_flops", "GFLOP per sampling step", lambda v: f"{v / 1e9:.2f}"))


def write_report(report: dict, stem: str) -> None:
  """STEM.json, STEM.md (ours beside the paper's figures; the cost columns the rows have; the
  seed spread), STEM.png (bars per row) and STEM_samples.png (`write_samples_picture`)."""
  _write_text(stem + ".json", json.dumps(report, indent=2))
  recon = any("tokenizer_psnr" in r for r in report["rows"])
  costs = [c for c in _COST_COLUMNS if any(c[0] in r for r in report["rows"])]
  head = "| row | class accuracy | Fréchet distance (judge) |" + (
      " tokenizer PSNR (test) | codebook usage |" if recon else "") + "".join(
      f" {title} |" for _, title, _ in costs)
  lines = [f"**{report['title']}** (scale {report['scale']}; paper figures: "
           f"{report['paper_source']})", "", head + " paper figures |",
           "|---" * (head.count("|")) + "|"]
  for r in report["rows"]:
    if "skipped" in r:
      lines.append(f"| {r['row']} | not run: {r['skipped']} | |" + " | |" * recon +
                   " |" * len(costs) + f" {r['paper'] or '-'} |")
      continue
    cells = f"| {r['row']} | {100 * r['class_accuracy']:.1f} % | {r['frechet_distance']:.2f} |"
    if recon:
      cells += (f" {r['tokenizer_psnr']:.2f} dB | {100 * r['codebook_usage']:.1f} % |"
                if "tokenizer_psnr" in r else " - | - |")
    cells += "".join(f" {fmt(r[key])} |" if key in r else " - |" for key, _, fmt in costs)
    lines.append(cells + f" {r['paper'] or '-'} |")
  spread = report.get("seed_spread")
  if spread:
    acc, fd = spread["class_accuracy"], spread["frechet_distance"]
    lines += ["", f"Run-to-run spread of the default row over {spread['seeds']} training seeds "
              f"(the seed table in this folder): class accuracy {100 * acc[0]:.1f}-"
              f"{100 * acc[1]:.1f} %, Fréchet distance {fd[0]:.2f}-{fd[1]:.2f}" + (
                  f", tokenizer PSNR {spread['tokenizer_psnr'][0]:.2f}-"
                  f"{spread['tokenizer_psnr'][1]:.2f} dB" if "tokenizer_psnr" in spread else "")
              + "; a gap inside it is not a difference."]
  _write_text(stem + ".md", "\n".join(lines) + "\n")
  write_samples_picture(report, stem)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in report["rows"] if "skipped" not in r]
  panels = [("class_accuracy", "class accuracy"),
            ("frechet_distance", "Fréchet distance (lower is better)")]
  if recon:
    panels.append(("tokenizer_psnr", "tokenizer PSNR, dB (test)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(rows) + 1.5))
  for ax, (key, title) in zip(axes, panels):
    ax.barh([r["row"] for r in rows], [r.get(key, 0.0) for r in rows])
    ax.set_title(title)
    ax.invert_yaxis()
  for ax in axes[1:]:
    ax.set_yticklabels([])
  fig.suptitle(report["title"])
  fig.tight_layout()
  _replace_atomically(stem + ".png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
  plt.close(fig)


def sample_strip(png: str, columns: int, per_class: int) -> np.ndarray:
  """The first `per_class` samples of every class of a `tdjax.sample` grid (rows = classes,
  `columns` samples each, square images, 1 px gaps: `metrics.image_grid`), in one row:
  [h, classes * per_class * (h + 1) - 1] uint8, 1 px gaps kept."""
  grid = np.asarray(Image.open(png))
  size = (grid.shape[1] - 1) // columns - 1
  classes = (grid.shape[0] - 1) // (size + 1)
  if columns * (size + 1) + 1 != grid.shape[1] or classes * (size + 1) + 1 != grid.shape[0]:
    raise ValueError(f"{png}: a {grid.shape[1]} x {grid.shape[0]} picture is not a grid of "
                     f"{columns} square samples per row")
  width = per_class * (size + 1)
  rows = [grid[1 + c * (size + 1):(c + 1) * (size + 1), 1:1 + width] for c in range(classes)]
  return np.concatenate(rows, axis=1)[:, :-1]


def write_samples_picture(report: dict, stem: str, per_class: int = 2) -> str | None:
  """STEM_samples.png: one labelled row per table row with samples (its first `per_class`
  samples of every class, as `tdjax.sample` drew them); None when no row has samples."""
  where = lambda r: os.path.join(os.path.dirname(stem), r["samples"])
  rows = [r for r in report["rows"] if "samples" in r and os.path.exists(where(r))]
  if not rows:
    return None
  columns = min(SCALES[report["scale"]]["num"], 16)      # tdjax.sample's grid: <= 16 per class
  strips = [sample_strip(where(r), columns, per_class) for r in rows]
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  label_w, gap = int(max(measure.textlength(r["row"]) for r in rows)) + 8, 4
  h = max(s.shape[0] for s in strips)
  mode = "RGB" if strips[0].ndim == 3 else "L"
  canvas = Image.new(mode, (label_w + max(s.shape[1] for s in strips), len(rows) * (h + gap)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for i, (r, strip) in enumerate(zip(rows, strips)):
    draw.text((2, i * (h + gap) + h // 2 - 5), r["row"], fill="black")
    canvas.paste(Image.fromarray(strip).convert(mode), (label_w, i * (h + gap)))
  path = stem + "_samples.png"
  _replace_atomically(path, lambda tmp: canvas.save(tmp, format="png"))
  return path


def main(argv):
  del argv
  rows = [int(i) for i in FLAGS.rows] if FLAGS.rows else None
  report = run_table(FLAGS.table, FLAGS.scale, FLAGS.workdir, FLAGS.judge, FLAGS.dry_run, rows,
                     FLAGS.seed, FLAGS.teacher, FLAGS.multihost)
  if report:
    print(open(os.path.join(FLAGS.workdir, table_stem(FLAGS.table, FLAGS.seed) + ".md")).read())


if __name__ == "__main__":
  flags.DEFINE_string("table", None, f"One of: {', '.join(sorted(TABLES))}.")
  flags.DEFINE_enum("scale", "demo", list(SCALES), "tiny (smoke), quick / demo / long (here), full "
                    "(commands).")
  flags.DEFINE_string("workdir", None, "Folder for every row's runs and the table.")
  flags.DEFINE_string("judge", None, "Classifier workdir scoring the samples (tiny/demo).")
  flags.DEFINE_bool("dry_run", False, "Print the commands only.")
  flags.DEFINE_integer("seed", 0, "Train every row with this seed (0: the configs' default), "
                       "writing DIR/NAME_seedK.*: a repeat of the table for its run-to-run spread.")
  flags.DEFINE_list("rows", None, "Run only these rows (0-based indices); the others are "
                    "reported from earlier runs' results where they exist.")
  flags.DEFINE_string("teacher", "", "Alignment teacher .npz for the alignment rows (default: "
                      "those rows need SigLIP2's and are skipped below full scale).")
  cli.define_multihost_flag("run on every host, each stage joins the job (this process "
                            "itself starts no JAX)")
  flags.mark_flags_as_required(["table", "workdir"])
  cli.run(main)
