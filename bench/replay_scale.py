"""Replay at scale: tokenizing a multi-hundred-MB replay corpus, chunking long documents, .txt rows.

    python bench/replay_scale.py                          # this checkout
    python bench/replay_scale.py --src /tmp/old/src       # another checkout's src/ (before/after)
    python bench/replay_scale.py --mb 300 --num-proc 2

1. `python -m fulltune.data.inspect data.replay.0.path=CORPUS data.max_length=1024` on a generated
   jsonl corpus of long documents (`fulltune.data.demo.write_corpus`, kept under .cache/bench/),
   into a fresh token cache: wall time and peak RSS of the whole command.
2. The corpus's first 300 documents at max_length 256 with the default length policy: how many documents are
   cut and how many of their tokens reach training.
3. A .txt file of 30 articles, one per line: how many rows it becomes.
Prints a markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SMALL_CASES = """
import itertools, json, sys
from pathlib import Path
from fulltune.data import FineTuneDataModule
from fulltune.data.formats import encode_batch, make_renderer
from fulltune.models import load_tokenizer
from hydra import compose, initialize_config_dir
from fulltune.preflight import CONF_DIR
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["paths.root_dir=" + sys.argv[2]])
tok = load_tokenizer(cfg.model)
tmp = Path(sys.argv[1])
with open(sys.argv[3]) as f:
    docs = [json.loads(line)["text"] for line in itertools.islice(f, 300)]
(tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\\n" for d in docs))
(tmp / "wiki.txt").write_text("".join(" ".join(d.split()) + "\\n" for d in docs[:30]))
render = make_renderer({"format": "text"}, tok, False)
full = sum(len(e.ids) for e in encode_batch([render({"text": d}) for d in docs], tok))
out = {}
for name, path in (("docs", "docs.jsonl"), ("wiki", "wiki.txt")):
    dm = FineTuneDataModule(tok, task=[{"name": name, "path": str(tmp / path), "format": "text"}], max_length=256,
                            cache_dir=str(tmp / "cache"))
    dm.setup()
    s = dm.stats["sources"][name]
    out[name] = {"rows": s["rows"], "examples": s["examples"], "truncated": s["truncated"],
                 "tokens": int(sum(len(st.tokens) for st in dm._load_stores().values()))}
out["docs"]["document_tokens"] = full
print(json.dumps(out))
"""


def cpu_seconds() -> float:
    """User + system CPU of the finished children (the tokenizer runs on both cores)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) of the child, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(REPO / "src"), help="the src/ dir whose fulltune to measure")
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench/replay_scale.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from fulltune.data.demo import write_corpus

    corpus = REPO / ".cache" / "bench" / f"replay_{args.mb:g}mb.jsonl"
    if not corpus.exists():
        print(f"generating {corpus} ...", flush=True)
        write_corpus(corpus.with_suffix(".tmp"), args.mb).rename(corpus)
    with open(corpus) as f:
        documents = sum(1 for _ in f)
    env = {**os.environ, "PYTHONPATH": args.src}
    results: dict = {"src": args.src, "corpus": str(corpus), "corpus_mb": corpus.stat().st_size / 1e6,
                     "documents": documents, "num_proc": args.num_proc, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peak_gb, _ = run([sys.executable, "-m", "fulltune.data.inspect", f"data.replay.0.path={corpus}",
                                   "data.max_length=1024", f"data.num_proc={args.num_proc}",
                                   f"data.cache_dir={tmp}/cache"], env)
        results |= {"inspect_seconds": round(seconds, 1), "inspect_peak_rss_gb": round(peak_gb, 2),
                    "inspect_cpu_seconds": round(cpu_seconds(), 1)}
        _, _, out = run([sys.executable, "-c", SMALL_CASES, tmp, str(REPO), str(corpus)], env)
        results |= json.loads(out.splitlines()[-1])
    docs, wiki = results["docs"], results["wiki"]
    print(f"| corpus | {results['corpus_mb']:.0f} MB jsonl, {documents:,} documents |")
    print(f"| inspect, max_length 1024, num_proc {args.num_proc}: wall, peak RSS | "
          f"{results['inspect_seconds']} s ({results['inspect_cpu_seconds']} s CPU), "
          f"{results['inspect_peak_rss_gb']} GB |")
    print(f"| 300 documents at max_length 256: documents cut, examples, tokens trained / in the documents | "
          f"{docs['truncated']}, {docs['examples']}, {docs['tokens']:,} / {docs['document_tokens']:,} |")
    print(f"| .txt of 30 articles, one per line: rows | {wiki['rows']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
