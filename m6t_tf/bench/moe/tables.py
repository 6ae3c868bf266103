"""The MoE benchmark's markdown tables (the JSON report is the tool's docstring)."""

from __future__ import annotations

from m6t_tf.bench.moe import dropless


def _fmt_ratio(v):
  return "—" if v is None else f"{v:.3f}"


def table(report) -> str:
  """The layer suite's report: machine, shapes, peers, results, scaling fit, targets."""
  m = report["machine"]
  out = [f"MoE layer benchmark: forward+backward, float32, tf.function; ratios = median over "
         f"{report['repeats']} interleaved rounds of (time / baseline time) in one process.",
         f"Machine: {m['nproc']} x {m['cpu_model']}; load average at start "
         f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}; "
         f"TF {m['tensorflow']}, Keras {m['keras']}.", ""]
  for name, s in report["shape"].items():
    out.append(f"Shape {name}: E={s['E']} (D={s['D']}, e={s['e']}), M={s['M']}, I={s['I']}, "
               f"T={s['T']} (B={s['B']} x L={s['L']}), gamma={s['gamma']}")
  out.append("")
  for peer, st in report["peers"].items():
    out.append(f"Peer {peer}: " + (f"{st['version']} via {st['how']}" if st["available"]
                                   else f"NOT AVAILABLE — {st['reason']}"))
  out += ["",
          "| group | variant | shape | T | median ms | ratio | baseline | tokens/s | peak MiB |",
          "|---|---|---|---:|---:|---:|---|---:|---:|"]
  for r in report["results"]:
    peak = r.get("peak_bytes")
    out.append(f"| {r['name']} | {r['variant']} | {r['shape']} | {r['tokens']} | "
               f"{r['median_s'] * 1e3:.1f} | {r['ratio_to_baseline']:.3f} | {r['baseline']} | "
               f"{r['tokens_per_s']:.0f} | {'' if peak is None else f'{peak / 2**20:.0f}'} |")
  if report["scaling_fit"]:
    out.append("")
    for d, f in report["scaling_fit"].items():
      out.append(f"Scaling {d}: log-log slope of time ratio vs T = {f['slope']:.3f} over "
                 f"T={f['tokens']} (last doubling {f['slope_last_doubling']:.3f}; on absolute "
                 f"medians {f['slope_abs_medians']:.3f})")
  if report["skipped"]:
    out.append("")
    for s in report["skipped"]:
      out.append(f"Skipped {s['name']} {s['variant']} [{s['shape']}]: {s['reason']}")
  out += ["", "| target | measured | threshold | holds |", "|---|---:|---:|---|"]
  for t in report["targets"]:
    holds = ("yes" if t["holds"] else "NO") if t["evaluated"] else f"n/a ({t['note']})"
    out.append(f"| {t['name']} | {_fmt_ratio(t['measured'])} | {t['comparison']} "
               f"{t['threshold']} | {holds} |")
  return "\n".join(out)


def dropless_table(report) -> str:
  """The dropless suite's report: `table`, then routing statistics and the all-to-all summary."""
  out = [table(report), ""]
  seen = set()
  out += ["| group | variant | shape | rows computed | dropped fraction | load cv |",
          "|---|---|---|---:|---:|---:|"]
  for r in report["results"]:
    key = (r["name"], r["variant"], r["shape"])
    if "dropped_fraction" not in r or key in seen:
      continue
    seen.add(key)
    out.append(f"| {r['name']} | {r['variant']} | {r['shape']} | {r.get('rows_computed', '')} | "
               f"{r['dropped_fraction']:.4f} | "
               f"{'' if r.get('load_cv') is None else format(r['load_cv'], '.3f')} |")
  for routing, s in report.get("alltoall", {}).items():
    b = s["bytes"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"
    out += ["", f"2-rank all-to-all, {routing} routing (ratios: median over rounds, rank 0):",
            f"  all-to-all share of the layer step: capacity {fmt(s['share_capacity'])}, "
            f"dropless variable {fmt(s['share_variable'])}, dropless padded "
            f"{fmt(s['share_padded'])}",
            f"  layer step / dropless variable: capacity {fmt(s['step_capacity_over_variable'])}, "
            f"padded {fmt(s['step_padded_over_variable'])}; all-to-alls alone, padded / "
            f"variable {fmt(s['alone_padded_over_variable'])}"]
    for v in ("capacity", "variable", "padded"):
      per_rank = ", ".join(f"{p['bytes'] / 2**20:.1f}" for p in b[v].get("per_rank", [b[v]]))
      remote = ", ".join(f"{p['remote_bytes'] / 2**20:.1f}"
                         for p in b[v].get("per_rank", [b[v]]))
      out.append(f"  {v}: MiB handed to all-to-all per step (forward+backward) by rank: "
                 f"{per_rank}; to the other rank: {remote}"
                 + (f"; Cmax {b[v]['cmax']}" if "cmax" in b[v] else ""))
    ratio = s["step_padded_over_variable"]
    clear = dropless.A2A_CLEAR
    if ratio is not None:
      verdict = ("FASTER than" if ratio < 1 - clear else "slower than" if ratio > 1 + clear
                 else f"within ±{clear:.0%} of")
      out.append(f"  => layer step, padded fixed-size all-to-all {verdict} variable splits "
                 f"({ratio:.3f}x)")
  out.append("")
  for t in report["targets"]:
    verdict = ("PASS" if t["holds"] else "MISS") if t["evaluated"] else "N/A "
    m = "not measured" if t["measured"] is None else f"{t['measured']:.3f}"
    out.append(f"{verdict} {t['name']}: {m} {t['comparison']} {t['threshold']}")
  return "\n".join(out)
