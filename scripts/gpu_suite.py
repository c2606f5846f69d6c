"""Every check only a GPU can make, in one command, budgeted to finish in under 8 minutes on one H100.

    python scripts/gpu_suite.py [--out DIR] [--budget 470] [--only CASE,...] [--override KEY=VALUE ...]
    python scripts/gpu_suite.py --dry-run       # any machine, under 60 s: composes and checks every case, no training

Each case is one subprocess (an existing bench script with small step counts, `effitrain train`, or a worker of
this script), started in its own session and stopped with its whole process group when it runs past its own
budget or past what is left of the suite's (`--budget`, 470 s): it is then recorded as timed out and the suite
goes on. The case budgets (45-75 s each, 520 s on one GPU) add up to more than the suite's: they are upper bounds
set before any GPU ran the suite, and what a case leaves unused goes to the later ones. Cases (in run order):

  mfu-llama-1b-bf16            bench_mfu.py: llama-1b (seq 2048 x 8) in bf16, fused AdamW
  nccl-ddp/-fsdp/-tp/-fsdp-tp  `effitrain train` on every GPU present with NCCL (skipped, and said so, on 1 GPU)
  fp8-vs-bf16                  llama-20m 300 steps in fp8 (torchao float8 linears) and in bf16: the validation-loss gap
  estimate-vs-cuda             `effitrain estimate --json` against the run's torch.cuda.memory_stats peak
                               (summary.json's mem_active_peak_gib), two configs
  prune-2of4                   a prune-2of4 run, then its 2:4 pattern through torchao's semi-structured sparse
                               kernels (sparsify_ + semi_sparse_weight) vs the dense matmul: time and agreement
  checkpoint                   bench_checkpoint.py: sync vs async save/load timings (single; fsdp too on >= 2 GPUs)
  mfu-llama-1b-bf16-compile    bench_mfu.py: the same llama-1b with +experiment=fast-gpu (compiled)
  mfu-llama-1b-fp8-compile     bench_mfu.py: the same, precision=fp8
  peers                        bench_peers.py on CUDA: hand loop / effitrain / Trainer / fastest presets, 1 round

Writes DIR/gpu_suite.json (every case: status ok / failed / timed out / skipped, wall time, budget, its numbers,
the command) and DIR/gpu_suite.md (the same as a table); DIR is --out, else $OUT, else outputs/gpu-suite-<time>.
Each case's own files (its stdout/stderr, the bench JSON, run directories) are under DIR/<case>/.
Exit code: 0 when every case that ran passed (skips are fine), 1 otherwise, 2 on bad arguments.

--dry-run runs nothing on a GPU: every `effitrain train` override set a case would run is composed and checked
(compose + check_all, with device=cuda), the bench scripts' --help must list every flag and case name the suite
passes them, and the workers' imports are resolved. tests/test_gpu_suite.py runs it in CI, so a case cannot rot.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PY = sys.executable
TRAIN = [PY, "-m", "effitrain.cli", "train"]
BUDGET_S = 470.0  # the whole suite: under 8 minutes on one H100, start-up included

# the ~20M llama for the quick GPU runs: dims of 384/1024 are >= fp8_min_features (256) and multiples of 16, so
# every block Linear is fp8 under precision=fp8, and 2:4 masks apply to all of them
SMALL = ["model=llama-20m", "batch_size=16", "data.seq_len=512", "eval_batches=4", "logging.progress=false"]
LAYOUTS = ["ddp", "fsdp", "tp", "fsdp-tp"]
ESTIMATE_CONFIGS = {  # name -> overrides: a bf16 run without AC and an fp32 one with full AC
    "llama-150m-bf16-b8-s1024": ["model=llama-150m", "precision=bf16", "batch_size=8", "data.seq_len=1024"],
    "llama-150m-fp32-b8-s1024-ac": ["model=llama-150m", "precision=fp32", "batch_size=8", "data.seq_len=1024",
                                    "parallel.activation_checkpointing=full"],
}
PRUNE_SHAPE = (8192, 4096, 11008)  # tokens x in x out: a llama-7b MLP up-projection, where 2:4 kernels pay off


@dataclass
class Case:
    """One check: a subprocess with a budget, what its `effitrain train` runs compose to, and where its numbers are.

    Args:
        name: the case's name (its directory under the output dir).
        what: one line for the table.
        budget_s: its own time limit.
        argv: the command, given the case directory.
        train: the `effitrain train` override sets it runs (checked by --dry-run).
        script: (bench script, the flags and values the suite passes it) checked against its --help by --dry-run.
        numbers: reads the case's numbers from its directory after it ran.
        min_gpus: skipped below this many GPUs.
    """

    name: str
    what: str
    budget_s: float
    argv: callable
    train: list[list[str]] = field(default_factory=list)
    script: tuple[str, list[str]] | None = None
    numbers: callable = None
    min_gpus: int = 1


def cases(gpus: int, extra: list[str]) -> list[Case]:
    """Every case, for a machine with `gpus` GPUs (the multi-GPU layouts then use all of them, at least 2)."""
    bench_mfu = _load("bench_mfu")
    bench_checkpoint = _load("bench_checkpoint")
    out: list[Case] = []

    def mfu(case: str, budget: float) -> Case:
        flags = ["--cases", case, "--steps", "12", "--json"]
        steps = ["max_steps=12", "eval_every=12", "logging.warmup_steps=5"]  # what bench_mfu adds (its main())
        return Case(f"mfu-{case}", f"bench_mfu {case}, 12 steps (5 warm-up)", budget,
                    lambda d: [PY, str(SCRIPTS / "bench_mfu.py"), *flags, str(d / "mfu.json"), *extra],
                    train=[[*bench_mfu.CASES[case], *steps, *extra]], script=("bench_mfu.py", flags),
                    numbers=_mfu_numbers)

    out.append(mfu("llama-1b-bf16", 60))
    nproc = max(gpus, 2)
    for layout in LAYOUTS:
        def overrides(n: int, layout=layout) -> list[str]:
            # 8 heads of 64 (not llama-20m's 6): tensor parallel over 2, 4 or 8 GPUs divides them
            return [*SMALL, "model.hidden_size=512", "model.num_heads=8", "precision=bf16", f"parallel={layout}",
                    f"launcher.nproc_per_node={n}", "max_steps=20", "eval_every=20", "logging.warmup_steps=5",
                    "checkpoint=off", *extra]
        run = overrides(nproc)
        out.append(Case(f"nccl-{layout}", f"{layout} over {nproc} GPUs (NCCL), llama-20m d512 bf16, 20 steps", 45,
                        lambda d, o=run: [*TRAIN, *o, f"hydra.run.dir={d / 'run'}"],
                        train=[overrides(n) for n in sorted({nproc, 8})],  # 8 GPUs: 2 and 4 divide what it does
                        numbers=lambda d: _summary_numbers(d / "run"), min_gpus=2))
    pair = fp8_vs_bf16_runs(extra)
    out.append(Case("fp8-vs-bf16", "llama-20m 300 steps: fp8 vs bf16 validation loss", 70,
                    lambda d: [PY, __file__, "--worker", "fp8-vs-bf16", "--case-dir", str(d), *_passed(extra)],
                    train=list(pair.values()), numbers=_worker_numbers))
    out.append(Case("estimate-vs-cuda", "effitrain estimate vs torch.cuda.memory_stats peak, 2 configs", 60,
                    lambda d: [PY, __file__, "--worker", "estimate-vs-cuda", "--case-dir", str(d), *_passed(extra)],
                    train=[[*o, *ESTIMATE_STEPS, *extra] for o in ESTIMATE_CONFIGS.values()], numbers=_worker_numbers))
    out.append(Case("prune-2of4", "prune-2of4 run; its 2:4 pattern on torchao's sparse kernels vs dense", 45,
                    lambda d: [PY, __file__, "--worker", "prune-2of4", "--case-dir", str(d), *_passed(extra)],
                    train=[[*SMALL, *PRUNE_RUN, *extra]], numbers=_worker_numbers))
    layouts = ["single", "fsdp"] if gpus >= 2 else ["single"]
    flags = ["--steps", "6", "--every", "2", "--layouts", *layouts, "--json"]
    out.append(Case("checkpoint", f"bench_checkpoint {'/'.join(layouts)} sync+async, 6 steps, a save every 2", 60,
                    lambda d, flags=flags: [PY, str(SCRIPTS / "bench_checkpoint.py"), *flags,
                                            str(d / "checkpoint.json"), *extra],
                    train=[[*bench_checkpoint.BASE, *bench_checkpoint.LAYOUTS[layout], "max_steps=6",
                            "checkpoint.every=2", *extra] for layout in layouts],
                    script=("bench_checkpoint.py", flags), numbers=_checkpoint_numbers))
    out.append(mfu("llama-1b-bf16-compile", 75))
    out.append(mfu("llama-1b-fp8-compile", 75))
    flags = ["--rounds", "1", "--steps", "12", "--warmup", "4", "--out"]
    out.append(Case("peers", "bench_peers on CUDA: hand loop / effitrain / Trainer / presets, 1 round x 12 steps", 75,
                    lambda d, flags=flags: [PY, str(SCRIPTS / "bench_peers.py"), *flags, str(d / "peers")],
                    script=("bench_peers.py", flags), numbers=_peers_numbers))
    return out


# ---- workers: the cases that are more than one bench call (run as `gpu_suite.py --worker NAME --case-dir DIR`)

ESTIMATE_STEPS = ["max_steps=6", "eval_every=6", "eval_batches=1", "logging.warmup_steps=2", "checkpoint=off",
                  "logging.progress=false"]
PRUNE_RUN = ["compression=prune-2of4", "precision=bf16", "max_steps=30", "eval_every=30", "checkpoint=off"]


def fp8_vs_bf16_runs(extra: list[str]) -> dict[str, list[str]]:
    steps = ["max_steps=300", "eval_every=100", "logging.warmup_steps=10", "checkpoint=off"]
    return {p: [*SMALL, f"precision={p}", *steps, *extra] for p in ("bf16", "fp8")}


def worker(name: str, case_dir: Path, extra: list[str]) -> dict:
    if name == "fp8-vs-bf16":
        runs = {p: _train(o, case_dir / p) for p, o in fp8_vs_bf16_runs(extra).items()}
        bf16, fp8 = runs["bf16"]["final_val_loss"], runs["fp8"]["final_val_loss"]
        speed = runs["fp8"]["median_tokens_per_s_per_device"] / runs["bf16"]["median_tokens_per_s_per_device"]
        # fp8 learns as bf16 does: its validation loss after 300 steps within 2% of bf16's
        return {"bf16_val_loss": bf16, "fp8_val_loss": fp8, "fp8_rel_gap": (fp8 - bf16) / bf16,
                "fp8_over_bf16_tokens_per_s": speed, "ok": abs(fp8 - bf16) <= 0.02 * bf16}
    if name == "estimate-vs-cuda":
        rows = {}
        for key, overrides in ESTIMATE_CONFIGS.items():
            est = subprocess.run([PY, "-m", "effitrain.cli", "estimate", *overrides, *extra, "--json"],
                                 capture_output=True, text=True, check=True)
            estimated = json.loads(est.stdout)["peak_bytes"] / 2**30
            measured = _train([*overrides, *ESTIMATE_STEPS, *extra], case_dir / key)["mem_active_peak_gib"]
            rows[key] = {"estimated_gib": estimated, "measured_gib": measured,
                         "error_pct": 100 * (estimated - measured) / measured}
        return {"rows": rows, "ok": all(abs(r["error_pct"]) <= 10 for r in rows.values())}  # the CPU grid's bar
    if name == "prune-2of4":
        summary = _train([*SMALL, *PRUNE_RUN, *extra], case_dir / "run")
        return {"final_val_loss": summary["final_val_loss"], **_sparse_kernel()}
    raise SystemExit(f"unknown worker {name}")


def _sparse_kernel() -> dict:
    """A 2:4-masked bf16 Linear through torchao's semi-structured sparse kernels vs the same masked weight dense."""
    import torch
    from torchao.sparsity import semi_sparse_weight, sparsify_

    tokens, d_in, d_out = PRUNE_SHAPE
    torch.manual_seed(0)
    dense = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():  # keep the 2 largest of every 4 inputs: the pattern compression=prune-2of4 trains
        w = dense.weight.view(d_out, d_in // 4, 4)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, dim=-1).indices, True)
        dense.weight.mul_(keep.view(d_out, d_in))
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        reference = dense(x)
        dense_ms = _cuda_ms(lambda: dense(x))
        sparse = torch.nn.Sequential(dense)
        sparsify_(sparse, semi_sparse_weight())
        got = sparse(x)
        sparse_ms = _cuda_ms(lambda: sparse(x))
    error = ((got.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
    return {"shape": "x".join(map(str, PRUNE_SHAPE)), "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "max_rel_error": error, "ok": error < 1e-2}


def _cuda_ms(fn, repeats: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _train(overrides: list[str], run_dir: Path) -> dict:
    subprocess.run([*TRAIN, *overrides, f"hydra.run.dir={run_dir}"], check=True)
    return json.loads((run_dir / "summary.json").read_text())


# ---- numbers of each case, read from its directory

def _summary_numbers(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s.get(k) for k in ("median_tokens_per_s_per_device", "median_mfu_pct", "median_step_time_s",
                                  "mem_active_peak_gib", "final_loss", "final_val_loss")}


def _mfu_numbers(d: Path) -> dict:
    row = json.loads((d / "mfu.json").read_text())["rows"][0]
    return {k: row.get(k) for k in ("ok", "tokens_per_s_per_device", "tflops_per_device", "mfu_pct", "step_time_s",
                                    "mem_active_peak_gib", "warmup_time_s", "final_loss", "error")}


def _checkpoint_numbers(d: Path) -> dict:
    rows = json.loads((d / "checkpoint.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return {f"{r['layout']}-{r['kind']}": {k: r.get(k) for k in ("save_s", "stall_s", "load_s", "bytes")}
            for r in rows}


def _peers_numbers(d: Path) -> dict:
    report = json.loads((d / "peers" / "results.json").read_text())
    return {"ratios": {k: v["median"] for k, v in report["ratios"].items()}, "losses_agree": report["losses_agree"],
            "tokens_per_s": {v: r["median_tokens_per_s"] for v, r in report["variants"].items()}}


def _worker_numbers(d: Path) -> dict:
    return json.loads((d / "result.json").read_text())


# ---- the suite

def run_case(case: Case, case_dir: Path, *, budget_s: float) -> dict:
    case_dir.mkdir(parents=True, exist_ok=True)
    argv = case.argv(case_dir)
    row = {"case": case.name, "what": case.what, "budget_s": case.budget_s, "command": " ".join(argv)}
    limit = min(case.budget_s, budget_s)
    if limit < 5:
        return row | {"status": "timed out", "wall_s": 0.0, "error": "the suite's budget was spent before it"}
    t0 = time.perf_counter()
    with (case_dir / "stdout.txt").open("w") as out, (case_dir / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return row | {"status": "timed out", "wall_s": time.perf_counter() - t0,
                          "error": f"stopped after {limit:.0f} s"}
    row["wall_s"] = time.perf_counter() - t0
    try:
        numbers = case.numbers(case_dir) if case.numbers else {}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        numbers = {"unreadable": f"{type(e).__name__}: {e}"}
    ok = code == 0 and numbers.get("ok", True) is not False and "unreadable" not in numbers
    row |= {"status": "ok" if ok else "failed", "exit_code": code, "numbers": numbers}
    if not ok:
        row["error"] = (case_dir / "stderr.txt").read_text()[-1500:]
    return row


def _stop(proc: subprocess.Popen) -> None:
    """The case's whole process group (torchrun's workers, a bench's children): SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def dry_run(case: Case, help_texts: dict[str, str]) -> dict:
    """Compose and check every train override set of the case (device=cuda), and its flags against the script."""
    from effitrain.checks import check_all
    from effitrain.compose import compose_one
    from effitrain.errors import UsageError

    problems = []
    for overrides in case.train:
        try:
            check_all(compose_one([*overrides, "device=cuda"]))
        except (UsageError, ValueError, KeyError) as e:
            problems.append(f"{' '.join(overrides)}: {type(e).__name__}: {e}")
    if case.script:
        script, flags = case.script
        text = help_texts[script]
        # flags and names (case names, layouts) must be in its help; numbers are its argparse types' business
        problems += [f"{script} --help does not list {flag}" for flag in flags
                     if not flag.replace(".", "").isdigit() and flag not in text]
    if case.name == "prune-2of4":
        try:
            from torchao.sparsity import semi_sparse_weight, sparsify_  # noqa: F401
        except ImportError as e:
            problems.append(f"torchao's sparse kernels: {e}")
    status = "failed" if problems else "ok (dry run)"
    return {"case": case.name, "what": case.what, "budget_s": case.budget_s, "status": status,
            "composed": len(case.train), "min_gpus": case.min_gpus,
            **({"error": "; ".join(problems)} if problems else {})}


def write_report(out: Path, report: dict) -> None:
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    lines = [f"GPU suite {report['date']} on {report['machine']} ({report['gpus']} GPU(s)); "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget{' (dry run)' * report['dry_run']}", "",
             "| case | what | status | wall s / budget s | numbers |", "| --- | --- | --- | ---: | --- |"]
    for r in report["rows"]:
        numbers = json.dumps(r.get("numbers", {}), default=str)[:400] if r.get("numbers") else r.get("error", "")
        wall = f"{r.get('wall_s', 0):.0f} / {r['budget_s']:.0f}"
        lines.append(f"| {r['case']} | {r['what']} | {r['status']} | {wall} | {numbers.replace('|', '/')[:400]} |")
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: $OUT, else outputs/...)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (default 470)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra effitrain override for every case's runs (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="compose and check every case on any machine")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one multi-step case in this process
    parser.add_argument("--case-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget <= 0:
        return _refuse(f"--budget {args.budget:g} must be > 0 (seconds for the whole suite)")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        return _refuse(f"--override {bad[0]!r} is not KEY=VALUE (an effitrain override, e.g. data=text)")
    if args.worker:
        result = worker(args.worker, args.case_dir, args.override)
        (args.case_dir / "result.json").write_text(json.dumps(result, indent=2))
        return 0 if result.get("ok", True) else 1
    gpus = _gpus()
    chosen = cases(gpus, args.override)
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {c.name for c in chosen}]
        if unknown:
            known = ", ".join(c.name for c in chosen)
            return _refuse(f"--only: unknown case(s) {', '.join(unknown)}; choose from {known}")
        chosen = [c for c in chosen if c.name in names]
    out = args.out or Path(os.environ.get("OUT") or f"outputs/gpu-suite-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    if args.dry_run:
        scripts = {c.script[0] for c in chosen if c.script}
        help_texts = {s: subprocess.run([PY, str(SCRIPTS / s), "--help"], capture_output=True, text=True).stdout
                      for s in sorted(scripts)}
        rows = [dry_run(c, help_texts) for c in chosen]
    else:
        for case in chosen:
            if gpus < case.min_gpus:
                rows.append({"case": case.name, "what": case.what, "budget_s": case.budget_s, "status": "skipped",
                             "error": f"needs {case.min_gpus} GPUs, this machine has {gpus}"})
            else:
                rows.append(run_case(case, out / case.name, budget_s=args.budget - (time.perf_counter() - t0)))
            print(f"  {case.name}: {rows[-1]['status']} ({rows[-1].get('wall_s', 0):.0f} s)", file=sys.stderr,
                  flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(), "gpus": gpus,
              "budget_s": args.budget, "dry_run": args.dry_run, "wall_s": time.perf_counter() - t0,
              "overrides": args.override, "rows": rows}
    write_report(out, report)
    print((out / "gpu_suite.md").read_text())
    return 0 if all(r["status"] in ("ok", "ok (dry run)", "skipped") for r in rows) else 1


def _refuse(message: str) -> int:
    print(f"gpu_suite: {message}", file=sys.stderr)
    return 2


def _passed(extra: list[str]) -> list[str]:
    return [a for o in extra for a in ("--override", o)]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))  # the bench scripts import their shared _effitrain_run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def _gpus() -> int:
    if not Path("/proc/driver/nvidia/version").exists():
        return 0  # no driver: no GPU, and no torch import to find out
    import torch

    return torch.cuda.device_count()


def _machine() -> str:
    if _gpus() == 0:
        return "cpu"
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    sys.exit(main())
