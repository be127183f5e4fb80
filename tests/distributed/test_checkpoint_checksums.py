"""A checkpoint is used only if provably whole: every file's size and xxh3-128 checksum, recorded at
save by the process that wrote it (the async writer included), is checked before anything is
read; any damage (missing, truncated or overwritten file, lying or malformed meta.json, garbage
in ``latest``) makes resume fall back to the newest checkpoint that verifies with one warning
naming the file, or exit 2 with one line. Pruning counts only checkpoints that verify. A save
that hits a write error (a real file-size limit: EFBIG) ends in one line, exit 2, with its
temporary directory removed and ``latest`` and older checkpoints untouched."""

import json
import random
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from megatron_ext.checkpoint import manifest
from megatron_ext.checkpoint import store as ckpt
from megatron_ext.checkpoint.store import CheckpointError, find_resumable, verify
from tests.conftest import REPO, run_cli
from tests.forkrun import run_clis
from tests.resilience import env, small_args

STEPS = 6
ARGS = ("--set", "checkpoint.save_interval=2")


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """The module's two runs that need nothing before them, forked from one driver
    (tests.forkrun): ``saved`` and ``two_ranks`` below."""
    tmp = tmp_path_factory.mktemp("first")
    procs = run_clis([small_args(tmp / "saved", STEPS, *ARGS),
                      small_args(tmp / "two_ranks", 4, *TWO_RANK_ARGS)], tmp / "driver",
                     nprocs=[1, 2])
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp / "saved", tmp / "two_ranks"


@pytest.fixture(scope="module")
def saved(first_runs):
    """One run with complete checkpoints at steps 2, 4 and 6 (copied per test)."""
    return first_runs[0]


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "r")
    return tmp_path / "r"


@pytest.fixture
def root(run):
    return run / "ckpt"


def _garbage(path):
    """Overwrite with random bytes of the same size (a size check cannot see it)."""
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _shard(d):
    return sorted(d.glob("__*.distcp"))[0]


def _meta_edit(fn):
    def damage(d):
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(fn(meta)))
    return damage


def _set(meta, key, value):
    meta[key] = value
    return meta


def _lie_about_checksum(meta):
    entry = meta["files"]["__0_0.distcp"]
    entry["xxh3_128"] = "0" * 32
    return meta


DAMAGE = {  # damage to the newest checkpoint -> a fragment of the one warning line
    "shard missing": (lambda d: _shard(d).unlink(), "missing file __0_0.distcp"),
    "shard truncated": (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-10]),
                        "__0_0.distcp has"),
    "shard garbage": (lambda d: _garbage(_shard(d)), "__0_0.distcp does not match"),
    ".metadata garbage": (lambda d: _garbage(d / ".metadata"), ".metadata does not match"),
    "common.pt garbage": (lambda d: _garbage(d / "common.pt"), "common.pt does not match"),
    "rng garbage": (lambda d: _garbage(d / "rng/rank_00000.pt"),
                    "rng/rank_00000.pt does not match"),
    "config garbage": (lambda d: _garbage(d / "config.yaml"), "config.yaml does not match"),
    "config deleted": (lambda d: (d / "config.yaml").unlink(), "missing file config.yaml"),
    "extra file": (lambda d: (d / "__0_9.distcp").write_bytes(b"x"),
                   "unrecorded file __0_9.distcp"),
    "meta invalid json": (lambda d: (d / "meta.json").write_text("{not json"),
                          "meta.json is corrupt"),
    "meta binary": (lambda d: (d / "meta.json").write_bytes(bytes(range(256))),
                    "meta.json is corrupt"),
    "meta a list": (lambda d: (d / "meta.json").write_text("[1, 2]"), "a JSON list"),
    "meta deleted": (lambda d: (d / "meta.json").unlink(), "meta.json missing"),
    "meta size a string": (_meta_edit(lambda m: _set(m["files"], "common.pt", {
        "size": "2525", "xxh3_128": m["files"]["common.pt"]["xxh3_128"]}) and m),
        "entry of common.pt"),
    "meta step a string": (_meta_edit(lambda m: _set(m, "step", "6")), "step is '6'"),
    "meta step a bool": (_meta_edit(lambda m: _set(m, "step", True)), "step is True"),
    "meta files missing": (_meta_edit(lambda m: {k: v for k, v in m.items() if k != "files"}),
                           "files is missing"),
    "meta wrong step": (_meta_edit(lambda m: _set(m, "step", 5)), "records step 5"),
    "meta lying checksum": (_meta_edit(_lie_about_checksum), "__0_0.distcp does not match"),
    "meta missing entry": (_meta_edit(lambda m: m["files"].pop("__0_1.distcp") and m),
                           "unrecorded file __0_1.distcp"),
    "meta extra entry": (_meta_edit(lambda m: _set(m["files"], "__0_7.distcp", {
        "size": 1, "xxh3_128": "0" * 32}) and m), "missing file __0_7.distcp"),
    "meta rng not recorded": (_meta_edit(lambda m: m["files"].pop("rng/rank_00000.pt") and m),
                              "rng/rank_00000.pt is not recorded"),
    "meta world size huge": (_meta_edit(lambda m: _set(m["layout"], "world_size", 10**12)
                                        and m), "layout.world_size is 1000000000000"),
    "meta path escapes": (_meta_edit(lambda m: _set(m["files"], "../latest", {
        "size": 13, "xxh3_128": "0" * 32}) and m), "'../latest' not allowed"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_falls_back_with_one_warning_naming_the_file(root, case, capsys):
    damage, fragment = DAMAGE[case]
    damage(root / "iter_0000006")
    found, warnings = find_resumable(root)
    assert found.name == "iter_0000004"
    assert len(warnings) == 1 and fragment in warnings[0], warnings
    assert "iter_0000006" in warnings[0] and "\n" not in warnings[0]
    assert capsys.readouterr().err == ""  # no other output (a legacy/opt-out note, say)


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(256)) * 4, "not text"), (b"", "holds ''"), (b"/etc/passwd\n", "/etc/passwd"),
    (b"../../iter_0000006\n", "not a checkpoint name"), (b"iter_0000099", "does not exist"),
])
def test_garbage_latest_resumes_the_newest_with_one_warning(root, content, fragment):
    (root / "latest").write_bytes(content)
    found, warnings = find_resumable(root)
    assert found.name == "iter_0000006"
    assert len(warnings) == 1 and fragment in warnings[0] and "latest" in warnings[0]


def test_latest_naming_a_damaged_checkpoint_falls_back(root):
    (root / "latest").write_text("iter_0000004\n")
    _garbage(_shard(root / "iter_0000004"))
    found, warnings = find_resumable(root)
    assert found.name == "iter_0000006"  # the newest that verifies
    assert len(warnings) == 1 and "iter_0000004" in warnings[0] and "__0_0" in warnings[0]


def test_nothing_verifies_is_one_error(root):
    for d in root.glob("iter_*"):
        _garbage(d / "common.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
        find_resumable(root)
    assert str(e.value).count("common.pt does not match") == 3 and "\n" not in str(e.value)


def test_damage_after_a_verification_is_still_found(root):
    """What a process verified is not re-read while unchanged; a change is seen."""
    d = root / "iter_0000006"
    verify(d)
    _garbage(d / "rng/rank_00000.pt")
    with pytest.raises(CheckpointError, match="rank_00000.pt does not match"):
        verify(d)


def test_checksums_off_checks_sizes_only_with_one_warning(root, capsys):
    d = root / "iter_0000006"
    # Same size, still a valid config (verify checks the saved config), different content.
    size = (d / "config.yaml").stat().st_size
    (d / "config.yaml").write_bytes(b"train: {seed: 7}\n#" + b"y" * (size - 18))
    manifest._noticed.discard("off")
    with manifest.content_checks(False):
        verify(d)
        verify(root / "iter_0000004")
        assert find_resumable(root) == (d, [])
    assert capsys.readouterr().err.count("their content is not verified") == 1
    with pytest.raises(CheckpointError, match="config.yaml does not match"):
        verify(d)  # the default again
    (d / "common.pt").write_bytes(b"short")
    with pytest.raises(CheckpointError, match="common.pt has 5 bytes"):
        verify(d, checksums=False)


def test_checkpoint_without_checksums_loads_with_a_warning(root, capsys):
    """meta.json as written before checksums: sizes only, config.yaml not recorded."""
    d = root / "iter_0000006"
    meta = json.loads((d / "meta.json").read_text())
    del meta["format"], meta["checksum"]
    meta["files"] = {k: v["size"] for k, v in meta["files"].items() if k != "config.yaml"}
    (d / "meta.json").write_text(json.dumps(meta))
    manifest._noticed.discard("legacy")
    assert verify(d)["step"] == 6
    assert "written before checkpoint checksums" in capsys.readouterr().err
    (d / "metadata.json").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="metadata.json has 1 bytes"):
        verify(d)  # sizes are still checked


def test_prune_counts_only_checkpoints_that_verify(root):
    _garbage(_shard(root / "iter_0000004"))
    ckpt._prune(root, keep_last=2)
    # 4 is damaged: 6 and 2 are the two kept; 4, newer than 2, stays for inspection.
    assert sorted(p.name for p in root.glob("iter_*")) == [
        "iter_0000002", "iter_0000004", "iter_0000006"]
    _garbage(_shard(root / "iter_0000002"))
    ckpt._prune(root, keep_last=2)  # 6 and 4 ... 4 is damaged: only 6 verifies, nothing goes
    assert len(list(root.glob("iter_*"))) == 3
    ckpt._prune(root, keep_last=1)  # the damaged ones are older than the one kept
    assert [p.name for p in root.glob("iter_*")] == ["iter_0000006"]


def _prepare_save_after_damage(run):
    root = run / "ckpt"
    shutil.rmtree(root / "iter_0000006")
    (root / "latest").write_text("iter_0000004\n")
    _garbage(root / "iter_0000004" / "common.pt")
    return small_args(run, STEPS, "--set", "checkpoint.keep_last=2",
                      "--set", "checkpoint.save_interval=0")


def _prepare_nothing_verifies(run):
    for d in (run / "ckpt").glob("iter_*"):
        _garbage(d / "rng/rank_00000.pt")
    return small_args(run, STEPS, *ARGS)


def _prepare_converter(run):
    _meta_edit(_lie_about_checksum)(run / "ckpt" / "iter_0000006")
    args = ["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(run / "ckpt" / "iter_0000006"),
            "--skip-validation"]
    return ([*args, "--output", str(run / "refused")],
            [*args, "--output", str(run / "hf"), "--no-verify-checksums"])


@pytest.fixture(scope="module")
def cli_runs(saved, tmp_path_factory):
    """The CLI cases below, each on its own damaged copy of ``saved``, forked from one driver
    (tests.forkrun): one import of torch and megatron for the four runs."""
    tmp = tmp_path_factory.mktemp("cli_runs")
    runs = {}
    for name in ("save after damage", "nothing verifies", "converter"):
        shutil.copytree(saved, tmp / name)
        runs[name] = tmp / name
    calls = [_prepare_save_after_damage(runs["save after damage"]),
             _prepare_nothing_verifies(runs["nothing verifies"]),
             *_prepare_converter(runs["converter"])]
    procs = run_clis(calls, tmp / "driver")
    keys = ("save after damage", "nothing verifies", "converter refused", "converter sizes")
    return runs, dict(zip(keys, procs))


def test_cli_save_after_damage_keeps_the_good_older_checkpoint(cli_runs):
    """keep_last=2, checkpoints 2 and 4 on disk, 4 damaged; the run resumes from 2 and saves 6:
    2 must survive (4 does not count). One warning names the damaged file; no traceback."""
    root = cli_runs[0]["save after damage"] / "ckpt"
    proc = cli_runs[1]["save after damage"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING:")
                and "iter_0000004" in ln]
    assert len(warnings) == 1 and "common.pt does not match its checksum" in warnings[0]
    assert "Traceback" not in proc.stderr and "iter_0000002 at step 2" in proc.stdout
    assert (root / "latest").read_text().strip() == "iter_0000006"
    verify(root / "iter_0000002")
    verify(root / "iter_0000006")


def test_cli_nothing_verifies_exits_2_with_one_line(cli_runs):
    proc = cli_runs[1]["nothing verifies"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "no usable checkpoint" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_converter_verifies_its_input_unless_told_not_to(cli_runs):
    """meta.json lies about a shard's checksum: refused with one line (exit 2); with
    --no-verify-checksums only sizes are checked (one warning) and the conversion goes on."""
    proc = cli_runs[1]["converter refused"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "__0_0.distcp does not match its checksum" in lines[0], lines
    assert not list(cli_runs[0]["converter"].glob("*refused*"))
    proc = cli_runs[1]["converter sizes"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("content is not verified") == 1, proc.stderr[-3000:]
    assert (cli_runs[0]["converter"] / "hf" / "config.json").is_file()


def _run_with_file_size_limit(args, limit):
    """The real CLI with RLIMIT_FSIZE (SIGXFSZ ignored): writes past ``limit`` fail with EFBIG."""
    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), text=True,
                          capture_output=True, timeout=600, preexec_fn=limit_writes)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_save_failure_is_one_line_and_touches_nothing_else(run, mode):
    root = run / "ckpt"
    shutil.rmtree(root / "iter_0000006")  # as if the run had stopped at step 4
    (root / "latest").write_text("iter_0000004\n")
    extra = ("--set", "checkpoint.async_save=true") if mode == "async" else ()
    proc = _run_with_file_size_limit(small_args(run, STEPS, *ARGS, *extra), 1 << 20)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "encountered an error" not in proc.stderr  # megatron's writer log: ours says it
    assert "checkpoint save failed: File too large" in errors[0], errors[0]
    assert "iter_0000006" in errors[0], errors[0]
    assert not list(root.glob(".tmp_*")) and not (root / "iter_0000006").exists()
    assert (root / "latest").read_text().strip() == "iter_0000004"
    for d in ("iter_0000002", "iter_0000004"):
        verify(root / d)


@pytest.fixture
def small_disk(saved, tmp_path):
    """A copy of the run whose checkpoint.save is a real 10 MB tmpfs holding checkpoints 2 and 4
    (7.5 MB): the next one (3.7 MB) does not fit. Needs root (skipped otherwise)."""
    run = tmp_path / "r"
    shutil.copytree(saved, run, ignore=shutil.ignore_patterns("ckpt"))
    (run / "ckpt").mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(run / "ckpt")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        for d in ("iter_0000002", "iter_0000004"):
            shutil.copytree(saved / "ckpt" / d, run / "ckpt" / d)
        (run / "ckpt" / "latest").write_text("iter_0000004\n")
        yield run
    finally:
        subprocess.run(["umount", str(run / "ckpt")], check=True)


def test_full_disk_is_announced_then_one_line(small_disk):
    root = small_disk / "ckpt"
    proc = run_cli(small_args(small_disk, STEPS, *ARGS))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "will likely fail" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING:"), proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "encountered an error" not in proc.stderr  # megatron's writer log: ours says it
    assert "checkpoint save failed: No space left on device" in errors[0], errors[0]
    assert "iter_0000006" in errors[0] and "MB free" in errors[0], errors[0]
    assert not list(root.glob(".tmp_*")) and not (root / "iter_0000006").exists()
    assert (root / "latest").read_text().strip() == "iter_0000004"
    for d in ("iter_0000002", "iter_0000004"):
        verify(root / d)


TWO_RANK_ARGS = ("--set", "parallel.expert=2", "--set", "checkpoint.save_interval=2",
                 "--set", "checkpoint.async_save=true")


@pytest.fixture(scope="module")
def two_ranks(first_runs):
    """One 2-rank run (expert parallel, async saves) with checkpoints at steps 2 and 4, shared
    by the two tests below (each damages a copy): one launch, not three. Both ranks are
    forked from a driver (tests.forkrun), here and below, as torchrun would start them."""
    return first_runs[1]


@pytest.mark.slow
def test_async_two_rank_checksums_come_from_the_background_writers(two_ranks, tmp_path):
    shutil.copytree(two_ranks, tmp_path / "r")
    d = tmp_path / "r" / "ckpt" / "iter_0000004"
    files = verify(d)["files"]
    for rank in (0, 1):  # each rank's shards and rng file, recorded with a checksum
        assert any(f.startswith(f"__{rank}_") for f in files), files
        assert f"rng/rank_{rank:05d}.pt" in files
    assert not (d / manifest.SUMS_DIR).exists()
    rank1 = sorted(d.glob("__1_*.distcp"))[0]
    _garbage(rank1)
    with pytest.raises(CheckpointError, match=f"{rank1.name} does not match"):
        verify(d)


@pytest.mark.parametrize("content", [b"\xcd\xff binary", b"a: [unclosed",
                                     b"- a list\n- not sections\n",
                                     b"lr: 1\nlr: 2\n"], ids=["binary", "syntax", "list", "dupkey"])
def test_saved_config_that_does_not_parse_is_damage(root, content):
    """A config.yaml whose checksum matches (the manifest rewritten too) but which is not a
    mapping of sections: verify refuses it naming the file, so resume falls back to iter 4."""
    d = root / "iter_0000006"
    (d / "config.yaml").write_bytes(content)
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["config.yaml"] = manifest.file_sum(d / "config.yaml")
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.yaml"):
        verify(d)
    found, warnings = find_resumable(root)
    assert found == root / "iter_0000004"
    assert len(warnings) == 1 and "config.yaml" in warnings[0]


@pytest.mark.slow
def test_two_ranks_fall_back_together_on_rank0s_verdict(two_ranks, tmp_path):
    """Rank 0 alone reads the checksums (once per job, not once per rank) and every rank
    resumes the checkpoint it chose: a damaged shard of rank 1 in the newest checkpoint makes
    both ranks resume the older one, with one warning naming the shard."""
    shutil.copytree(two_ranks, tmp_path / "r")
    run = tmp_path / "r"
    newest = run / "ckpt" / "iter_0000004"
    shard = sorted(newest.glob("__1_*.distcp"))[0]
    _garbage(shard)
    second, = run_clis([small_args(run, 4, *TWO_RANK_ARGS)], tmp_path / "driver", nprocs=[2])
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resumed from {run / 'ckpt' / 'iter_0000002'} at step 2" in out
    warnings = [line for line in out.splitlines()
                if line.startswith("WARNING") and shard.name in line]
    assert len(warnings) == 1, out[-4000:]
    assert "Traceback" not in out
    verify(newest)  # re-saved whole at step 4
