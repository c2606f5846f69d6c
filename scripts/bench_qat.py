"""QAT vs post-training quantization at the same bits, as the int4 groups grow coarser (where rounding starts to hurt).

    python scripts/bench_qat.py [--steps 150] [--group-sizes 32,64] [--json bench_qat.json] [extra overrides ...]

The model, data and steps of bench_compression.py. One dense fp32 run; per int4 group size g: its model quantized
after training (PTQ: torchao's int4 weight-only config, groups of g inputs), and a qat-int4 run with
`group_size=g` fake-quantized from the middle of training (`start_step`: steps // 2), exported to real int4. The
validation loss of each exported model against the dense one's is the measure: QAT earns its cost where it ends
closer to dense than PTQ does. g = 64 is per-output-channel for every block Linear whose input is the hidden size
(64 here; down_proj's 256 inputs get four groups). Prints a table and writes JSON.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

from _effitrain_run import bench_parser, machine
from bench_compression import MODEL, export_bytes, train, val_loss


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], steps=150, json_default="bench_qat.json")
    parser.add_argument("--group-sizes", default="32,64", help="int4 group sizes, comma-separated")
    args = parser.parse_args()
    from effitrain.compression.qat import base_config, quantize

    steps, groups = args.steps, [int(g) for g in args.group_sizes.split(",")]
    base = [*MODEL, f"max_steps={steps}", f"eval_every={steps}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = train(base, tmp / "dense")
        dense_loss = val_loss(dense, dense.state.model)
        rows.append({"option": "dense fp32", "group_size": None, "val_loss": dense_loss,
                     "export_bytes": export_bytes(dense.state.model, tmp / "dense.pt")})
        for g in groups:
            ptq = quantize(copy.deepcopy(dense.state.model), base_config("int4", group_size=g))
            rows.append({"option": f"PTQ int4 g{g}", "group_size": g, "val_loss": val_loss(dense, ptq),
                         "export_bytes": export_bytes(ptq, tmp / f"ptq{g}.pt")})
            qat = train([*base, "compression=[qat-int4]", f"compression.qat_int4.group_size={g}",
                         f"compression.qat_int4.start_step={steps // 2}"], tmp / f"qat{g}")
            exported = qat.state.converters.export(copy.deepcopy(qat.state.model))
            rows.append({"option": f"QAT int4 g{g} from step {steps // 2}", "group_size": g,
                         "val_loss": val_loss(qat, exported), "export_bytes": export_bytes(exported, tmp / f"q{g}.pt")})
    for r in rows:
        r["gap_pct"] = 100.0 * (r["val_loss"] - dense_loss) / dense_loss
    print(f"\nQAT vs PTQ (int4 weight-only): {machine()}, {steps} steps, overrides {args.overrides or 'none'}\n")
    print("| option | exported val loss | gap vs dense | export bytes |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['option']} | {r['val_loss']:.4f} | {r['gap_pct']:+.2f}% | {r['export_bytes']:,} |")
    Path(args.json).write_text(json.dumps({"machine": machine(), "steps": steps, "overrides": args.overrides,
                                           "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
