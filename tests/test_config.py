import pytest

from shark_torchrec.config import ConfigError, JobConfig, load_config, parse_cli, save_config


def test_toml_defaults_and_flag_overrides(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text(
        "[train]\nlr = 0.05\nepochs = 3\n[model]\nembedding_dim = 32\ndense_arch = [128, 64]\n"
        '[dataset]\ndata = "csv:x"\n'
    )
    cfg = parse_cli(["--config", str(f), "--epochs", "5", "--seed", "7"])
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 5 and cfg.train.seed == 7
    assert cfg.model.embedding_dim == 32 and cfg.model.dense_arch == (128, 64)
    assert cfg.dataset.data == "csv:x"
    # the effective config round-trips through TOML
    save_config(cfg, tmp_path / "saved.toml")
    again = load_config(tmp_path / "saved.toml")
    again.config = cfg.config
    assert again == cfg


def test_unknown_fields_are_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown field train\.learning_rate"):
        load_config(f)
    f.write_text("[trian]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(f)
    with pytest.raises(SystemExit):
        parse_cli(["--no-such-flag", "1"])


def test_validation_names_the_field():
    cfg = JobConfig()
    cfg.model.embedding_dim = 10
    with pytest.raises(ConfigError, match="embedding_dim=10"):
        cfg.validate()


def test_zero_epochs_need_a_trained_model():
    """--epochs 0 trains nothing: a new model would be scored untrained, so it is refused
    unless the run starts from a trained model (to score or convert it) or resumes one."""
    cfg = JobConfig()
    cfg.train.epochs = 0
    with pytest.raises(ConfigError, match=r"train\.epochs=0 \(--epochs\) trains nothing"):
        cfg.validate()
    for name in ("checkpoint", "init_from"):
        given = JobConfig()
        given.train.epochs = 0
        setattr(given.run, name, "runs/x/checkpoints")
        given.validate()
    resumed = JobConfig()
    resumed.train.epochs, resumed.run.resume, resumed.run.out_dir = 0, True, "runs/x"
    resumed.validate()


def test_a_memory_budget_out_of_range_names_its_flag():
    """`--memory-budget 50` (meant as 50%) names the flag, the range and the fraction meant."""
    cfg = JobConfig()
    cfg.quant.precision, cfg.quant.memory_budget = "shark", 50.0
    with pytest.raises(
        ConfigError, match=r"quant\.memory_budget=50 \(--memory-budget\) .* in \(0, 1\.5\]: for 50% give 0\.5"
    ):
        cfg.validate()
    cfg.quant.memory_budget = -0.1
    with pytest.raises(ConfigError, match=r"quant\.memory_budget=-0\.1 \(--memory-budget\) .* in \(0, 1\.5\]$"):
        cfg.validate()


def test_a_toml_files_optimizer_choices_are_named(tmp_path):
    """Values from a TOML file bypass the flags' choices: the field and its flag are named."""
    f = tmp_path / "job.toml"
    for field, value in (("emb_optimizer_state", "fp16"), ("emb_optimizer", "adam")):
        f.write_text(f'[train]\n{field} = "{value}"\n')
        flag = field.replace("_", "-")
        with pytest.raises(ConfigError, match=rf"train\.{field}='{value}' \(--{flag}\) must be one of"):
            load_config(f).validate()


def test_precision_flags_are_validated():
    import pytest

    from shark_torchrec.config import ConfigError, JobConfig, QuantConfig

    def check(**kw):
        return JobConfig(quant=QuantConfig(**kw)).validate()

    check(precision="shark", memory_budget=0.5)
    check(precision="shark", row_fractions=(0.05, 0.3))
    check(precision="shark", t8=1.0, t16=3.0)
    for bad, field in (
        (dict(precision="shark", t8=5.0, t16=1.0), "t8/t16"),
        (dict(precision="shark", t8=1.0), "t8/t16"),
        (dict(precision="shark", memory_budget=0.5, t8=1.0, t16=2.0), "memory_budget"),
        (dict(precision="fp16", memory_budget=0.5), "--memory-budget"),
        (dict(precision="int8", budget_scope="model"), "--budget-scope"),
        (dict(precision="shark", budget_scope="model", row_fractions=(0.1, 0.2)), "budget_scope"),
        (dict(precision="shark", row_fractions=(0.6, 0.6)), "row_fractions"),
        (dict(precision="shark", memory_budget=0.0), "memory_budget"),
        (dict(precision="shark", reassign_every=0), "reassign_every"),
        (dict(precision="int4", tiers=("int4", "int2")), "--tiers int4 int2"),  # else trained all int4, silently
        (dict(precision="fp32", tiers=("int8", "int4")), "stock fp32 tables"),
    ):
        with pytest.raises(ConfigError, match=field):
            check(**bad)
    # `shark compress` trains its quantize stage in our module whatever --precision says: its --tiers count.
    JobConfig(quant=QuantConfig(tiers=("int8", "int4", "int2"))).validate("compress")


def test_pruning_flags_are_validated(tmp_path, capsys):
    cfg = parse_cli(["--method", "permutation", "--rounds", "3", "--target-memory", "0.4", "--out", "x"])
    assert cfg.prune.method == "permutation" and cfg.prune.rounds == 3 and cfg.run.out_dir == "x"
    assert cfg.prune.score_cache_gb == 1.0 and parse_cli(["--score-cache-gb", "0.5"]).prune.score_cache_gb == 0.5
    for bad, field in (
        (["--target-memory", "1.5"], "prune.target_memory"),
        (["--max-auc-drop", "-0.1"], "prune.max_auc_drop"),
        (["--confidence", "1.0"], "prune.confidence"),
        (["--score-cache-gb", "-1"], "prune.score_cache_gb"),
        (["--score-cache-gb", "inf"], "prune.score_cache_gb"),
        (["--kept-fields", "c1", "c2", "--arch", "dlrm_dcn"], "model.field_removal=slice"),
    ):
        with pytest.raises(SystemExit):
            parse_cli(bad, prog="shark prune")
        assert field in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_cli(["--method", "shapley"])
    # a pruned model's config round-trips (kept fields and removal)
    cfg = parse_cli(["--kept-fields", "c1", "c3", "--field-removal", "constant"])
    save_config(cfg, tmp_path / "p.toml")
    again = load_config(tmp_path / "p.toml")
    assert again.model.kept_fields == ("c1", "c3") and again.model.field_removal == "constant"


@pytest.mark.parametrize(
    "flags, named",
    [
        (
            ["--data", "csv:x", "--label", "click", "--categorical", "click,user"],
            "--categorical) names the label column 'click'",
        ),
        (["--data", "csv:x", "--label", "click", "--dense", "click"], "--dense) names the label column 'click'"),
        (["--data", "csv:x", "--categorical", "user,user"], "--categorical) names user more than once"),
        (["--data", "csv:x", "--categorical", "user", "--dense", "user"], "--categorical and --dense"),
        (["--lr", "-0.1"], "--lr) must be > 0"),
        (["--dense-lr", "0"], "--dense-lr) must be > 0"),
        (["--hash-size", "1000"], "--hash-size) only applies with --encoding hash"),
        (["--fold", "2"], "--fold) needs --folds"),
        (["--folds", "5", "--fold", "5"], "--fold) must be in [0, 5)"),
        # a percentage where a fraction is asked: the fraction it means, not tyro's float error
        (
            ["--precision", "shark", "--memory-budget", "10%"],
            "--memory-budget 10%: a fraction, not a percentage: for 10% give 0.1",
        ),
        (["--fp32-fraction=2%"], "--fp32-fraction 2%: a fraction, not a percentage: for 2% give 0.02"),
        # --resume without a run directory started a new run in a new one
        (["--resume"], "run.resume (--resume) continues the run in --out DIR"),
        # a misspelt sharding type reached TorchRec's planner as a traceback
        (["--sharding-types", "table_wise", "tablewise"], "unknown 'tablewise' (did you mean table_wise?)"),
        # infinities and nan passed the "> 0" and "not < 0" checks
        (["--lr", "inf"], "train.lr=inf (--lr) must be finite"),
        (["--dense-lr", "inf"], "(--dense-lr) must be finite"),
        (["--eps", "inf"], "(--eps) must be finite"),
        (["--precision", "shark", "--alpha", "nan"], "alpha must be a finite number >= 0, got nan"),
        (["--precision", "shark", "--alpha", "inf"], "alpha must be a finite number >= 0, got inf"),
        # 1 - beta rounded to 1 in float32: Eq. 7 scores that never decay
        (["--precision", "shark", "--beta", "1e-8"], "beta 1e-08 is too small: 1 - beta rounds to 1 in float32"),
    ],
)
def test_silently_wrong_flags_are_refused_by_name(flags, named, capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(flags, prog="shark train", command="train")
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_resume_keeps_the_model_a_run_started_from_where_the_command_has_one(capsys):
    """`shark train --resume` may keep the --checkpoint / --init-from its run started from (it
    starts from them until the run has a checkpoint of its own), `shark compress` its
    --checkpoint (the base stage); elsewhere --resume and a start point exclude each other."""
    for flag in ("--checkpoint", "--init-from"):
        cfg = parse_cli(["--resume", "--out", "runs/x", flag, "ckpt"], prog="shark train", command="train")
        assert cfg.run.resume
    assert parse_cli(
        ["--resume", "--out", "runs/x", "--checkpoint", "ckpt"], prog="shark compress", command="compress"
    ).run.resume
    for flags, command in (
        (["--resume", "--out", "runs/x", "--init-from", "ckpt"], "compress"),
        (["--resume", "--out", "runs/x", "--checkpoint", "ckpt"], "prune"),
        (["--resume", "--out", "runs/x", "--checkpoint", "ckpt"], "importance"),
    ):
        with pytest.raises(SystemExit):
            parse_cli(flags, prog=f"shark {command}", command=command)
        assert "run.checkpoint / run.init_from start" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, flags, named",
    [
        ("prune", ["--support-rows", "-5"], "prune.support_rows=-5 (--support-rows) must be >= 0"),
        ("prune", ["--fields-per-step", "0"], "prune.fields_per_step=0 (--fields-per-step) must be >= 1"),
        ("importance", ["--rounds", "0"], "prune.rounds=0 (--rounds) must be >= 1"),
        ("importance", ["--method", "taylor", "--rounds", "5"], "--method taylor makes none"),
        ("prune", ["--target-memory", "50"], "prune.target_memory=50.0 (--target-memory)"),
        ("prune", ["--max-auc-drop", "1"], "at 0.5 or more a chance-level model would pass"),
        ("prune", ["--method", "taylor-signed"], "taylor-signed (--method) is a diagnostic"),
        ("compress", ["--method", "taylor-signed"], "taylor-signed (--method) is a diagnostic"),
        ("prune", ["--arch", "dlrm_dcn"], "pruning a dlrm_dcn model needs --field-removal constant"),
        ("prune", ["--checkpoint", "c", "--epochs", "3"], "no epochs apply (its fine-tuning"),
        ("importance", ["--checkpoint", "c", "--epochs=3"], "train.epochs (--epochs): importance takes"),
    ],
)
def test_pruning_flags_that_would_be_ignored_or_fail_late_are_refused_by_name(command, flags, named, capsys):
    with pytest.raises(SystemExit):
        parse_cli(flags, prog=f"shark {command}", command=command)
    assert named in capsys.readouterr().err


def test_the_pruning_flags_refused_above_pass_where_they_apply():
    parse_cli(["--method", "permutation", "--rounds", "5"], prog="shark importance", command="importance")
    parse_cli(["--arch", "dlrm_dcn", "--field-removal", "constant"], prog="shark prune", command="prune")
    parse_cli(["--arch", "dlrm_dcn"], prog="shark train", command="train")
    parse_cli(["--method", "taylor-signed"], prog="shark importance", command="importance")
    parse_cli(["--epochs", "3"], prog="shark prune", command="prune")


def test_a_percentage_in_a_string_flag_is_kept():
    assert parse_cli(["--data", "csv:runs/50%"]).dataset.data == "csv:runs/50%"


def test_flags_that_belong_together_pass():
    cfg = parse_cli(["--encoding", "hash", "--hash-size", "1000", "--folds", "5", "--fold", "4"])
    assert cfg.dataset.hash_rows == 1000 and cfg.dataset.test_fold == 4
    assert parse_cli([]).dataset.hash_rows == 100_000


def test_each_command_takes_only_its_own_flags(tmp_path, capsys):
    """`shark train` offers no pruning or compression flags, `shark importance` only the
    scoring ones; a job file may still set every group, and the saved config holds them all."""
    from shark_torchrec.cli import main

    helps = {}
    for command in ("train", "importance", "prune", "compress"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = capsys.readouterr().out
    for flag in ("--target-memory", "--max-auc-drop", "--method", "--serve-tiers", "--quant-epochs"):
        assert flag not in helps["train"], flag
    assert "--method" in helps["importance"] and "--score-split" in helps["importance"]
    assert "--target-memory" not in helps["importance"] and "--serve-tiers" not in helps["importance"]
    assert "--target-memory" in helps["prune"] and "--serve-tiers" not in helps["prune"]
    assert "--serve-tiers" in helps["compress"] and "--lr" in helps["compress"]
    for command in ("train", "importance", "prune", "compress"):
        assert "--embedding-dim" in helps[command] and "--precision" in helps[command]

    with pytest.raises(SystemExit) as e:
        parse_cli(["--target-memory", "0.3"], prog="shark train", command="train")
    assert e.value.code == 2 and "--target-memory" in capsys.readouterr().err
    job = tmp_path / "job.toml"
    job.write_text(
        "[train]\nlr = 0.05\n[prune]\ntarget_memory = 0.3\nmethod = 'permutation'\n[compress]\nquant_epochs = 3\n"
    )
    cfg = parse_cli(["--config", str(job), "--lr", "0.2"], prog="shark train", command="train")
    assert (cfg.train.lr, cfg.prune.target_memory, cfg.prune.method, cfg.compress.quant_epochs) == (
        0.2,
        0.3,
        "permutation",
        3,
    )
    assert type(cfg.prune).__name__ == "PruneConfig" and type(cfg.prune) is type(JobConfig().prune)
    cfg = parse_cli(["--config", str(job), "--method", "random"], prog="shark importance", command="importance")
    assert (cfg.prune.method, cfg.prune.target_memory) == ("random", 0.3)
    save_config(cfg, tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == cfg.__class__(**{**cfg.__dict__, "config": None})


def test_compress_serve_tiers_take_the_symmetric_tiers_with_int1(capsys):
    """`shark compress --serve-tiers` takes int4s and int2s with int1 below them, and refuses them
    without it, naming the tier, before any work."""
    cfg = parse_cli(["--serve-tiers", "int4s,int2s,int1"], prog="shark compress", command="compress")
    assert cfg.compress.serve_tiers == ("int4s,int2s,int1",)
    with pytest.raises(SystemExit) as e:
        parse_cli(["--serve-tiers", "int4s,int2"], prog="shark compress", command="compress")
    assert e.value.code == 2
    assert "int4s (symmetric rows with a one-byte scale) is planned with int1 below" in capsys.readouterr().err


def test_an_unknown_command_is_named_with_the_nearest(capsys):
    from shark_torchrec.cli import main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "shark: error: unknown command 'trian' (did you mean train?)"
    assert main(["--help"]) == 0 and "usage: shark {train," in capsys.readouterr().out


@pytest.mark.parametrize(
    "toml, named",
    [
        ('[train]\nlr = "abc"\n', "train.lr='abc' (--lr) must be a number, not a string"),
        ("[train]\nlr = true\n", "train.lr=True (--lr) must be a number, not true or false"),
        ("[train]\nepochs = 1.5\n", "train.epochs=1.5 (--epochs) must be an integer, not a number"),
        ("[train]\nbatch_size = true\n", "train.batch_size=True (--batch-size) must be an integer, not true or false"),
        ("[dataset]\nstrict = 1\n", "dataset.strict=1 (--strict) must be true or false, not an integer"),
        ('[dataset]\nlabel = ["click"]\n', "dataset.label=['click'] (--label) must be a string, not a list"),
        (
            '[dataset]\nencoding = "hash"\nhash_size = "big"\n',
            "dataset.hash_size='big' (--hash-size) must be an integer (or left out: unset), not a string",
        ),
        ('[quant]\nmemory_budget = "half"\n', "quant.memory_budget='half' (--memory-budget) must be a number"),
        ("[model]\nover_arch = 64\n", "model.over_arch=64 (--over-arch) must be a list of integers, not an integer"),
        (
            '[model]\ndense_arch = [64, "32"]\n',
            "model.dense_arch=[64, '32'] (--dense-arch) must be a list of integers: '32'",
        ),
        ('[quant]\ntiers = "int8,int4"\n', "quant.tiers='int8,int4' (--tiers) must be a list of strings, not a string"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_named(tmp_path, capsys, toml, named):
    """A TOML value of the wrong type is refused as the file loads, naming the file, the field,
    its flag, the value and the type expected (it was a TypeError traceback, or taken as it was:
    `tiers = "int8,int4"` became a tuple of characters)."""
    f = tmp_path / "job.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: {named}")
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", str(f)], prog="shark train", command="train")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shark train: error: {f}: {named}") and len(err.strip().splitlines()) == 1


def test_toml_values_convert_as_their_flags_do(tmp_path):
    """An integer where a number is asked is that number, a list where a tuple is asked that tuple."""
    f = tmp_path / "job.toml"
    f.write_text(
        "[train]\nlr = 1\n[quant]\nprecision = 'shark'\nrow_fractions = [0, 0.5]\nmemory_budget = 1\n"
        "[model]\ndense_arch = []\nover_arch = [32]\n[dataset]\nencoding = 'hash'\nhash-size = 5\n"
    )
    cfg = load_config(f)
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.quant.row_fractions == (0.0, 0.5) and all(type(x) is float for x in cfg.quant.row_fractions)
    assert cfg.quant.memory_budget == 1.0 and type(cfg.quant.memory_budget) is float
    assert cfg.model.dense_arch == () and cfg.model.over_arch == (32,) and cfg.dataset.hash_size == 5


def test_every_choice_field_of_a_toml_file_is_checked_as_it_loads(tmp_path, capsys):
    """A value outside a choice field's `Literal` is refused by name as the file loads, listing the
    choices: `encoding = "hashh"` was read as vocab, `[prune] score_split = "test"` refused only
    after the base model had trained. A config built in code is checked by `validate`."""
    from typing import Literal, get_args, get_origin, get_type_hints

    from shark_torchrec.config import _group_classes

    f = tmp_path / "job.toml"
    checked = 0
    for section, cls in _group_classes().items():
        for name, hint in get_type_hints(cls).items():
            if get_origin(hint) is not Literal:
                continue
            flag = name.replace("_", "-")
            f.write_text(f'[{section}]\n{name} = "nonesuch"\n')
            with pytest.raises(ConfigError) as e:
                load_config(f)
            assert str(e.value) == f"{f}: {section}.{name}='nonesuch' (--{flag}) must be one of {get_args(hint)}"
            cfg = JobConfig()
            setattr(getattr(cfg, section), name, "nonesuch")
            with pytest.raises(ConfigError, match=rf"^{section}\.{name}='nonesuch' \(--{flag}\) must be one of"):
                cfg.validate()
            checked += 1
    assert checked == 13  # every choice field of every group
    f.write_text('[dataset]\ndata = "csv:x"\nencoding = "hashh"\n')
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", str(f)], prog="shark train", command="train")
    assert e.value.code == 2
    assert f"{f}: dataset.encoding='hashh' (--encoding) must be one of ('vocab', 'hash')" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--over-arch", "-1"], "model.over_arch=-1 (--over-arch): layer sizes must be positive"),
        (["--dense-arch", "64", "0"], "model.dense_arch=64 0 (--dense-arch): layer sizes must be positive"),
        (["--over-arch"], "model.over_arch (--over-arch) needs at least one hidden layer"),
        (
            ["--arch", "dlrm_dcn", "--dcn-low-rank-dim", "0"],
            "model.dcn_low_rank_dim=0 (--dcn-low-rank-dim) must be >= 1",
        ),
        (["--arch", "dlrm_dcn", "--dcn-num-layers", "-2"], "model.dcn_num_layers=-2 (--dcn-num-layers) must be >= 1"),
    ],
)
def test_layer_sizes_are_refused_by_flag(flags, named, capsys):
    """Layer sizes torch or TorchRec refused only as the model was built (a RuntimeError for a
    negative size, an AssertionError for a rank of 0), or took silently (a hidden layer of 0
    units), are refused by flag before any work."""
    with pytest.raises(SystemExit) as e:
        parse_cli(flags, prog="shark train", command="train")
    assert e.value.code == 2
    assert f"shark train: error: {named}" in capsys.readouterr().err
    # An empty bottom MLP is fine: its one layer, of size embedding-dim, is appended.
    assert parse_cli(["--dense-arch"], command="train").model.dense_arch == ()


def test_help_and_bad_flags_are_answered_before_torch_is_imported():
    """`shark CMD --help` and a misspelt flag need only the config: the job (torch, TorchRec)
    is imported once the flags are good. Importing it first made `shark train --help` take
    about 4 s here."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from shark_torchrec.cli import main\n"
        "for argv in (['train', '--help'], ['compress', '--help'], ['prune', '--help'], ['importance', '--help'],"
        " ['train', '--no-such-flag']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'torchrec', 'shark_torchrec.jobs.trainer') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_fault_inside_the_policy_check_is_not_taken_for_the_users_error(monkeypatch):
    """The policy's own refusals (PolicyError, BudgetError) are the flags' errors; a plain
    ValueError raised while checking them is a fault of ours and propagates as itself (it
    became "quant: ..." with exit status 2 when every ValueError was caught)."""
    from shark_torchrec.modules.precision_policy import PrecisionPolicy

    def broken(self, dims, fused_params=None):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(PrecisionPolicy, "resolved", broken)
    with pytest.raises(ValueError) as e:
        parse_cli(["--precision", "shark"], prog="shark train", command="train")
    assert type(e.value) is ValueError


def test_compress_resume_needs_its_run_directory_not_a_checkpoint_directory(capsys):
    """`shark compress` keeps its checkpoints in its stages' folders and ignores
    --checkpoint-dir: with it alone, --resume started a new time-named run."""
    with pytest.raises(SystemExit):
        parse_cli(["--resume", "--checkpoint-dir", "ckpts"], prog="shark compress", command="compress")
    assert "continues the run in --out DIR" in capsys.readouterr().err
    assert parse_cli(["--resume", "--checkpoint-dir", "ckpts"], prog="shark train", command="train").run.resume
