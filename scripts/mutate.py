#!/usr/bin/env python3
"""Mutation check of the test suite (not part of CI): break one line, see whether the tests notice.

Each mutation below replaces one exact snippet of the package with a plausible bug and names the
test files expected to catch it. For every mutation the repository is copied to a scratch folder
(beside a link to ``../shared``, so the golden fixtures are found as in a checkout), the snippet is
replaced there, and only those test files run (``pytest -x -q``). A failing run means the mutation
was caught; a green run means it survived, i.e. a hole in the tests. The real tree is never
written. A baseline run of every named file on an unmutated copy comes first: a red baseline makes
the table meaningless and stops the script.

    python scripts/mutate.py                    # all mutations, a markdown table on stdout
    python scripts/mutate.py label_shift rope_sign   # some of them
    python scripts/mutate.py --list

    python scripts/mutate.py --tree ../main     # mutate another checkout (copied, never written)

With ``--tree``, test files that checkout lacks are left out; a mutation with none left counts as
survived. CPU-heavy (the golden model tests are among the targets): run it alone, e.g. under
``flock /tmp/dsvl2-big.lock``. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "out", "runs")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file inside the repository
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, optionally with -k filters
    what: str


MUTATIONS = (
    Mutation("label_shift", "dsvl2/training/loop.py", "labels = batch.labels[:, 1:]",
             "labels = batch.labels[:, :-1]", ("tests/test_training_objective.py", "tests/test_training_stages.py"),
             "the loss predicts the current token instead of the next"),
    Mutation("loss_world_factor", "dsvl2/training/loop.py",
             "return ce_sum * world / max(global_tokens, 1) + aux", "return ce_sum / max(global_tokens, 1) + aux",
             ("tests/test_training_objective.py",), "per-process losses not rescaled for gradient averaging"),
    Mutation("packed_bos_label", "dsvl2/training/data.py", "lab[0] = IGNORE_INDEX  # never",
             "pass  # never", ("tests/test_training_objective.py", "tests/test_training_data.py"),
             "a packed sample's BOS is predicted from the previous sample"),
    Mutation("block_mask_leak", "dsvl2/training/data.py", "return (same & causal)[:, None]",
             "return causal.expand_as(same)[:, None]",
             ("tests/test_training_objective.py", "tests/test_training_stages.py"),
             "packed samples attend to each other"),
    Mutation("balance_loss_norm", "dsvl2/model/moe.py", "ce = counts / (n.unsqueeze(1) * k / e)",
             "ce = counts / (n.unsqueeze(1) * k)", ("tests/test_training_objective.py", "tests/test_training_stages.py"),
             "balance loss without the E/(T*k) normaliser"),
    Mutation("balance_loss_batch_sum", "dsvl2/model/moe.py", "(ce * (weighted.sum(dim=1) / n.unsqueeze(1))).sum(dim=1).mean()",
             "(ce * (weighted.sum(dim=1) / n.unsqueeze(1))).sum(dim=1).sum()",
             ("tests/test_training_objective.py", "tests/test_training_stages.py"),
             "balance loss summed instead of averaged over sequences"),
    Mutation("local_newline_fp32", "dsvl2/model/vlm.py",
             "local = torch.cat([local, self.image_newline.view(1, 1, d)",
             "local = torch.cat([local, torch.zeros_like(self.image_newline).view(1, 1, d)",
             ("tests/test_golden_model.py", "-k", "fp32"), "local-canvas newline embedding dropped (fp32 tests)"),
    Mutation("local_newline_bf16", "dsvl2/model/vlm.py",
             "local = torch.cat([local, self.image_newline.view(1, 1, d)",
             "local = torch.cat([local, torch.zeros_like(self.image_newline).view(1, 1, d)",
             ("tests/test_golden_model.py", "-k", "bf16"), "local-canvas newline embedding dropped (bf16 tests only)"),
    Mutation("rope_sign", "dsvl2/model/layers.py", "return (x * cos) + (rotate_half(x) * sin)",
             "return (x * cos) - (rotate_half(x) * sin)", ("tests/test_reference.py", "tests/test_golden_model.py"),
             "RoPE rotates the other way"),
    Mutation("moe_top_k", "dsvl2/model/moe.py", "self.top_k = cfg.num_experts_per_tok",
             "self.top_k = max(1, cfg.num_experts_per_tok - 1)", ("tests/test_reference.py", "tests/test_golden_model.py"),
             "one routed expert fewer per token"),
    Mutation("repetition_penalty_sign", "dsvl2/generation/sampling.py",
             "torch.where(logits < 0, logits * penalty, logits / penalty)",
             "torch.where(logits < 0, logits / penalty, logits * penalty)", ("tests/test_generation.py",),
             "repetition penalty rewards repeats"),
    Mutation("anls_threshold", "dsvl2/evaluation/metrics.py", "str] | str, threshold: float = 0.5)",
             "str] | str, threshold: float = 0.4)",
             ("tests/test_metrics.py",), "ANLS keeps similarities in [0.4, 0.5)"),
    Mutation("stats_norms", "dsvl2/stats.py", "norms=layers * 2 * d + d", "norms=layers * 2 * d",
             ("tests/test_stats.py",), "the final RMSNorm is not counted"),
    Mutation("stats_activated_experts", "dsvl2/stats.py",
             "activated_routed=moe_layers * (lc.num_experts_per_tok or 0) * expert",
             "activated_routed=moe_layers * (lc.n_shared_experts or 0) * expert", ("tests/test_stats.py",),
             "activated parameters count the shared-expert count of routed experts"),
)


def copy_tree(tree: Path, scratch: Path) -> Path:
    """``tree`` copied to ``scratch/repo`` with ``scratch/shared`` -> the real ``tree/../shared``."""
    repo = scratch / "repo"
    shutil.copytree(tree, repo, ignore=SKIP, symlinks=True)
    shared = tree.parent / "shared"
    if shared.is_dir():
        (scratch / "shared").symlink_to(shared.resolve())
    return repo


def run_tests(repo: Path, args: tuple[str, ...], python: str) -> tuple[int, str, float]:
    """(exit code, first failing test or error line, seconds) of ``pytest -x -q args`` in ``repo``."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = (proc.stdout + proc.stderr).splitlines()
    first = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    return proc.returncode, first[:110], seconds


def check_imports_copy(repo: Path, python: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo))
    where = subprocess.run([python, "-c", "import dsvl2; print(dsvl2.__file__)"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(repo.resolve()):
        sys.exit(f"the copy imports dsvl2 from {where}, not from {repo}: results would be meaningless")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="interpreter with the test deps")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to mutate (default: this one)")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.path}: {m.what}  [{' '.join(m.tests)}]")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTATIONS)
    tree = args.tree.resolve()

    def present(tests: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t for t in tests if not t.startswith("tests/") or (tree / t).is_file())
    with tempfile.TemporaryDirectory(prefix="dsvl2-mutate-") as tmp:
        scratch = Path(tmp)
        if not args.no_baseline:
            repo = copy_tree(tree, scratch / "baseline")
            check_imports_copy(repo, args.python)
            files = sorted({t for m in chosen for t in present(m.tests) if t.startswith("tests/")})
            rc, first, seconds = run_tests(repo, tuple(files), args.python)
            print(f"baseline: {len(files)} test files, exit {rc}, {seconds:.0f} s", flush=True)
            if rc != 0:
                print(f"the unmutated tests fail ({first}); fix that first", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            repo = copy_tree(tree, scratch / m.name)
            target = repo / m.path
            text = target.read_text()
            tests = present(m.tests)
            if text.count(m.old) != 1:
                rows.append((m, "STALE (snippet not found once)", 0.0, ""))
                continue
            if not any(t.startswith("tests/") for t in tests):
                rows.append((m, "SURVIVED (none of its test files exist)", 0.0, ""))
                continue
            target.write_text(text.replace(m.old, m.new))
            rc, first, seconds = run_tests(repo, tests, args.python)
            verdict = "caught" if rc == 1 else ("SURVIVED" if rc == 0 else f"caught (exit {rc})")
            rows.append((m, verdict, seconds, first if rc else ""))
            print(f"{m.name}: {verdict} in {seconds:.0f} s", file=sys.stderr, flush=True)
            shutil.rmtree(scratch / m.name)
    print("\n| mutation | file | tests run (-x) | result | s | first failure |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, verdict, seconds, first in rows:
        print(f"| {m.name} | {m.path} | {' '.join(t.removeprefix('tests/') for t in m.tests)} | {verdict} "
              f"| {seconds:.0f} | {first.replace('|', '/')} |")
    caught = sum(verdict.startswith("caught") for _, verdict, _, _ in rows)
    print(f"\n{caught} of {len(rows)} caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
