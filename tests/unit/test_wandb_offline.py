"""W&B sink: offline runs hold the training metrics and the resolved config; online without
credentials falls back to offline with one warning. Nothing here may reach the network.
(Failures of W&B itself: tests/unit/test_wandb_faults.py.)

The offline ``.wandb`` file is read back directly: wandb 0.31 no longer ships a Python reader
(the old ``wandb.sdk.internal.datastore`` went with the Go core) and ``wandb sync`` has no
view mode, but the format is stable and small: W&B's variant of the LevelDB log format whose
records are ``wandb.proto.wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import yaml

from megatron_ext.training import wandb_sink
from tests.conftest import REPO, run_cli
from tests.forkrun import run_clis

BLOCK = 32768  # LevelDB log block size
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
# Anything that tries the network fails at once on this machine's closed port 9.
NOWHERE = "http://127.0.0.1:9"
CREDENTIAL_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE",
                  "WANDB_BASE_URL", "WANDB_DIR", "WANDB_SILENT")


def read_wandb_records(path: Path) -> list:
    """Decode every protobuf ``Record`` of a ``.wandb`` file, checking each chunk's CRC.

    Header: b":W&B", magic 0xBEE1 (uint16 LE), version 0. Then 32 KiB blocks of chunks, each
    ``crc32 | length | type | data`` where the CRC is zlib's CRC-32 of the type byte followed
    by the data; a record spans chunks FIRST, MIDDLE..., LAST, or is one FULL chunk. A block
    tail too short for a chunk header (or a zero header) is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, pos = [], b"", 7
    while pos + CHUNK_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER.size:
            pos += left
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER.size: pos + CHUNK_HEADER.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        pos += CHUNK_HEADER.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def history(records: list) -> dict[int, dict]:
    """{step: {metric: value}} of the ``wandb.log`` calls."""
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            row.update({_item_key(i): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_config(records: list) -> dict:
    """The run's config: the run record's, updated by later config records."""
    config: dict = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else (
            r.config.update if kind == "config" else [])
        config.update({_item_key(i): json.loads(i.value_json) for i in items})
    return config


def _only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture
def no_credentials(tmp_path, monkeypatch) -> Path:
    """An empty HOME, no W&B credentials or settings in the environment, network blocked."""
    home = tmp_path / "home"
    home.mkdir()
    for name in CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def _train_args(run: Path, mode: str | None, steps: int,
                config: str = "configs/tiny-cpu.yaml") -> list[str]:
    """A tiny run; ``mode``/project set with --set unless ``mode`` is None (then the config
    file and the WANDB_* variables of its environment decide)."""
    sets = [] if mode is None else ["--set", f"logging.wandb.mode={mode}",
                                    "--set", "logging.wandb.project=test"]
    return ["pretrain_moe.py", "--config", config,
            "--set", f"train.train_steps={steps}", "--set", "schedule.warmup_steps=1",
            "--set", "train.log_interval=1", "--set", "train.eval_interval=0",
            # no checkpoint: the config's default save dir is in the repo (and resumes)
            "--set", "checkpoint.save=null", "--set", f"logging.output_dir={run}", *sets]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """The three real runs of this file, forked from one driver that imported torch and
    megatron once (tests/forkrun.py): {name: (completed process, its directory)}. Each has its
    own empty HOME and its own W&B variables, set as it starts: wandb reads both at run time."""
    root = tmp_path_factory.mktemp("wandb_runs")
    config = root / "online.yaml"  # a config file asking for online W&B, as the paper configs
    tree = yaml.safe_load((REPO / "configs/tiny-cpu.yaml").read_text())
    tree.setdefault("logging", {})["wandb"] = {"mode": "online", "project": "from-file"}
    config.write_text(yaml.safe_dump(tree))
    calls = {
        "offline": (_train_args(root / "offline" / "run", "offline", steps=3), {
            "WANDB_MODE": "disabled", "WANDB_PROJECT": "env-project",
            "WANDB_ENTITY": "env-entity", "WANDB_RUN_GROUP": "env-group",
            "WANDB_DIR": str(root / "offline" / "wandb_dir")}),
        "disabled": (_train_args(root / "disabled" / "run", None, steps=2, config=str(config)),
                     {"WANDB_MODE": "disabled", "WANDB_DIR": str(root / "disabled" / "wandb_dir"),
                      "WANDB_SILENT": "false"}),
        # WANDB_SILENT off: any warning wandb itself printed would be counted too.
        "online": (_train_args(root / "online" / "run", "online", steps=2),
                   {"WANDB_SILENT": "false"}),
    }
    for name in calls:
        (root / name / "home").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        for name in CREDENTIAL_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(root / "home"))
        procs = run_clis([args for args, _ in calls.values()], root / "forkrun",
                         env={"WANDB_BASE_URL": NOWHERE, "HTTP_PROXY": NOWHERE,
                              "HTTPS_PROXY": NOWHERE},
                         envs=[{**env, "HOME": str(root / name / "home")}
                               for name, (_, env) in calls.items()])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (proc, root / name) for name, proc in zip(calls, procs)}


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_offline_run_holds_metrics_and_config(runs):
    """Also the precedence of W&B's variables: --set beats them (mode, project), they beat the
    config file and the defaults (entity, group, dir)."""
    _, where = runs["offline"]
    run, wandb_dir = where / "run", where / "wandb_dir"
    assert not (run / "wandb").exists()  # WANDB_DIR: W&B's files go there, not to output_dir
    run_dir = _only(sorted((wandb_dir / "wandb").glob("offline-run-*")))
    records = read_wandb_records(_only(sorted(run_dir.glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds  # started and finished cleanly
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run_record.project, run_record.entity, run_record.run_group) == (
        "test", "env-entity", "env-group")
    assert run_record.run_id == (run / "wandb_run_id").read_text().strip()

    rows = history(records)
    jsonl = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert sorted(rows) == [r["step"] for r in jsonl] == [1, 2, 3]
    for expected in jsonl:
        row = rows[expected["step"]]
        for key in ("loss", "lr", "aux_loss", "grad_norm", "moe/layer0/load_e0",
                    "moe/layer3/load_e7", "moe/entropy"):
            assert row[key] == pytest.approx(expected[key], rel=1e-12), key
    assert 0 < rows[3]["lr"] < rows[2]["lr"]  # cosine decay after one warmup step
    assert sum(rows[1][f"moe/layer0/load_e{e}"] for e in range(8)) == pytest.approx(1.0)

    config = run_config(records)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == resolved
    assert config["moe"]["num_experts"] == 8 and config["train"]["train_steps"] == 3
    assert config["logging"]["wandb"]["mode"] == "offline"
    assert config["logging"]["wandb"]["group"] == "env-group"  # the values used are recorded


@pytest.mark.slow
def test_wandb_mode_disabled_beats_the_config_file(runs):
    """A config file asking for online W&B (as the paper configs do) under WANDB_MODE=disabled:
    W&B is not started and nothing of it is written, neither in the run nor in WANDB_DIR."""
    proc, where = runs["disabled"]
    run, wandb_dir = where / "run", where / "wandb_dir"
    assert "WARNING" not in proc.stdout + proc.stderr  # not even the missing credentials
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "wandb").exists() and not (run / "wandb_run_id").exists()
    assert not wandb_dir.exists()
    used = yaml.safe_load((run / "config.yaml").read_text())["logging"]["wandb"]
    assert (used["mode"], used["project"], used["dir"]) == ("disabled", "from-file",
                                                            str(wandb_dir))


def test_wandb_variables_against_config_and_set(tmp_path, no_credentials):
    """--print-config (no training): each variable overrides the config file's value, --set
    overrides the variable, empty means unset, wandb's old mode names are understood, and a
    mode wandb does not know is one line, exit 2."""
    def resolved(env: dict, *sets: str) -> dict:
        proc = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--print-config",
                        *(arg for s in sets for arg in ("--set", s))], env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return yaml.safe_load(proc.stdout)["logging"]["wandb"]

    file = resolved({})
    assert (file["mode"], file["project"], file["entity"], file["group"], file["dir"]) == (
        "online", "drop-upcycling", None, None, None)  # what configs/8x152M.yaml says
    env = {"WANDB_MODE": "dryrun", "WANDB_PROJECT": "123", "WANDB_ENTITY": "team",
           "WANDB_RUN_GROUP": "sweep-1", "WANDB_DIR": str(tmp_path)}
    assert resolved(env) == {**file, "mode": "offline", "project": "123", "entity": "team",
                             "group": "sweep-1", "dir": str(tmp_path)}
    assert resolved(env, "logging.wandb.mode=online", "logging.wandb.group=mine") == {
        **file, "mode": "online", "project": "123", "entity": "team", "group": "mine",
        "dir": str(tmp_path)}
    assert resolved({"WANDB_MODE": "", "WANDB_PROJECT": " "}) == file
    bad = run_cli(["pretrain_moe.py", "--config", "configs/8x152M.yaml", "--print-config"],
                  env={"WANDB_MODE": "sometimes"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "config error: WANDB_MODE='sometimes': expected online, offline or disabled"]


@pytest.mark.slow
def test_online_without_credentials_falls_back_to_offline(runs):
    proc, where = runs["online"]
    run = where / "run"
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    assert warnings == ["WARNING: logging.wandb.mode=online but no W&B credentials found; "
                        "logging offline (sync later with `wandb sync`)"], warnings
    assert not list((run / "wandb").glob("run-*"))  # online runs are named run-*, not offline-*
    run_dir = _only(sorted((run / "wandb").glob("offline-run-*")))
    rows = history(read_wandb_records(_only(sorted(run_dir.glob("run-*.wandb")))))
    assert sorted(rows) == [1, 2] and "loss" in rows[2]
    assert not list((where / "home").glob("*netrc"))  # no login happened


# ----------------------------------------------------------------------------- in process


def test_credentials_lookup(tmp_path, no_credentials, monkeypatch):
    assert not wandb_sink._wandb_has_credentials()
    netrc_file = no_credentials / ".netrc"
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert wandb_sink._wandb_has_credentials()
    # a self-hosted server has its own netrc entry
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not wandb_sink._wandb_has_credentials()
    with netrc_file.open("a") as handle:
        handle.write("machine wandb.example.com login user password " + "s" * 40 + "\n")
    assert wandb_sink._wandb_has_credentials()
    # $NETRC replaces ~/.netrc, as in the SDK
    monkeypatch.setenv("NETRC", str(tmp_path / "missing_netrc"))
    assert not wandb_sink._wandb_has_credentials()
    (tmp_path / "broken_netrc").write_text("machine\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "broken_netrc"))
    assert not wandb_sink._wandb_has_credentials()  # unreadable: no credentials, no crash
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    assert wandb_sink._wandb_has_credentials()
