"""tdjax.ablate: rows as config arguments, full-scale commands, a tiny table end to end."""

import json
import os

import numpy as np
import pytest

from tdjax import ablate, configlib



def test_full_scale_prints_every_rows_commands(tmp_path, capsys, monkeypatch):
  for name in ablate.TABLES:
    ablate.run_table(name, "full", str(tmp_path / name))
  out = capsys.readouterr().out
  assert "configs/detailflow_tokenizer.py:size=full,tokens=128,degrade_p=0.1" in out
  assert "configs/next_detail.py:size=L,group=16" in out
  assert "--cfg=1.7" in out and "--steps=10" in out
  assert "conditioning=incontext" in out and "head=mlp,diffusion=ddpm" in out
  assert "causal_encoder=False,degrade_p=0.0,correction=False,group=1" in out    # Table 2 baseline
  assert "configs/next_detail.py:size=L,group=1,correction=0.0" in out
  # MRAR fine-tunes from the 1-step run of the same table
  assert f"mrar=True,init_from={tmp_path / 'transdiff_mrar' / 'transdiff_base'}" in out
  # a shared stage is printed once: the CFG table trains one tokenizer for its four rows
  cfg_tok = [l for l in out.splitlines() if "detailflow_tokenizer.py" in l
             and "detailflow_cfg" in l]
  assert len(cfg_tok) == 1
  with pytest.raises(ValueError, match="--table='nope'"):
    ablate.run_table("nope", "full", str(tmp_path))
  # a gs:// workdir: the runs go there, the samples to a local folder; printing writes nothing
  monkeypatch.chdir(tmp_path)
  ablate.run_table("detailflow_group", "full", "gs://b/abl")
  out = capsys.readouterr().out
  assert "--workdir=gs://b/abl/ar_base" in out and "--out=samples/gs_b_abl/ar_base" in out
  assert not os.path.exists(tmp_path / "gs:")
  with pytest.raises(ValueError, match=r"--rows=\[6\]: table transdiff_heads has rows 0..5"):
    ablate.run_table("transdiff_heads", "full", str(tmp_path), rows=[0, 6])
  with pytest.raises(ValueError, match="--judge=None"):
    ablate.run_table("transdiff_steps", "demo", str(tmp_path))


@pytest.mark.slow
def test_tiny_table_trains_once_scores_each_row_and_resumes(tmp_path, monkeypatch):
  from tdjax import trainer
  full = ablate.TABLES["transdiff_steps"]       # two of its rows keep the test short
  outside = ablate.Row("needs weights", needs="teacher weights W")   # never runs below full
  monkeypatch.setitem(ablate.TABLES, "transdiff_steps",
                      ablate.Table(full.title, full.family, full.rows[:2] + [outside],
                                   full.paper_source))
  judge = str(tmp_path / "clf")
  trainer.train_and_evaluate(configlib.load_config("classifier", "size=tiny,steps=10,batch=32"), judge)
  wd = str(tmp_path / "abl")
  report = ablate.run_table("transdiff_steps", "tiny", wd, judge)
  assert [r["row"] for r in report["rows"]] == ["10 steps", "25 steps", "needs weights"]
  assert report["rows"][2]["skipped"] == "needs teacher weights W"
  fds = [r["frechet_distance"] for r in report["rows"][:2]]
  assert len(set(fds)) == 2                       # the rows really sampled differently
  for ext in ("md", "json", "png"):
    assert os.path.getsize(os.path.join(wd, f"transdiff_steps.{ext}")) > 0
  assert "paper figures" in open(os.path.join(wd, "transdiff_steps.md")).read()
  ckpts = os.path.join(wd, "transdiff_base", "checkpoints")
  before = sorted(os.listdir(ckpts))
  os.remove(os.path.join(wd, "samples", "transdiff_base_steps_25_judge.json"))
  # the cost columns come from the runs themselves: the training log, the sampler's judge file
  assert 0 < report["rows"][0]["train_step_seconds"] < 60
  flops = [r["sampling_step_flops"] for r in report["rows"][:2]]
  assert flops[0] == flops[1] > 0               # one model, one head call per guidance branch
  assert "GFLOP per sampling step" in open(os.path.join(wd, "transdiff_steps.md")).read()
  only = ablate.run_table("transdiff_steps", "tiny", wd, judge, rows=[0])  # row 1 left alone
  assert only["rows"][0] == report["rows"][0] and "--rows" in only["rows"][1]["skipped"]
  assert only["rows"][2] == report["rows"][2]     # the reason stays, not "no result yet"
  assert not os.path.exists(os.path.join(wd, "samples", "transdiff_base_steps_25_judge.json"))
  again = ablate.run_table("transdiff_steps", "tiny", wd, judge)   # resumes: re-samples one row
  assert sorted(os.listdir(ckpts)) == before
  assert json.load(open(os.path.join(wd, "transdiff_steps.json")))["rows"] == again["rows"]
  assert again["rows"][1]["frechet_distance"] == pytest.approx(fds[1], rel=1e-4)
  # rows left out by --rows are read when the table is written: a row that another process
  # finishes while this one runs is in the table
  names = [f"transdiff_base_steps_{s}_judge.json" for s in (10, 25)]
  saved = {n: open(os.path.join(wd, "samples", n)).read() for n in names}
  for n in names:
    os.remove(os.path.join(wd, "samples", n))

  def sample_row_1_while_another_process_finishes_row_0(argv, **kwargs):
    for n, text in saved.items():
      with open(os.path.join(wd, "samples", n), "w") as f:
        f.write(text)

  monkeypatch.setattr(ablate.subprocess, "run", sample_row_1_while_another_process_finishes_row_0)
  late = ablate.run_table("transdiff_steps", "tiny", wd, judge, rows=[1])
  assert late["rows"][:2] == again["rows"][:2]


def test_detailflow_rows_report_their_tokenizers_reconstruction(tmp_path):
  """The paper's Table 3 pairs gFID with rFID: DetailFlow rows carry their own tokenizer's last
  test PSNR and codebook usage (not an earlier eval, not another row's tokenizer)."""
  table = ablate.TABLES["detailflow_degrade"]
  wd = str(tmp_path)
  for i, row in enumerate(table.rows[:2]):
    tok = ablate._tokenizer_dir(wd, row, "demo")
    os.makedirs(tok)
    with open(os.path.join(tok, "metrics.jsonl"), "w") as f:
      for step, psnr in ((500, 10.0), (1000, 15.0 + i)):
        f.write(json.dumps({"step": step, "eval/psnr": psnr, "eval/codebook_usage": 0.25}) + "\n")
        f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
  judge = str(tmp_path / "judge.json")
  with open(judge, "w") as f:
    json.dump({"class_accuracy": 0.5, "frechet_distance": 3.0}, f)
  rows = [ablate._result(r, judge, "detailflow", wd, "demo") for r in table.rows[:2]]
  assert [r["tokenizer_psnr"] for r in rows] == [15.0, 16.0]
  assert "tokenizer_psnr" not in ablate._result(table.rows[2], judge, "detailflow", wd, "demo")
  assert "tokenizer_psnr" not in ablate._result(table.rows[0], judge, "transdiff", wd, "demo")
  report = dict(title="t", scale="demo", paper_source="p", rows=rows + [
      ablate._result(table.rows[2], judge, "detailflow", wd, "demo"),
      dict(row="skipped row", skipped="needs W", paper="")])
  ablate.write_report(report, str(tmp_path / "t"))
  lines = open(str(tmp_path / "t.md")).read().splitlines()
  assert "tokenizer PSNR (test) | codebook usage | paper figures |" in lines[2]
  assert all(l.count("|") == 7 for l in lines[2:])        # every row has all six columns
  assert "| 10% | 50.0 % | 3.00 | 15.00 dB | 25.0 % |" in lines[4]
  assert "| 30% | 50.0 % | 3.00 | - | - |" in lines[6]


def test_rows_report_their_training_and_sampling_costs(tmp_path):
  """The survey table's cost columns: the median logged step time of the row's own generator run
  (not the first, compiling window's; not another row's run), and the sampler's latency and
  FLOPs per step from its judge file; a row without them shows '-'."""
  table = ablate.TABLES["survey_heads"]
  wd = str(tmp_path)
  for row, secs in ((table.rows[0], (9.0, 0.30, 0.31, 0.29)), (table.rows[4], (9.0, 0.5, 0.5))):
    run = ablate._generator_dir(wd, row, "demo", "transdiff")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
      for step, sec in enumerate(secs):
        f.write(json.dumps({"step": 50 * (step + 1), "step_sec": sec}) + "\n")
        f.write(json.dumps({"step": 50 * (step + 1), "eval/flow_loss": 0.2}) + "\n")
  judge = str(tmp_path / "judge.json")
  with open(judge, "w") as f:
    json.dump({"class_accuracy": 0.5, "frechet_distance": 3.0,
               "sampling_seconds_per_image": 0.0125, "sampling_step_flops": 2.5e9}, f)
  old = str(tmp_path / "old_judge.json")       # written before the sampler timed itself
  with open(old, "w") as f:
    json.dump({"class_accuracy": 0.5, "frechet_distance": 3.0}, f)
  rows = [ablate._result(table.rows[0], judge, "transdiff", wd, "demo"),
          ablate._result(table.rows[4], judge, "transdiff", wd, "demo"),
          ablate._result(table.rows[5], old, "transdiff", wd, "demo")]
  assert [r.get("train_step_seconds") for r in rows] == [0.30, 0.5, None]
  assert rows[0]["sampling_seconds_per_image"] == 0.0125 and rows[0]["sampling_step_flops"] == 2.5e9
  assert "sampling_step_flops" not in rows[2]
  ablate.write_report(dict(title="t", scale="demo", paper_source="p", rows=rows + [
      dict(row="skipped row", skipped="needs W", paper="")]), str(tmp_path / "t"))
  lines = open(str(tmp_path / "t.md")).read().splitlines()
  assert lines[2].endswith(
      "| training step | sampling per image | GFLOP per sampling step | paper figures |")
  assert all(l.count("|") == 8 for l in lines[2:])
  assert "| 50.0 % | 3.00 | 0.300 s | 12.5 ms | 2.50 | - |" in lines[4]
  assert lines[6].endswith("| 50.0 % | 3.00 | - | - | - | - |")


def test_samples_picture_has_one_row_of_each_rows_first_samples_per_class(tmp_path):
  """STEM_samples.png (the README's picture row per variant): for each table row with samples,
  its first 2 samples of every class cut from tdjax.sample's grid, in class order; rows without
  samples (skipped, not run) have none."""
  from PIL import Image
  from tdjax import metrics
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "samples")
  grids = []
  for name in ("a", "b"):
    images = rng.uniform(-1, 1, (3, 16, 8, 8, 1)).astype(np.float32)   # 3 classes x 16
    metrics.save_png(metrics.image_grid(images), str(tmp_path / "samples" / f"{name}.png"))
    grids.append(metrics.to_uint8(images)[..., 0])
  rows = [dict(row="first", samples="samples/a.png"), dict(row="skipped", skipped="x"),
          dict(row="second", samples="samples/b.png")]
  path = ablate.write_samples_picture(dict(scale="demo", rows=rows), str(tmp_path / "t"))
  assert path == str(tmp_path / "t_samples.png")
  picture = np.asarray(Image.open(path))
  assert picture.shape[0] == 2 * (8 + 4)                 # two rows of 8 px samples (+ 4 px gap)
  for r, grid in enumerate(grids):
    strip = picture[r * 12:r * 12 + 8, -(3 * 2 * 9 - 1):]    # 3 classes x 2 samples, 1 px gaps
    for c in range(3):
      for j in range(2):
        x = (2 * c + j) * 9
        np.testing.assert_array_equal(strip[:, x:x + 8], grid[c, j])
  assert ablate.write_samples_picture(dict(scale="demo", rows=rows[1:2]), str(tmp_path / "u")) \
      is None
  with pytest.raises(ValueError, match="not a grid of 16"):
    ablate.sample_strip(str(tmp_path / "t_samples.png"), 16, 2)


def test_tables_report_the_seed_spread_of_their_folder(tmp_path):
  """A table run in the folder where its family's seed table ran carries that table's min-max
  of each figure beside its own rows (the seed table itself does not)."""
  wd = str(tmp_path)
  seeds = [dict(row=f"seed {i}", class_accuracy=a, frechet_distance=f, paper="")
           for i, (a, f) in enumerate(((0.86, 2.4), (0.839, 2.99), (0.864, 2.45)))]
  with open(os.path.join(wd, "transdiff_seeds.json"), "w") as f:
    json.dump(dict(rows=seeds + [dict(row="later", skipped="no result yet (--rows)")]), f)
  assert ablate.seed_spread(wd, "transdiff") == dict(class_accuracy=[0.839, 0.864],
                                                      frechet_distance=[2.4, 2.99], seeds=3)
  assert ablate.seed_spread(wd, "detailflow") is None
  report = ablate.run_table("transdiff_steps", "demo", wd, judge=wd, rows=[])   # nothing to run
  assert report["seed_spread"]["class_accuracy"] == [0.839, 0.864]
  md = open(os.path.join(wd, "transdiff_steps.md")).read()
  assert "over 3 training seeds" in md and "83.9-86.4 %, Fréchet distance 2.40-2.99" in md
  assert "seed_spread" not in ablate.run_table("transdiff_seeds", "demo", wd, judge=wd, rows=[])


def test_rows_of_one_configuration_share_their_runs_and_samples():
  """A row that restates a default is the default run (the paper's default row appears in several
  tables); a row that changes anything, the AR's group against its tokenizer's included, is not."""
  def stages(name, label, scale="demo"):
    table = ablate.TABLES[name]
    row = next(r for r in table.rows if r.label == label)
    return [m for m, _ in ablate.row_stages(table, row, scale, "W", None)]

  default = stages("detailflow_table2", "+ first group causal")
  assert default[0] == "W/tokenizer_base/config.json" and default[2] == "W/ar_base/config.json"
  # Table 2's parallel rows: a tokenizer with causal_num = 0, whose codes file gives the AR its c
  parallel = stages("detailflow_table2", "+ self-correction")
  assert not set(parallel) & set(default)
  table = ablate.TABLES["detailflow_table2"]
  row = next(r for r in table.rows if r.label == "+ self-correction")
  tok_arg = next(a for a in ablate.row_stages(table, row, "demo", "W", None)[0][1]
                 if a.startswith("--config="))
  cfg = configlib.load_config("detailflow_tokenizer", tok_arg.split(":", 1)[1])
  from tdjax.tokenizers import detailflow
  assert detailflow.build_tokenizer(cfg.model, 32, 1).c == 0
  for name, label in (("detailflow_degrade", "20%"), ("detailflow_group", "g = 4"),
                      ("detailflow_alpha", "alpha 1.5"), ("detailflow_tokens", "N = 32")):
    assert stages(name, label) == default, (name, label)
  assert stages("detailflow_seeds", "seed 0") == default
  seed_1 = stages("detailflow_seeds", "seed 1")
  assert seed_1[0] == "W/tokenizer_seed_1/config.json" and seed_1[2] == "W/ar_seed_1_seed_1/config.json"
  for name, label in (("detailflow_degrade", "10%"), ("detailflow_group", "g = 8"),
                      ("detailflow_alpha", "alpha 2.0"), ("detailflow_tokens", "N = 64")):
    assert not set(stages(name, label)) & set(default), (name, label)
  # the full scale's default group is 8: there g = 8 is the default and g = 4 is not
  assert stages("detailflow_group", "g = 8", "full")[0] == "W/tokenizer_base/config.json"
  assert stages("detailflow_group", "g = 4", "full")[0] == "W/tokenizer_group_4/config.json"
  # the AR's group=1 restates its g = 1 tokenizer's; against a g = 4 tokenizer it would not
  tok, gen = ablate._detailflow_args(ablate.Row("x", tokenizer="group=1", generator="group=1"),
                                     "demo")
  assert (tok, gen) == ("group=1", "")
  assert ablate._detailflow_args(ablate.Row("x", generator="group=1"), "demo") == ("", "group=1")
  # TransDiff: 3 references is MRAR's default; one model sampled alike is sampled once
  assert stages("transdiff_refs", "MRAR, 3 references") == stages(
      "transdiff_mrar", "MRAR (3 references), from the 1-step run")
  refs_2 = stages("transdiff_refs", "MRAR, 2 references")[1]
  assert refs_2 == "W/transdiff_mrar_True_refs_2/config.json"
  one_step = stages("transdiff_mrar", "1-step")
  assert one_step == stages("transdiff_steps", "50 steps")
  for name, label in (("transdiff_depth", "head depth 4"),
                      ("transdiff_refs", "1-step (0 references)"),
                      ("transdiff_heads", "attention head, cross-attention (TransDiff)")):
    assert stages(name, label) == one_step, (name, label)
  assert one_step[-1] == "W/samples/transdiff_base_steps_50.png"
  assert stages("transdiff_steps", "25 steps")[-1] != one_step[-1]
  assert stages("detailflow_cfg", "CFG 1.4")[-1] == "W/samples/ar_base_cfg_1_4.png"


def test_long_scale_trains_only_the_tokenizer_longer():
  """`long` is the demo scale with a 3,000-step tokenizer: the tokenizer command differs, every
  other stage (codes, AR, sampling, the TransDiff rows) is the demo scale's."""
  def argvs(name, index, scale):
    table = ablate.TABLES[name]
    return [argv for _, argv in ablate.row_stages(table, table.rows[index], scale, "W", None)]

  demo, long = argvs("detailflow_tokens", 2, "demo"), argvs("detailflow_tokens", 2, "long")
  assert long[1:] == demo[1:]
  tok = next(a for a in long[0] if a.startswith("--config="))
  cfg = configlib.load_config("detailflow_tokenizer", tok.split(":", 1)[1])
  assert (cfg.total_steps, cfg.model.num_tokens) == (3000, 64)
  assert argvs("transdiff_heads", 1, "long") == argvs("transdiff_heads", 1, "demo")


def test_seed_repeats_a_table_in_new_runs(tmp_path, capsys):
  """`--seed K` seeds every training of every row (the tokenizer and its AR model; the TransDiff run
  and the 1-step run MRAR fine-tunes from) in run folders of its own; seed 0 is the table itself."""
  def runs(name, index, seed):
    table = ablate.with_seed(ablate.TABLES[name], seed)
    return ablate.row_stages(table, table.rows[index], "demo", "W", None)

  def seeds(argvs):    # the seed each training command's config gets
    return [configlib.load_config(*a.split("=", 1)[1][len("configs/"):].split(".py:")).seed
            for argv in argvs for a in argv if a.startswith("--config=")]

  assert runs("detailflow_degrade", 0, 0) == ablate.row_stages(
      ablate.TABLES["detailflow_degrade"], ablate.TABLES["detailflow_degrade"].rows[0], "demo",
      "W", None)
  seeded = runs("detailflow_degrade", 0, 1)
  assert [m for m, _ in seeded][::2] == ["W/tokenizer_degrade_p_0_1_seed_1/config.json",
                                         "W/ar_degrade_p_0_1_seed_1_seed_1/config.json"]
  assert seeds(a for _, a in seeded) == [1, 1]
  mrar = runs("transdiff_mrar", 1, 2)       # the 1-step base run is seeded and is its own folder
  assert [m for m, _ in mrar][:2] == ["W/transdiff_seed_2/config.json",
                                      "W/transdiff_mrar_True_seed_2/config.json"]
  assert seeds(a for _, a in mrar) == [2, 2]
  assert "init_from=W/transdiff_seed_2" in " ".join(mrar[1][1])
  assert runs("transdiff_mrar", 1, 0)[0][0] == "W/transdiff_base/config.json"
  with pytest.raises(ValueError, match="--seed=1: the rows of .* set their own seeds"):
    ablate.with_seed(ablate.TABLES["detailflow_seeds"], 1)
  ablate.run_table("detailflow_degrade", "full", str(tmp_path), seed=3)
  assert "degrade_p=0.1,seed=3" in capsys.readouterr().out


def test_teacher_runs_the_alignment_row_with_that_file(tmp_path, capsys):
  """Table 2's alignment row is skipped below full scale without SigLIP2 weights; `--teacher F`
  aligns it to F instead: its tokenizer gets teacher=F (align_dim = F's width), its label names F,
  its runs are its own, and no other row changes."""
  from tdjax.losses import alignment, weights
  import jax
  import jax.numpy as jnp
  import numpy as np
  tower = alignment.ViTTeacher(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, pos_grid=4)
  shapes = weights.expected_params(tower, jnp.zeros((1, 32, 32, 3)))
  path = str(tmp_path / "stand_in.npz")
  weights.save_npz_params(path, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes))
  table = ablate.TABLES["detailflow_table2"]
  assert table.rows[6].needs and "SigLIP2" in table.rows[6].label
  taught = ablate.with_teacher(table, path)
  assert taught.rows[:6] == table.rows[:6]
  row = taught.rows[6]
  assert not row.needs and row.label == "+ alignment loss (first token vs stand_in.npz)"
  stages = ablate.row_stages(taught, row, "demo", "W", None)
  tok_arg = next(a for a in stages[0][1] if a.startswith("--config="))
  cfg = configlib.load_config("detailflow_tokenizer", tok_arg.split(":", 1)[1])
  assert (cfg.loss.align_weight, cfg.loss.align_teacher_weights, cfg.model.align_dim) == (
      1.0, path, 16)
  default = ablate.row_stages(table, table.rows[5], "demo", "W", None)
  assert not {m for m, _ in stages} & {m for m, _ in default}
  ablate.run_table("detailflow_table2", "full", str(tmp_path / "full"), rows=[6], teacher=path)
  assert f"align=1.0,teacher={path}" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="--teacher: alignment teacher weights file not found"):
    ablate.with_teacher(table, str(tmp_path / "none.npz"))
