"""compare_inits.py from an HF dense base, end to end (real subprocesses, a tiny model, two
steps): an HF directory as ``--dense`` (upcycled straight from safetensors), with the trainings
launched by torchrun on two processes (``--nproc-per-node 2``). The tool itself runs in this
process (its stages are still subprocesses): in_process of tests/compare_runs.py.

(The shortened comparison with every report check is in test_compare_inits.py, and so is btx,
from a dense base of ours; this runs in a file of its own so that the two pytest workers share
the load.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compare_runs import compare, in_process

pytestmark = pytest.mark.slow


def test_hf_dense_base_with_trainings_under_torchrun(hf_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = in_process(compare(out, "--nproc-per-node", "2", "--set", "train.micro_batch_size=4",
                           methods="naive", steps=2, dense=["--dense", str(hf_dense)]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = {s["name"]: s for s in json.loads((out / "stages.json").read_text())["stages"]}
    assert list(stages) == ["init/naive", "train/naive", "routing/naive"]
    assert stages["init/naive"]["command"][stages["init/naive"]["command"].index("--input") + 1] \
        == str(hf_dense)
    assert stages["train/naive"]["command"][:5] == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert stages["routing/naive"]["command"][:3] == ["python", "-m", "megatron_ext.cli.routing"]
    assert "world=2" in (out / "logs" / "train_naive.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["naive"]["final"]["cos_first"] > 0.98  # copies of the HF MLP
