"""What deciding a resume reads, per rank, at 1, 2, 4 and 8 gloo processes on one machine.

1. Unless ``--root`` already holds one, saves a checkpoint with ``pretrain_moe.py`` (mock data,
   1 step, ``MODEL``: ~280 MB with the optimizer state) from ``--save-world`` processes (each
   writes its own shards and rng file, as a job's ranks do). With more than one, the optimizer
   state is sharded over them (``parallel.distributed_optimizer``, on by default on GPUs) in
   the dp_reshardable format (``checkpoint.fully_reshardable_optimizer=false``), so each rank
   writes its share of the files (8 ranks: 16 shard files, ~378 MB). Otherwise rank 0 writes
   every tensor: a replica in plain DP, and, on gloo, the fully reshardable optimizer state too.
2. For each world size, spawns that many gloo processes which decide the resume of ``--root``
   the way a job's ranks do before megatron loads the tensors, and reports, per rank, the bytes
   passed to ``read()`` (``/proc/self/io`` rchar: load-independent, page cache or not) and the
   seconds (barrier to barrier; on a loaded machine the noisy part).

The same script measures either code base, found through ``PYTHONPATH``: the one before issue
26 (``store.find_resumable_shared`` then ``store._verify_shared``, what ``session`` and
``store.load`` ran) and the one after (``plan.find_shared``: what ``plan.make_plan`` runs). The
tensor load that follows (megatron reads each rank's shards) is the same code in both and is
not included. Prints one JSON line per world size.

    python tools/bench/resume_reads.py --root /tmp/resume_bench/ckpt --worlds 1 2 4 8
    python tools/bench/resume_reads.py --root /tmp/rb8/ckpt --save-world 8 --worlds 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
MODEL = ["model.num_layers=4", "model.hidden_size=384", "model.ffn_hidden_size=1024",
         "model.num_attention_heads=6", "model.vocab_size=4096", "moe.num_experts=4"]


def _save(root: Path, world: int) -> None:
    args = ["--config", "configs/tiny-cpu.yaml"]
    for s in [*MODEL, "data.demo_corpus=false", "data.mock=true", "data.seq_length=64",
              f"train.global_batch_size={2 * world}", "train.micro_batch_size=2",
              "train.train_steps=1",
              "schedule.warmup_steps=0", "train.eval_interval=0", f"checkpoint.save={root}",
              f"logging.output_dir={root.parent / 'run'}",
              f"parallel.distributed_optimizer={str(world > 1).lower()}",
              f"checkpoint.fully_reshardable_optimizer={str(world == 1).lower()}"]:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = ([] if world == 1 else
              ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"])
    subprocess.run([sys.executable, *launch, "pretrain_moe.py", *args], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _decide(root: Path) -> str:
    from megatron_ext.checkpoint import store

    if hasattr(store, "find_resumable_shared"):  # before: what session + store.load ran
        path, _ = store.find_resumable_shared(root)
        store._verify_shared(path, None)
        return str(path)
    from megatron_ext.checkpoint import plan  # after: the plan's verification

    path, _, _ = plan.find_shared(root, True)
    return str(path)


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_ext.checkpoint import store  # noqa: F401 (imported before the clock starts)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dist.barrier()
    r0, t0 = _rchar(), time.perf_counter()
    chosen = _decide(Path(root))
    dist.barrier()
    seconds, read = time.perf_counter() - t0, _rchar() - r0
    every: list = [None] * world
    dist.all_gather_object(every, (read, seconds, chosen))
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="checkpoint.save root (made if absent)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--save-world", type=int, default=1,
                   help="processes that save the checkpoint (its shard and rng files)")
    a = p.parse_args()
    if not (a.root / "latest").is_file():
        _save(a.root, a.save_world)
    from megatron_ext.platform.launch import free_port

    size = sum(f.stat().st_size for f in (a.root / (a.root / "latest").read_text().strip()
                                          ).rglob("*") if f.is_file())
    for world in a.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "result.json")
            mp.spawn(_worker, args=(world, free_port(), str(a.root), str(out)), nprocs=world)
            ranks = json.loads(out.read_text())
        print(json.dumps({"world": world, "checkpoint_bytes": size,
                          "read_bytes_per_rank": [r[0] for r in ranks],
                          "seconds": round(max(r[1] for r in ranks), 3),
                          "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
