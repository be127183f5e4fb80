"""megatron_ext.cli.loss_curves: resumed runs keep the last record per step; bad input exits 2."""

import json

from megatron_ext.analysis.curves import ema, read_run
from tests.conftest import run_cli


def _write(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _train(step, loss):
    return {"kind": "train", "step": step, "tokens": 100 * step, "loss": loss}


def test_resumed_run_keeps_last_record_and_validation_tokens(tmp_path):
    _write(tmp_path / "a", [_train(1, 5.0), _train(2, 4.0), _train(2, 3.5),  # step 2 re-run
                            {"kind": "valid", "step": 2, "val_loss": 3.9}, _train(3, 3.0)])
    curve = read_run("a", tmp_path / "a")
    assert curve.train == [(100, 5.0), (200, 3.5), (300, 3.0)]
    assert curve.valid == [(200, 3.9)]
    assert ema([1.0, 3.0], 0.5) == [1.0, 2.0]


def test_cli_writes_plot_and_table(tmp_path):
    _write(tmp_path / "du", [_train(s, 6.0 - s) for s in range(1, 5)])
    _write(tmp_path / "nu", [_train(s, 6.5 - s) for s in range(1, 5)])
    proc = run_cli(["-m", "megatron_ext.cli.loss_curves", "--run", f"du={tmp_path / 'du'}",
                    "--run", f"nu={tmp_path / 'nu'}", "--output", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/loss_curves.png").stat().st_size > 1000
    table = (tmp_path / "out/loss_curves.md").read_text()
    assert "| du | 400 | 2.0000 |" in table and "| nu | 400 | 2.5000 |" in table


def test_cli_bad_input(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/metrics.jsonl").write_text("{not json\n")
    for args, msg in ((["--run", f"x={tmp_path / 'missing'}"], "metrics.jsonl not found"),
                      (["--run", "nolabel"], "expected LABEL=RUN_DIR"),
                      (["--run", f"b={tmp_path / 'broken'}"],
                       "metrics.jsonl has no training records (skipped 1 malformed line of 1; "
                       "first line 1: not JSON)")):
        proc = run_cli(["-m", "megatron_ext.cli.loss_curves", *args,
                        "--output", str(tmp_path / "o")])
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and msg in proc.stderr
        assert not (tmp_path / "o").exists()
