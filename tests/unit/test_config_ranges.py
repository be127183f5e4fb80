"""Every config value is checked: each numeric and list field of the tree declares its range
with the field in schema.py (a new field without one fails here), each field has a resume
policy (its own or its section's), every value outside it -- negative, zero, NaN, inf, huge --
ends in one ConfigError ``section.key: reason`` (exit 2 and one stderr line from the CLI), a run
whose dataset index cannot fit this machine's memory is refused with the figure, and the YAML
reader refuses duplicate keys, syntax errors, directories and binary files with the line."""

import dataclasses
import math
import re
import types
import typing
from typing import Union

import psutil
import pytest

from megatron_ext.config.fields import POLICIES, Entries, Items, Range
from megatron_ext.config.loader import ConfigError, load_config
from megatron_ext.config.ranges import check_ranges, index_bytes, numeric_fields, rules
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from megatron_ext.training import dry_run
from tests.conftest import REPO, run_cli

TINY = REPO / "configs/tiny-cpu.yaml"


def _schema_fields(cls=Config, prefix=""):
    """(section.key, annotation) of every leaf field, found independently of fields.py."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


def _metadata(cls=Config, prefix="", inherited=None):
    """(section.key, the field's metadata, the resume policy it declares or inherits)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        policy = f.metadata.get("resume") or inherited
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _metadata(hints[f.name], f"{prefix}{f.name}.", policy)
        else:
            yield f"{prefix}{f.name}", f.metadata, policy


def _arms(tp):
    union = typing.get_origin(tp) in (Union, types.UnionType)  # Optional[X] or X | None
    return typing.get_args(tp) if union else (tp,)


def test_every_numeric_and_list_field_declares_its_range():
    checked = {name for name, _ in numeric_fields()}
    meta = {name: m for name, m, _ in _metadata()}
    for name, tp in _schema_fields():
        arms = _arms(tp)
        declared = meta[name].get("bounds", ())
        kinds = {type(r) for r in declared}
        assert tuple(rules(name)) == tuple(declared), f"{name}: rules() is not the schema's"
        if any(a in (int, float) for a in arms):
            assert Range in kinds, f"{name}: numeric field without a Range (setting(bounds=))"
        if any(a is list or typing.get_origin(a) is list for a in arms):
            assert Items in kinds, f"{name}: list field without Items (setting(bounds=))"
        if any(a is dict or typing.get_origin(a) is dict for a in arms):
            assert Entries in kinds, f"{name}: mapping field without Entries (setting(bounds=))"
        if kinds:
            assert name in checked, f"{name}: declared but not visited by check_ranges"
        takes = {Range: any(a in (int, float) for a in arms),
                 Items: any(a is list or typing.get_origin(a) is list for a in arms),
                 Entries: any(a is dict or typing.get_origin(a) is dict for a in arms)}
        useless = [k.__name__ for k in kinds if not takes[k]]
        assert not useless, f"{name}: {useless} declared on a field that cannot hold it"


def test_every_field_has_a_resume_policy():
    """Declared with the field or inherited from its section (declared where Config holds it),
    and the one resume check applies exactly that policy."""
    from megatron_ext.checkpoint.resume_check import policy

    for name, _, declared in _metadata():
        assert declared in POLICIES, f"{name}: no resume policy (setting(resume=) or section's)"
        assert policy(name) == declared, name
    for f in dataclasses.fields(Config):
        assert f.metadata.get("resume") in POLICIES, f"section {f.name} declares no policy"


def _outside(r: Range, tp) -> list:
    """Values just outside ``r`` (and non-finite ones for float fields)."""
    integer = int in _arms(tp) and float not in _arms(tp)
    step = 1 if integer else max(abs(r.hi), 1.0) * 1e-3
    values = [r.hi + step, r.lo - step]
    values += [r.lo] if r.lo_open else []
    values += [r.hi] if r.hi_open else []
    values += [] if integer else [math.nan, math.inf, -math.inf]
    return values


@pytest.mark.parametrize("name", sorted(n for n, _ in _schema_fields() if any(
    isinstance(r, Range) for r in rules(n))))
def test_every_declared_bound_is_enforced(name):
    """Introspection: every field's range is tested at both ends, without a list to maintain."""
    tp = dict(_schema_fields())[name]
    r = next(x for x in rules(name) if isinstance(x, Range))
    for value in _outside(r, tp):
        cfg = Config()
        section, key = name.rsplit(".", 1)
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        setattr(node, key, value)
        with pytest.raises(ConfigError, match=f"^{re.escape(name)}: "):
            check_ranges(cfg)


@pytest.mark.parametrize("override, message", [
    ("model.num_layers=0", "model.num_layers: must be >= 1, got 0"),
    ("model.hidden_size=-128", "model.hidden_size: must be >= 1, got -128"),
    ("model.ffn_hidden_size=10000000000", "model.ffn_hidden_size: must be <= 262144"),
    ("model.vocab_size=4294967296", "model.vocab_size: must be <= 2147483647"),
    ("model.max_position_embeddings=100000000000", "model.max_position_embeddings: must be <="),
    ("model.rotary_base=0", "model.rotary_base: must be >= 2, got 0"),
    ("model.rotary_base=10000.5", "model.rotary_base: must be a whole number"),
    ("model.norm_epsilon=0", "model.norm_epsilon: must be > 0, got 0"),
    ("model.norm_epsilon=.nan", "model.norm_epsilon: must be a finite number, got nan"),
    ("model.init_method_std=-0.02", "model.init_method_std: must be > 0, got -0.02"),
    ("moe.aux_loss_coeff=-1", "moe.aux_loss_coeff: must be >= 0, got -1"),
    ("moe.z_loss_coeff=.inf", "moe.z_loss_coeff: must be a finite number, got inf"),
    ("moe.capacity_factor=-.inf", "moe.capacity_factor: must be a finite number, got -inf"),
    ("moe.layer_freq=[1, 2, 1, 0]", "moe.layer_freq: item 1: must be <= 1, got 2"),
    ("moe.layer_freq=[1, .nan, 1, 0]", "moe.layer_freq: item 1: nan is not an integer"),
    ("parallel.world_size=0", "parallel.world_size: must be >= 1, got 0"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
    ("optimizer.lr=1e999", "optimizer.lr: must be a finite number, got '1e999'"),
    ("optimizer.lr=-1e-4", "optimizer.lr: must be >= 0, got -0.0001"),
    ("optimizer.adam_beta2=1", "optimizer.adam_beta2: must be < 1, got 1"),
    ("optimizer.adam_eps=0", "optimizer.adam_eps: must be > 0, got 0"),
    ("optimizer.clip_grad=.inf", "optimizer.clip_grad: must be a finite number"),
    ("schedule.warmup_init_lr=.nan", "schedule.warmup_init_lr: must be a finite number"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps: must be >= 0, got -1"),
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
    ("train.seed=4294967296", "train.seed: must be <= 4294967295, got 4294967296"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1, got 0"),
    ("train.peak_tflops=0", "train.peak_tflops: must be > 0, got 0"),
    ("data.blend=[.nan, /x, 1, /y]", "data.blend: item 0: must be a finite number, got nan"),
    ("data.blend=[-1, /x, 1, /y]", "data.blend: item 0: must be > 0, got -1"),
    ("data.seq_length=1", "data.seq_length: must be >= 2, got 1"),
    ("data.split=0,1,1", "data.split: '0,1,1' leaves no training data"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: must be >= 1, got 0"),
    ("logging.wandb.tags=[ok, 3]", "logging.wandb.tags: item 1: 3 is not a string"),
    ("logging.wandb.init_timeout_s=-5", "logging.wandb.init_timeout_s: must be > 0, got -5"),
    ("upcycling.ratio=.nan", "upcycling.ratio: must be a finite number, got nan"),
    ("upcycling.seed=99999999999999999999999",
     "upcycling.seed: must be <= 4294967295, got 9.999e+22"),
    ("upcycling.noise_std=0", "upcycling.noise_std: must be > 0, got 0"),
    ("model.hidden_size=96", "model.hidden_size: head dimension 96/4 = 24"),  # even: passes
])
def test_bad_values_are_one_config_error(override, message):
    """The CLI path: load_config (YAML, types, finiteness) then validate (ranges, sizes)."""
    if override == "model.hidden_size=96":  # control: an odd head dimension, not an even one
        validate(load_config(TINY, [override]))
        override, message = "model.hidden_size=12", "model.hidden_size: head dimension 12/4 = 3"
    with pytest.raises(ConfigError) as e:
        validate(load_config(TINY, [override]))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_vocab_padding_beyond_int32_is_refused():
    with pytest.raises(ConfigError, match=r"^model.vocab_size: 2147483647 padded .* beyond int32"):
        validate(load_config(TINY, ["model.vocab_size=2147483647"]))


def test_huge_run_is_refused_with_the_index_memory_figure():
    """10^15 steps: megatron's sample and shuffle index alone would be ~16 bytes x 1.6e16."""
    with pytest.raises(ConfigError) as e:
        validate(load_config(TINY, ["train.train_steps=1000000000000000", "train.eval_interval=0"]))
    text = str(e.value)
    assert text.startswith("train.train_steps: 1,000,000,000,000,000 steps x 16 sequences")
    need = float(re.search(r"needs at least ([\d,.]+) GiB", text).group(1).replace(",", ""))
    assert need >= 16e15 * 12 / 2**30  # at least int32 sample-index pairs + a shuffle entry
    have = float(re.search(r"memory \(([\d,.]+) GiB\)", text).group(1).replace(",", ""))
    assert have == pytest.approx(psutil.virtual_memory().total / 2**30, abs=0.06)
    with pytest.raises(ConfigError, match=r"^train.train_tokens: .* more than this machine's"):
        validate(load_config(TINY, ["train.train_tokens=4611686018427387904"]))


def test_index_estimate_matches_the_arrays_megatron_builds():
    """index_bytes is checked against a real MockGPTDataset (sample + shuffle index)."""
    from megatron_ext.data.datasets import build_mock_datasets

    train, _, _ = build_mock_datasets(seq_length=16, seed=1, num_samples=(5000, 0, 0),
                                      vocab_size=64)
    built = train.sample_index.nbytes + train.shuffle_index.nbytes
    assert index_bytes(len(train), blended=False) == built


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


@pytest.mark.parametrize("text, message", [
    ("optimizer:\n  lr: 1.0e-4\n  min_lr: 0\n  lr: 2.0e-4\n",
     "duplicate key 'lr' at line 4, column 3 (first at line 2)"),
    ("model:\n  num_layers: 2\ntrain:\n  seed: 1\nmodel:\n  hidden_size: 64\n",
     "duplicate key 'model' at line 5, column 1 (first at line 1)"),
    ("logging:\n  wandb:\n    mode: offline\n    tags: [a]\n    mode: online\n",
     "duplicate key 'mode' at line 5, column 5 (first at line 3)"),
    ("train: {seed: 1, seed: 2}\n", "duplicate key 'seed' at line 1, column 18 (first at line 1)"),
    ("model:\n  hidden_size: [64\ntrain:\n  seed: 1\n", "invalid YAML at line 3, column 6"),
    ("model:\n  hidden_size: 64\n num_layers: 2\n", "invalid YAML at line 3, column 2"),
    ("a: 'unclosed\n", "invalid YAML at line 2, column 1"),
    ("model: !!python/object/apply:os.system [ls]\n", "invalid YAML at line 1, column 8"),
    ("model:\n  hidden_size: 64\x00\n", "invalid YAML at line 2: character '\\x00'"),
    (b"model:\n  num_layers: 2\n\xff\xfe\x00\x01", "not UTF-8 text (byte 0xff at line 3)"),
    ("[" * 50000, "invalid YAML: nested too deeply"),
    ("- model\n- train\n", "the top level must be a mapping of sections"),
    ("model:\n  1: 2\n", "model: key 1 is not a field name"),
])
def test_config_file_faults_are_one_line(tmp_path, text, message):
    p = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(str(p)) or str(e.value).startswith("model:")


def test_odd_but_legal_files(tmp_path):
    """Empty and comment-only files are the defaults; a YAML merge may override its base."""
    assert load_config(_write(tmp_path, "empty.yaml", "")) == Config()
    assert load_config(_write(tmp_path, "comments.yaml", "# nothing\n\n")) == Config()
    merged = "model:\n  <<: {num_layers: 3, hidden_size: 32}\n  num_layers: 5\n"
    cfg = load_config(_write(tmp_path, "merge.yaml", merged))
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (5, 32)
    bom = load_config(_write(tmp_path, "bom.yaml", b"\xef\xbb\xbfmodel:\n  num_layers: 5\n"))
    assert bom.model.num_layers == 5


def test_config_path_faults(tmp_path):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="^config file not found: "):
        load_config(tmp_path / "nope.yaml")
    big = _write(tmp_path, "big.yaml", "# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(big)


@pytest.mark.parametrize("override, message", [
    ("model={hidden_size: 64, hidden_size: 32}", "--set model: duplicate key 'hidden_size'"),
    ("data.blend=[1, a", "--set data.blend: invalid YAML at line 1, column 6"),
    ("train.seed=1: 2: 3", "--set train.seed: invalid YAML at line 1, column 5"),
    ("=3", "--set =3: expected section.key=value"),
    ("model..hidden_size=3", "--set model..hidden_size=3: expected section.key=value"),
    ("model.hidden_size", "--set model.hidden_size: expected section.key=value"),
    ("model.hidden_size.x=3", "model.hidden_size.x: hidden_size is not a section"),
])
def test_set_value_faults(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(message), str(e.value)


def _one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_dry_run_refuses_bad_values_with_one_line(tmp_path):
    """Through pretrain_moe.py: exit 2, exactly one stderr line, nothing on stdout."""
    dup = _write(tmp_path, "dup.yaml", "train:\n  seed: 1\n  seed: 2\n")
    for args, start in [
        (["--config", str(TINY), "--set", "optimizer.lr=.nan"],
         "config error: optimizer.lr: must be a finite number, got nan"),
        (["--config", str(dup)], f"config error: {dup}: duplicate key 'seed' at line 3"),
        (["--config", str(TINY), "--set", "train.train_steps=1000000000000000"],
         "config error: train.train_steps: 1,000,000,000,000,000 steps"),
        (["--config", str(tmp_path)], f"config error: {tmp_path}: is a directory"),
    ]:
        proc = run_cli(["pretrain_moe.py", *args, "--dry-run"])
        assert proc.returncode == 2, proc.stderr
        assert _one_error_line(proc).startswith(start)
        assert proc.stdout == ""


@pytest.mark.parametrize("overrides", [
    ["moe.num_experts=0"],                                     # dense
    ["moe.layer_freq=[0, 1, 0, 1]", "model.num_kv_heads=1"],   # interleaved, MQA
    ["moe.num_experts=1", "moe.top_k=1", "moe.capacity_factor=1.5"],
])
def test_dry_run_of_odd_but_valid_configs(overrides, capsys):
    cfg = load_config(TINY, overrides)
    validate(cfg)
    assert dry_run.main(cfg) == 0
    out = capsys.readouterr().out
    assert "(matches the count above)" in out, out


def test_dry_run_failure_is_one_line_exit_1(capsys):
    """A config megatron cannot build (here one that skipped validation: a layer_freq list of 2
    entries for 4 layers, which megatron asserts on) ends in one line, exit 1 -- no traceback."""
    cfg = load_config(TINY, ["moe.layer_freq=[1, 0]"])
    assert dry_run.main(cfg) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()
           and "warn" not in line.lower()]  # megatron's import-time warnings are not ours
    assert len(err) == 1, err
    assert err[0].startswith("error: --dry-run failed (AssertionError: Invalid length of "
                             "moe_layer_pattern"), err


def _largest_model():
    """Every size field of model/moe at its declared upper bound (vocab: padded within int32)."""
    cfg = Config()
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        setattr(cfg.model, name, rules(f"model.{name}")[0].hi)
    cfg.model.vocab_size = 2**31 - cfg.model.vocab_multiple
    cfg.moe.num_experts = cfg.moe.top_k = rules("moe.num_experts")[0].hi
    return cfg


def test_declared_upper_bounds_keep_sizes_in_int64():
    """"Sane" bounds: the largest model they allow still counts its bytes (fp32 weights, grads
    and two Adam moments) in int64, so no size arithmetic downstream can overflow."""
    from megatron_ext.model.params import count_params

    cfg = _largest_model()
    validate(cfg)
    assert count_params(cfg.model, cfg.moe).total * 16 < 2**63


def test_dry_run_of_the_largest_model_answers_at_once(capsys):
    assert dry_run.main(_largest_model()) == 0
    out = capsys.readouterr().out
    assert "not built on the meta device: 1024 layers x 1024 experts" in out, out
