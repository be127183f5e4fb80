"""Build the data files of the local lm-eval tasks (tasks/demo/data/*.jsonl) from data/corpus/.

    python tasks/build_local_tasks.py           # (re)write the files
    python tasks/build_local_tasks.py --check   # exit 1 if the shipped files differ from a rebuild

Deterministic: a fixed seed and the corpus alone decide every item, so the shipped files are
exactly what this script writes (``--check`` and tests/unit/test_lm_eval.py verify it).

* ``demo_en_mc``: a Shakespeare speech's speaker and first line; pick its true second line among
  4 (the other 3 are second lines of other speeches).
* ``demo_ja_mc``: the first sentence of a paragraph of Soseki's "I Am a Cat"; pick its true next
  sentence among 4 (the others are second sentences of other paragraphs).
* ``demo_en_gen``: a speaker and the first half of a line; generate the rest of the line
  (exact match).
* ``demo_en_ppl`` / ``demo_ja_ppl``: whole speeches / paragraphs scored by rolling
  loglikelihood (word and byte perplexity, bits per byte).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
OUT = Path(__file__).resolve().parent / "demo" / "data"
SEED = 1234
N_MC, N_GEN, N_PPL = 100, 50, 20


def speeches() -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every Shakespeare speech (blank-line-separated blocks)."""
    out = []
    for block in (CORPUS / "en_shakespeare.txt").read_text(encoding="utf-8").split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0], lines[1:]))
    return out


def paragraphs() -> list[list[str]]:
    """Sentences (each ending in 。) of every Soseki paragraph that has at least two."""
    out = []
    for line in (CORPUS / "ja_neko.txt").read_text(encoding="utf-8").splitlines():
        parts = [s + "。" for s in line.strip().strip("\u3000").split("。") if s.strip()]
        if line.strip().endswith("。") and len(parts) >= 2:
            out.append(parts)
    return out


def _mc_items(pairs: list[tuple[str, str]], rng: random.Random, n: int) -> list[dict]:
    """``n`` items from (context, true continuation) pairs; distractors from other pairs."""
    chosen = rng.sample(range(len(pairs)), n)
    items = []
    for i in chosen:
        context, answer = pairs[i]
        others = [pairs[j][1] for j in rng.sample(range(len(pairs)), 12)
                  if j != i and pairs[j][1] != answer]
        choices = [answer, *list(dict.fromkeys(others))[:3]]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def en_mc(rng: random.Random) -> list[dict]:
    pairs = [(f"{speaker}\n{lines[0]}\n", lines[1]) for speaker, lines in speeches()
             if len(lines) >= 2 and all(20 <= len(x) <= 80 for x in lines[:2])]
    return _mc_items(pairs, rng, N_MC)


def ja_mc(rng: random.Random) -> list[dict]:
    pairs = [(p[0], p[1]) for p in paragraphs() if all(8 <= len(s) <= 60 for s in p[:2])]
    return _mc_items(pairs, rng, N_MC)


def en_gen(rng: random.Random) -> list[dict]:
    cands = [(speaker, line) for speaker, lines in speeches() for line in lines[:1]
             if 30 <= len(line) <= 70 and len(line.split()) >= 6]
    items = []
    for speaker, line in rng.sample(cands, N_GEN):
        words = line.split()
        half = len(words) // 2
        items.append({"context": f"{speaker}\n{' '.join(words[:half])}",
                      "target": " " + " ".join(words[half:])})
    return items


def en_ppl(rng: random.Random) -> list[dict]:
    docs = [f"{s}\n" + "\n".join(lines) for s, lines in speeches() if 200 <= len(lines) * 40 <= 600]
    return [{"text": t} for t in rng.sample(docs, N_PPL)]


def ja_ppl(rng: random.Random) -> list[dict]:
    docs = ["".join(p) for p in paragraphs() if 100 <= len("".join(p)) <= 400]
    return [{"text": t} for t in rng.sample(docs, N_PPL)]


BUILDERS = {"demo_en_mc": en_mc, "demo_ja_mc": ja_mc, "demo_en_gen": en_gen,
            "demo_en_ppl": en_ppl, "demo_ja_ppl": ja_ppl}


def render() -> dict[str, str]:
    """File name -> JSONL text of every task (each task its own seeded generator)."""
    out = {}
    for name, build in BUILDERS.items():
        rows = build(random.Random(f"{SEED}:{name}"))
        out[f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped files only")
    args = p.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (OUT / n).is_file() or (OUT / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"error: {', '.join(stale)} in {OUT} differ from a rebuild "
                  "(run tasks/build_local_tasks.py)", file=sys.stderr)
            return 1
        print(f"ok: {len(files)} task files match")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}: {text.count(chr(10))} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
