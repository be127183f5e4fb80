"""Every value that enters the config tree is bounded before use, whatever its way in (issue 24,
class 1): a YAML file (``--config``), ``--set``, a checkpoint's saved ``config.yaml`` read by a
real tool, and the tools' number flags. One table of bad values -- an alias bomb ("billion
laughs"), a recursive alias, an integer past every bound (2**70, 5000 digits), inf/NaN, a
float for an integer, the wrong container, a string of megabytes -- goes through each entry;
each ends in one line, exit 2, a message of bounded length naming the source and the field,
within seconds (a subprocess timeout turns a hang into a failure)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from megatron_ext.checkpoint import manifest
from megatron_ext.checkpoint.store import CheckpointError, find_resumable
from megatron_ext.config.loader import MAX_EXPANDED, ConfigError, check_expansion, load_config
from tests.conftest import run_cli
from tests.forkrun import run_clis
from tests.resilience import small_args

MAX_LINE = 300  # characters a message may add to the paths it names
QUICK_S = 10  # generous on a loaded 2-core machine; a bomb would take hours
TOOL_S = 240  # a tool process, torch and megatron imports included


def bomb(levels: int, width: int = 9) -> str:
    """A flow sequence whose aliases expand to width**levels leaves."""
    names = "abcdefghijklmnop"
    parts = [f"&a [{', '.join(['x'] * width)}]"]
    parts += [f"&{names[i]} [{', '.join(['*' + names[i - 1]] * width)}]"
              for i in range(1, levels)]
    return f"[{', '.join(parts)}]"


BOMB = bomb(9)  # 387 million leaves
# (field, YAML text of its value, what the message says after the field or source)
BAD = [
    ("train.seed", BOMB, "aliases expand it past"),
    ("data.blend", BOMB, "aliases expand it past"),
    ("model.hidden_size", "&r [*r]", "recursive alias"),
    ("logging.wandb.tags", bomb(6), "logging.wandb.tags: item 0: ['x', 'x', 'x', 'x', ...] is "
                                    "not a string"),  # under the budget: checked, quoted short
    ("model.hidden_size", "1048576", "model.hidden_size: must be <= 65536, got 1048576"),
    ("train.seed", str(2**70), "train.seed: must be <= 4294967295, got 1.180e+21"),
    ("upcycling.seed", "9" * 5000, "Exceeds the limit (4300 digits)"),
    ("optimizer.lr", ".inf", "optimizer.lr: must be a finite number, got inf"),
    ("model.rotary_base", ".nan", "model.rotary_base: must be a finite number, got nan"),
    ("model.num_layers", "2.5", "model.num_layers: expected an integer, got 2.5"),
    ("moe.num_experts", "8.0", "moe.num_experts: expected an integer, got 8.0"),
    ("model", "[1, 2]", "model: expected a mapping, got [1, 2]"),
    ("data.blend", "{a: 1}", "data.blend: expected a list, got {'a': 1}"),
    ("data.valid_sets", "[a]", "data.valid_sets: expected a mapping of names, got ['a']"),
    ("data.valid_sets", "{en: [.nan, /x]}", "data.valid_sets.en: item 0: must be a finite"),
    ("data.tokenizer", repr("x" * 1_000_000), "data.tokenizer: a string of 1,000,000 characters"),
]
IDS = [f"{field}-{i}" for i, (field, _, _) in enumerate(BAD)]


def config_text(field: str, value: str, base: dict | None = None) -> str:
    """``base`` (a config mapping; {} = the defaults) as YAML, ``field`` set to the raw YAML
    ``value`` (aliases and all: it is pasted, not dumped)."""
    tree = json.loads(json.dumps(base or {}))
    node = tree
    *sections, key = field.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[key] = "@@VALUE@@"
    return yaml.safe_dump(tree, sort_keys=False, width=2**30).replace("'@@VALUE@@'", value)


def bounded(message: str, *paths: Path) -> str:
    for p in paths:
        message = message.replace(str(p), "<path>")
    assert "\n" not in message and len(message) < MAX_LINE, message[:2000]
    return message


def quickly(fn, *args):
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        assert time.monotonic() - start < QUICK_S


def one_line_exit_2(proc, *paths: Path) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    return bounded(lines[0], *paths)


@pytest.mark.parametrize("field, value, needle", BAD, ids=IDS)
def test_yaml_file(tmp_path, field, value, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(config_text(field, value))
    with pytest.raises(ConfigError) as e:
        quickly(load_config, f)
    text = bounded(str(e.value), f)
    assert text.startswith("<path>: ") and needle in text, text


@pytest.mark.parametrize("field, value, needle", BAD, ids=IDS)
def test_set_value(field, value, needle):
    if len(value) > 100_000:  # past what one argv string may hold (Linux: 128 KiB)
        value = repr("x" * 100_000)
        needle = f"{field}: a string of 100,000 characters"
    with pytest.raises(ConfigError) as e:
        quickly(load_config, None, [f"{field}={value}"])
    assert needle in bounded(str(e.value)), str(e.value)


def test_api_mapping_of_ten_megabytes():
    """The Python API (mapping overrides, config_from_dict) takes no argv limit: 10 MB."""
    with pytest.raises(ConfigError) as e:
        quickly(load_config, None, {"data.tokenizer": "x" * 10_000_000})
    assert bounded(str(e.value)).startswith("data.tokenizer: a string of 10,000,000 characters")


def test_ten_megabyte_file_is_not_read(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text(config_text("data.tokenizer", repr("x" * 10_000_000)))
    with pytest.raises(ConfigError, match="larger than 1 MiB, not a config file"):
        quickly(load_config, f)


def test_an_override_is_named_by_its_field_a_file_value_by_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  seed: -1\n")
    with pytest.raises(ConfigError, match=f"^{f}: train.seed: must be >= 0, got -1$"):
        load_config(f)
    assert load_config(f, ["train.seed=3"]).train.seed == 3  # a fix on the command line
    with pytest.raises(ConfigError, match="^train.seed: must be <= 4294967295"):
        load_config(f, [f"train.seed={2**40}"])


@pytest.mark.parametrize("text", [
    "[" + ", ".join(["ab"] * 5000) + "]",
    "a:\n" + "".join(f"  k{i}: {{x: [1, 2.5, 'q'], y: \"\\x41\"}}\n" for i in range(2000)),
    "- " + "\n- ".join(["x"] * 5000) + "\n",
    "s: |\n" + "  line\n" * 5000,
], ids=["flow-list", "mappings", "block-list", "literal"])
def test_the_budget_never_refuses_a_file_without_aliases(text):
    """Expanded, an alias-free document weighs no more than its length: the budget (twice the
    file limit) refuses only what aliases multiply."""
    check_expansion(yaml.compose(text, Loader=yaml.SafeLoader), budget=len(text) + 1)
    with pytest.raises(yaml.YAMLError, match="aliases expand it past"):
        check_expansion(yaml.compose(f"a: &a {json.dumps(text)}\nb: [*a, *a]",
                                     Loader=yaml.SafeLoader), budget=2 * len(text))


def test_a_long_list_parses_a_bomb_of_the_same_text_does_not():
    flat = "[" + ", ".join(["ab"] * 30_000) + "]"
    assert len(quickly(load_config, None, [f"data.blend={flat}"]).data.blend) == 30_000
    assert 9**7 * 2 > MAX_EXPANDED > 9**6 * 2  # bomb(7) is refused, bomb(6) is checked
    with pytest.raises(ConfigError, match="aliases expand it past"):
        quickly(load_config, None, [f"data.blend={bomb(7)}"])


@pytest.mark.parametrize("args", [
    ["--config", "{file}"],
    ["--set", f"train.seed={BOMB}"],
], ids=["config", "set"])
def test_alias_bomb_through_the_training_cli_exits_at_once(tmp_path, args):
    f = tmp_path / "bomb.yaml"
    f.write_text(config_text("train.seed", BOMB))
    argv = [a.replace("{file}", str(f)) for a in args]
    proc = run_cli(["pretrain_moe.py", *argv, "--dry-run"], timeout=TOOL_S)
    line = one_line_exit_2(proc, f)
    assert line.startswith("config error: ") and "aliases expand it past" in line, line


# --- a checkpoint's saved config.yaml, as a stranger might ship it ---------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real checkpoint of a 3-step tiny run (mock data)."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = run_cli(small_args(tmp, 3), timeout=TOOL_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ckpt"


def stranger(trained: Path, tmp: Path, field: str, value: str) -> Path:
    """A copy of the checkpoint whose saved config sets ``field`` to ``value``, its manifest
    recording the new file (the damage is the config's content, not a checksum mismatch)."""
    root = tmp / "ckpt"
    shutil.copytree(trained, root)
    d = root / "iter_0000003"
    saved = yaml.safe_load((d / "config.yaml").read_text())
    (d / "config.yaml").write_text(config_text(field, value, saved))
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["config.yaml"] = manifest.file_sum(d / "config.yaml")
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("field, value, needle", BAD, ids=IDS)
def test_saved_config_of_a_checkpoint(trained, tmp_path, field, value, needle):
    """What generate, lm_eval, routing and mcore_to_hf read (checkpoint_config), and what a
    resume looks for (find_resumable): refused, naming the file and the field."""
    from megatron_ext.checkpoint.load_model import checkpoint_config

    d = stranger(trained, tmp_path, field, value)
    with pytest.raises(CheckpointError) as e:
        quickly(checkpoint_config, d)
    text = bounded(str(e.value), d / "config.yaml")
    assert "<path>: " in text and needle in text, text
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(d.parent)


def test_ten_megabyte_saved_config_is_not_read(trained, tmp_path):
    from megatron_ext.checkpoint.load_model import checkpoint_config

    d = stranger(trained, tmp_path, "data.tokenizer", repr("x" * 10_000_000))
    with pytest.raises(CheckpointError, match="larger than 1 MiB"):
        quickly(checkpoint_config, d)


STRANGERS = {  # id: (tool, field, value, what the one line says)
    "generate-bomb": ("generate", "train.seed", BOMB, "aliases expand it past"),
    "generate-huge": ("generate", "model.hidden_size", "1048576",
                      "model.hidden_size: must be <= 65536"),
    "mcore_to_hf-nan": ("mcore_to_hf", "model.rotary_base", ".nan", "must be a finite number"),
}


@pytest.fixture(scope="module")
def stranger_runs(trained, tmp_path_factory) -> dict:
    """Each real tool on its stranger's checkpoint, forked from one driver (tests.forkrun)."""
    tmp, calls, dirs = tmp_path_factory.mktemp("strangers"), [], {}
    for case, (tool, field, value, _) in STRANGERS.items():
        d = stranger(trained, tmp / case, field, value)
        args = (["--checkpoint", str(d), "--prompt", "a"] if tool == "generate"
                else ["--input", str(d), "--output", str(tmp / case / "out")])
        calls.append(["-m", f"megatron_ext.cli.{tool}", *args])
        dirs[case] = (tmp / case, d)
    return dict(zip(STRANGERS, zip(dirs.values(), run_clis(calls, tmp / "driver",
                                                           timeout=TOOL_S))))


@pytest.mark.parametrize("case", list(STRANGERS))
def test_real_tools_refuse_a_strangers_checkpoint(stranger_runs, case):
    (tmp, d), proc = stranger_runs[case]
    line = one_line_exit_2(proc, d / "config.yaml")
    assert "saved config: <path>: " in line and STRANGERS[case][3] in line, line
    assert not (tmp / "out").exists()


# --- the tools' number flags -----------------------------------------------------------------
FLAGS = [  # (tool, its arguments, what the one line says)
    ("upcycle", ["--num-experts", "1000000"],
     "argument --num-experts: must be <= 1024 (moe.num_experts), got 1000000"),
    ("upcycle", ["--top-k", "2.5"], "argument --top-k: expected an integer"),
    ("upcycle", ["--seed", str(2**70)],
     "argument --seed: must be <= 4294967295 (upcycling.seed), got 1.180e+21"),
    ("upcycle", ["--seed", "9" * 5000],
     "argument --seed: an integer of 5000 digits is out of range (upcycling.seed)"),
    ("upcycle", ["--ratio", "nan"], "argument --ratio: must be a finite number"),
    ("upcycle", ["--ratio", "1.5"], "must be <= 1 (upcycling.ratio), got 1.5"),
    ("upcycle", ["--noise-std=-inf"], "argument --noise-std: must be a finite"),
    ("upcycle", ["--max-shard-size", "inf"],
     "argument --max-shard-size: bad size"),
    ("mcore_to_hf", ["--max-shard-size", "1e400GB"],
     "argument --max-shard-size: size '1e400GB' must be from 1 byte to 1 PiB"),
    ("generate", ["--seed", str(2**70)], "argument --seed: must be <= 4294967295"),
    ("generate", ["--max-new-tokens", "1" + "0" * 20], "argument --max-new-tokens: must"),
    ("generate", ["--temperature", "nan"], "argument --temperature: must be a finite"),
    ("generate", ["--batch-size", "x" * 100_000],
     "argument --batch-size: expected an integer, got 'xxxxxxxxxxxxxxxxxxxx'...(100000 "
     "characters)"),
    ("lm_eval", ["--limit", "inf"], "argument --limit: must be a finite number"),
    ("lm_eval", ["--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0"),
    ("lm_eval", ["--seed", "-5"], "argument --seed: must be >= 0 (train.seed)"),
    ("preprocess", ["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    ("train_tokenizer", ["--vocab-size", str(2**40)],
     "argument --vocab-size: must be <= 2147483647 (model.vocab_size)"),
    ("compare_inits", ["--tokens", str(2**70)],
     "argument --tokens: must be <= 4611686018427387904 (train.train_tokens), got 1.180e+21"),
    ("compare_inits", ["--nproc-per-node", "1.5"],
     "argument --nproc-per-node: expected an integer, got '1.5'"),
    ("routing", ["--seq-length", "1"], "must be >= 2 (data.seq_length), got 1"),
    ("loss_curves", ["--smooth", "1"], "argument --smooth: must be < 1, got 1"),
]
REQUIRED = {  # the rest of each tool's required arguments (never read: the flag fails first)
    "upcycle": ["--input", "/nonexistent", "--output", "/nonexistent/o"],
    "mcore_to_hf": ["--input", "/nonexistent", "--output", "/nonexistent/o"],
    "generate": ["--checkpoint", "/nonexistent", "--prompt", "a"],
    "lm_eval": ["--checkpoint", "/nonexistent", "--tasks", "x"],
    "preprocess": ["--input", "/nonexistent", "--output-prefix", "/nonexistent/o",
                                 "--tokenizer", "/nonexistent"],
    "train_tokenizer": ["--input", "/nonexistent", "--output", "/nonexistent/o"],
    "compare_inits": ["--config", "/nonexistent", "--methods", "naive",
                                           "--output", "/nonexistent/o", "--dense", "/x"],
    "routing": ["--checkpoint", "/nonexistent", "--text", "a=/nonexistent",
                                  "--output", "/nonexistent/o"],
    "loss_curves": ["--run", "a=/nonexistent", "--output", "/nonexistent/o"],
}


def tool_main(tool: str):
    """The tool's ``main(argv) -> exit code`` (what its console script runs)."""
    return importlib.import_module(f"megatron_ext.cli.{tool}").main


@pytest.mark.parametrize("tool, args, needle", FLAGS,
                         ids=[f"{t}{a[0]}-{i}" for i, (t, a, _) in enumerate(FLAGS)])
def test_tool_flags(tool, args, needle, capsys):
    """In this process (the parse fails before any tool imports torch); two below as processes."""
    code = quickly(tool_main(tool), [*REQUIRED[tool], *args])
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and captured.out == "", captured.err
    assert needle in bounded(lines[0]) and lines[0].startswith("error: "), lines[0]


@pytest.mark.parametrize("index", [0, 9], ids=["upcycle", "generate"])
def test_tool_flags_in_a_process(index):
    tool, args, needle = FLAGS[index]
    line = one_line_exit_2(run_cli(["-m", f"megatron_ext.cli.{tool}", *REQUIRED[tool], *args],
                                    timeout=TOOL_S))
    assert needle in line, line


def test_flags_within_bounds_still_parse():
    from megatron_ext.config.args import field_arg, float_arg, int_arg, parse_size, size_arg

    assert field_arg("moe.num_experts")("8") == 8 and field_arg("upcycling.ratio")("1") == 1.0
    assert int_arg(0, 5)(" 5 ") == 5 and float_arg(0, 1, lo_open=True)("1e-3") == 1e-3
    assert size_arg("1.5GiB") == 3 * 2**29 and parse_size("2GB") == 2 * 10**9
    assert parse_size(300) == 300
    with pytest.raises(ValueError, match="not a config field with a numeric range"):
        field_arg("data.tokenizer")  # a typo or a non-number field fails when the parser is built


def test_every_entry_is_the_same_checks(tmp_path):
    """File, --set, mapping and saved config agree: the same value is accepted or refused."""
    from megatron_ext.config.loader import config_from_dict

    for field, value in (("moe.top_k", "1024"), ("moe.top_k", "1025"), ("model.rotary_base",
                                                                         "10000.5")):
        f = tmp_path / "c.yaml"
        f.write_text(config_text(field, value))
        verdicts = []
        for build in (lambda: load_config(f), lambda: load_config(None, [f"{field}={value}"]),
                      lambda: config_from_dict(yaml.safe_load(f.read_text()))):
            try:
                build()
                verdicts.append("ok")
            except ConfigError as e:
                verdicts.append(str(e).split(f"{field}: ", 1)[1])
        assert len(set(verdicts)) == 1, verdicts

