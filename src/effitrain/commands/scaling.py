"""`effitrain scaling-fit`: a power law fitted to your own sweep, L(N) = E + A / N^alpha (and L(C) = E + A / C^gamma
over the compute frontier of every evaluation of every job), with standard errors, a prediction for the next size,
and a plot.

N is the non-embedding parameter count by default (Kaplan et al. 2020 find the cleaner law with it; `--params total`
for all parameters), counted from each job's saved config on the meta device. The loss of a job is its last
validation loss (metrics.jsonl). The fit is nonlinear least squares with numpy: for a fixed exponent the best E and A
are linear least squares, so the exponent is searched (grid, then golden section) on the profiled residual; the
standard errors come from the Jacobian at the optimum (s^2 (J^T J)^-1, s^2 = residual / (points - 3)), so they need
at least 4 points and are null with 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from effitrain.errors import UsageError


@dataclass
class PowerLaw:
    """L(x) = E + A / x^alpha, with standard errors (None without spare points)."""

    E: float
    A: float
    alpha: float
    E_err: float | None
    A_err: float | None
    alpha_err: float | None
    points: int
    rms_residual: float
    _cov: list | None = None  # covariance of (E, log A, alpha), for predictions

    def __call__(self, x: float) -> float:
        return self.E + self.A * x ** -self.alpha

    def predict(self, x: float) -> tuple[float, float | None]:
        """(L(x), its standard error by the delta method)."""
        if self._cov is None:
            return self(x), None
        grad = np.array([1.0, self.A * x ** -self.alpha, -self.A * x ** -self.alpha * math.log(x)])
        return self(x), float(math.sqrt(max(grad @ np.array(self._cov) @ grad, 0.0)))

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of y = E + A x^-alpha (x > 0; at least 3 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or len(set(x.tolist())) < 3:
        raise UsageError(f"a power law E + A/x^alpha has 3 unknowns: it needs at least 3 distinct sizes, got "
                         f"{len(set(x.tolist()))}")
    ref = math.exp(np.log(x).mean())  # fit in units of the geometric mean size: a well-conditioned problem
    u = x / ref

    def solve(alpha: float) -> tuple[float, float, float]:
        design = np.stack([np.ones_like(u), u ** -alpha], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        return float(((design @ [e, a] - y) ** 2).sum()), float(e), float(a)

    grid = np.linspace(0.01, 4.0, 400)
    best = min(grid, key=lambda al: solve(al)[0])
    lo, hi = max(best - 0.01, 1e-4), best + 0.01
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[0] < solve(m2)[0] else (m1, hi)
    alpha = (lo + hi) / 2
    sse, e, a_ref = solve(alpha)
    a = a_ref * ref**alpha  # back to the original units: A_ref u^-alpha = A x^-alpha
    dof = len(x) - 3
    cov = errors = None
    if dof > 0 and a_ref > 0:
        # Jacobian in (E, log A, alpha) at the optimum, in the original units
        jac = np.stack([np.ones_like(x), a * x ** -alpha, -a * x ** -alpha * np.log(x)], axis=1)
        try:
            cov = (sse / dof) * np.linalg.inv(jac.T @ jac)
            errors = [math.sqrt(max(cov[0, 0], 0)), a * math.sqrt(max(cov[1, 1], 0)), math.sqrt(max(cov[2, 2], 0))]
        except np.linalg.LinAlgError:
            cov = None
    return PowerLaw(E=e, A=a, alpha=alpha, E_err=errors[0] if errors else None, A_err=errors[1] if errors else None,
                    alpha_err=errors[2] if errors else None, points=len(x),
                    rms_residual=math.sqrt(sse / len(x)), _cov=cov.tolist() if cov is not None else None)


# ---------------------------------------------------------------- sweep directories


@dataclass
class Job:
    path: str
    params: int
    final_val_loss: float
    curve: list[tuple[float, float]]  # (training FLOPs so far, validation loss) at each evaluation


def read_job(job_dir: Path, *, params: str) -> Job | None:
    """A finished job: its parameter count (from its saved config, on the meta device), evaluations and FLOPs."""
    from effitrain.estimate import model_shape
    from effitrain.received import load_run_config
    from effitrain.runs import read_json, read_records

    metrics, env = job_dir / "metrics.jsonl", job_dir / "env.json"
    if not (metrics.is_file() and env.is_file()):
        return None
    cfg = load_run_config(job_dir, allow_external=True)  # read for the model's shape: nothing is launched
    vocab = read_json(env)["vocab_size"]
    shape = model_shape(cfg.model, vocab=vocab, seq_len=cfg.data.seq_len)
    n = shape.num_params if params == "total" else sum(
        p.numel for p in shape.params if p.kind not in ("embedding", "head", "position"))
    records = read_records(job_dir)
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.data.seq_len * _dp(cfg)
    curve = [(shape.flops_per_token * tokens_per_step * r["step"], r["val_loss"]) for r in records
             if r.get("val_loss") is not None]
    if not curve:
        return None
    return Job(path=str(job_dir), params=n, final_val_loss=curve[-1][1], curve=curve)


def _dp(cfg) -> int:
    from effitrain.launcher import world_size
    from effitrain.parallel import parallel_degrees

    return parallel_degrees(cfg.parallel, world_size=world_size(cfg.launcher)).dp


def sweep_jobs(sweep_dir: Path, *, params: str) -> list[Job]:
    if not sweep_dir.is_dir():
        raise UsageError(f"{sweep_dir} is not a directory (give a sweep directory: "
                         "outputs/multirun/<date>/<time>_<name>)")
    dirs = sorted((d for d in sweep_dir.iterdir() if (d / ".hydra" / "config.yaml").is_file()),
                  key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name))
    jobs = [j for j in (read_job(d, params=params) for d in dirs) if j is not None]
    if not jobs:
        raise UsageError(f"{sweep_dir} holds no finished jobs with validation losses (job directories with "
                         ".hydra/config.yaml, env.json and metrics.jsonl)")
    return jobs


def compute_frontier(jobs: list[Job]) -> list[tuple[float, float]]:
    """The lowest loss reached at each compute: evaluations no cheaper point beats."""
    points = sorted(p for j in jobs for p in j.curve)
    frontier, best = [], math.inf
    for c, loss in points:
        if loss < best:
            frontier.append((c, loss))
            best = loss
    return frontier


@dataclass
class ScalingFit:
    sweep: str
    params_counted: str
    jobs: list[dict]
    law_n: dict
    next_params: int
    next_prediction: float
    next_prediction_err: float | None
    law_c: dict | None
    check: dict | None
    plot: str | None


def scaling_fit(sweep_dir: Path, *, params: str = "non-embedding", check: Path | None = None,
                png: Path | None = None) -> ScalingFit:
    """Fit L(N) to the jobs of a sweep (and L(C) to its compute frontier), predict the next size, plot.

    Args:
        sweep_dir: outputs/multirun/<date>/<time>_<name>.
        params: 'non-embedding' or 'total' parameters as N.
        check: a held-out run directory: its size is predicted and the prediction's error reported.
        png: where to write the plot (default: sweep_dir/scaling_fit.png).
    """
    jobs = sweep_jobs(sweep_dir, params=params)
    law = fit_power_law([j.params for j in jobs], [j.final_val_loss for j in jobs])
    sizes = sorted({j.params for j in jobs})
    next_n = int(sizes[-1] * sizes[-1] / sizes[-2])  # the sweep's last size ratio, once more
    checked = None
    if check is not None:
        held = read_job(check, params=params)
        if held is None:
            raise UsageError(f"--check {check}: not a finished run with validation losses")
        next_n = held.params
        predicted, err = law.predict(held.params)
        checked = {"run": str(check), "params": held.params, "predicted": predicted, "predicted_err": err,
                   "measured": held.final_val_loss,
                   "error_pct": 100 * (predicted - held.final_val_loss) / held.final_val_loss}
    prediction, prediction_err = law.predict(next_n)
    frontier = compute_frontier(jobs)
    law_c = None
    if len({c for c, _ in frontier}) >= 3:
        try:
            law_c = fit_power_law([c for c, _ in frontier], [loss for _, loss in frontier]).as_dict()
        except UsageError:
            law_c = None
    out = png or sweep_dir / "scaling_fit.png"
    plot(jobs, law, out, next_n=next_n, prediction=(prediction, prediction_err), check=checked, params=params)
    return ScalingFit(sweep=str(sweep_dir), params_counted=params,
                      jobs=[{"run": j.path, "params": j.params, "final_val_loss": j.final_val_loss} for j in jobs],
                      law_n=law.as_dict(), next_params=next_n, next_prediction=prediction,
                      next_prediction_err=prediction_err, law_c=law_c, check=checked, plot=str(out))


def plot(jobs: list[Job], law: PowerLaw, path: Path, *, next_n: int, prediction, check, params: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [j.params for j in jobs]
    grid = np.geomspace(min(ns) / 1.5, max(max(ns), next_n) * 1.5, 200)
    ax.plot(grid, [law(n) for n in grid], "-", color="C0",
            label=f"fit: {law.E:.3f} + {law.A:.3g}/N^{law.alpha:.3f}")
    ax.plot(ns, [j.final_val_loss for j in jobs], "o", color="C0", label="sweep jobs")
    value, err = prediction
    ax.errorbar([next_n], [value], yerr=[err] if err else None, fmt="s", color="C1", capsize=4, label="prediction")
    if check is not None:
        ax.plot([check["params"]], [check["measured"]], "x", color="C3", markersize=10,
                label=f"held-out run ({check['error_pct']:+.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel(f"{params} parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_fit(f: ScalingFit) -> str:
    law = f.law_n
    pm = lambda v, e: f"{v:.4g}" + (f" +- {e:.2g}" if e is not None else " (no error: 3 points)")  # noqa: E731
    lines = [f"sweep {f.sweep}: {len(f.jobs)} jobs, N = {f.params_counted} parameters"]
    lines += [f"  N = {j['params']:>12,}  final val loss {j['final_val_loss']:.4f}  {j['run']}" for j in f.jobs]
    lines += [f"L(N) = E + A / N^alpha: E = {pm(law['E'], law['E_err'])}, A = {pm(law['A'], law['A_err'])}, "
              f"alpha = {pm(law['alpha'], law['alpha_err'])} (rms residual {law['rms_residual']:.4f})"]
    err = f" +- {f.next_prediction_err:.3f}" if f.next_prediction_err is not None else ""
    lines.append(f"predicted loss at N = {f.next_params:,}: {f.next_prediction:.4f}{err}")
    if f.check:
        c = f.check
        lines.append(f"held-out run {c['run']}: measured {c['measured']:.4f}, predicted {c['predicted']:.4f} "
                     f"(error {c['error_pct']:+.2f}%)")
    if f.law_c:
        lc = f.law_c
        lines.append(f"L(C) over the compute frontier ({lc['points']} evaluations): E = {pm(lc['E'], lc['E_err'])}, "
                     f"gamma = {pm(lc['alpha'], lc['alpha_err'])}")
    lines.append(f"plot: {f.plot}")
    return "\n".join(lines)
