"""tools/bench/checkpoint_save.py runs both save modes end to end at a toy size."""

from tests.conftest import run_cli


def test_checkpoint_bench_reports_both_modes(tmp_path):
    proc = run_cli(["tools/bench/checkpoint_save.py", "--config", "configs/tiny-cpu.yaml",
                    "--saves", "1", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith(("| sync", "| async"))}
    assert set(rows) == {"sync", "async"}, proc.stdout
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[1]) >= 0 and float(cells[3]) > 0
    assert rows["sync"][2] == "-" and all(float(x) > 0 for x in rows["async"][2].split(","))
    for mode in ("sync", "async"):
        assert (tmp_path / mode / "ckpt" / "latest").is_file()


def test_missing_config_is_one_clear_line(tmp_path):
    proc = run_cli(["tools/bench/checkpoint_save.py", "--config", str(tmp_path / "nope.yaml")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config not found: {tmp_path / 'nope.yaml'}"
