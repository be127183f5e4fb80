"""The paper recipe on the real test cluster: ``sbatch scripts/slurm/8x152M.sh`` with a dense base
named by Hugging Face repo id, found offline in a local Hub cache, upcycles it (the recipe step)
and then trains from the upcycled weights; submitted again, it upcycles nothing and resumes.
The trained model then leaves as anyone takes it: exported with its tokenizer, loaded and
generated from by transformers' Auto classes, scored by moe-lm-eval with no extra flag.

The tiny shapes come from configs/tiny-cpu.yaml through the launcher's MOE_CONFIG, as in
test_sbatch.py; the dense base is a tiny Llama of that shape in HF_HOME's cache layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.forkrun import run_clis
from tests.slurm.test_sbatch import LOSS_LINE, _finished, _log, _submit
from tests.unit.test_recipe import REPO_ID, hub_cache, offline


def _recipe_job(cluster, tmp_path: Path, hf_home: Path) -> dict[str, str]:
    job, _ = _submit(
        cluster, tmp_path,
        "--set", f"upcycling.dense_base={REPO_ID}",
        "--set", f"checkpoint.load={tmp_path / 'upcycled'}",
        "--set", "train.train_steps=2", "--set", "train.log_interval=1",
        # One training process: the recipe step and the resume are the subject here; the
        # launcher's several ranks are test_sbatch.py's (each rank costs seconds of imports).
        env={**offline(hf_home), "GPUS_PER_NODE": "1"},
    )  # fmt: skip
    return cluster.wait_job(job, _finished, timeout=300, what="the recipe job to finish")


def test_sbatch_upcycles_the_hub_dense_base_then_trains_from_it(slurm_cluster, tmp_path):
    hf_home = tmp_path / "hf_home"
    snapshot = hub_cache(hf_home)
    upcycled = tmp_path / "upcycled"

    info = _recipe_job(slurm_cluster, tmp_path, hf_home)
    log = _log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    recorded = json.loads((upcycled / "upcycling.json").read_text())
    assert (recorded["input"], recorded["dense_base"]) == (str(snapshot), REPO_ID)
    # Upcycle step, then the training processes, which start from its output.
    wrote = log.index(f"moe-recipe: wrote {upcycled}")
    started = log.index(f"initial weights from {upcycled}")
    assert wrote < started < LOSS_LINE.search(log).start(), log
    assert (tmp_path / "ckpt" / "latest").is_file(), log

    # The same submission again (a requeue runs the same script): nothing is upcycled again.
    again = _log(_recipe_job(slurm_cluster, tmp_path, hf_home))
    assert "nothing to upcycle" in again, again
    assert "run already complete: step 2 of 2" in again, again  # resumed at its last step
    assert "moe-recipe: wrote" not in again, again

    _export_loads_generates_and_evaluates(tmp_path)


def _export_loads_generates_and_evaluates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    hf = tmp_path / "hf"
    # The export, then the evaluation of what it wrote, forked from one driver (one interpreter
    # start-up for both); offline from the start: the Hub reads it as it is imported.
    export, evaluate = run_clis(
        [["-m", "megatron_ext.cli.mcore_to_hf", "--input", str(tmp_path / "ckpt"), "--output",
          str(hf)],
         ["-m", "megatron_ext.cli.lm_eval", "--checkpoint", str(hf), "--tasks", "demo_en_mc",
          "--limit", "4", "--output", str(tmp_path / "eval")]],
        tmp_path / "forkrun", env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert export.returncode == 0 and "tokenizer: " in export.stdout, export.stderr[-3000:]
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = generate("To be, or not", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert any(k.startswith("acc") for k in results["results"]["demo_en_mc"]), results
