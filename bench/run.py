"""The bench's one command: ``python -m bench [--quick] [--json PATH] [--device cpu|cuda]`` from the project root.

Measures, in one run, same process and same seed, the ratios the project promises (see bench/README.md), prints the
machine, the model sizes and the tables, and writes JSON (default bench/results/latest.json, git-ignored) plus the
markdown tables to bench/RESULTS.md. Nothing here asserts a time: goals are printed beside the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

GOALS = {"disabled": 1.01, "overhead": 1.05, "lora_memory": 1.10, "batched": 1.0, "window": 0.10}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- machine -------------------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "os": platform.platform(),
                            "python": platform.python_version(), "device": device}
    try:
        import torch

        info["bench_torch"] = torch.__version__
    except ImportError:
        info["bench_torch"] = None
    try:
        from bench import webui_bench as wb

        h = wb.h
        if h.MISSING is None:
            probe = ("import torch, json; print(json.dumps({'torch': torch.__version__, "
                     "'cuda': torch.cuda.is_available(), "
                     "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
            out = subprocess.run([str(h.WEBUI_PYTHON), "-c", probe], capture_output=True, text=True, timeout=120,
                                 check=False, env=h.webui_subprocess_env())
            info.update({f"webui_{k}": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()})
            tag = subprocess.run(["git", "-C", str(h.WEBUI_DIR), "describe", "--tags", "--always"],
                                 capture_output=True, text=True, check=False)
            version = tag.stdout.strip()
            if not version and (h.WEBUI_DIR / "CHANGELOG.md").exists():  # an unpacked release: its changelog's head
                head = (h.WEBUI_DIR / "CHANGELOG.md").read_text(errors="replace").splitlines()[:1]
                version = head[0].lstrip("# ").strip() if head else ""
            info["webui_version"] = version or "?"
            info["webui_threads"] = h.WEBUI_THREADS if device == "cpu" else "default"
    except Exception as exc:
        info["webui_probe_error"] = f"{type(exc).__name__}: {exc}"
    return info


# --- formatting ----------------------------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _r(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict) -> str:
    m = results["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, {_mb(m.get('memory_bytes'))} RAM; device {m['device']}"
             + (f" ({m.get('webui_gpu')})" if m.get("webui_gpu") else "")
             + f"; webui {m.get('webui_version', '-')} with torch {m.get('webui_torch', '-')}, "
             f"{m.get('webui_threads', '-')} intra-op thread(s); bench run {results['started']}, "
             f"{results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}."]
    webui = results.get("webui") or {}
    models = webui.get("models", {})
    if models:
        rows = []
        for label, r in models.items():
            p = r["params"]
            rows.append([label, r["checkpoint"].split(" ")[0], f"{p['unet'] / 1e6:.1f} M", f"{p['te'] / 1e6:.1f} M",
                         _mb(r["file_bytes"]), f"{r['lora']} ({_mb(r['lora_bytes'])})",
                         f"{r['image_size']}x{r['image_size']}, {r['steps']} {r['sampler']} steps, CFG 5",
                         f"{r['repeats']} (absent/off: {r['absent_repeats']})"])
        parts.append("Models (SD1-shaped, random weights; target = source base, adapted = base + LoRA):\n\n" + _table(
            ["model", "checkpoint", "UNet params", "TE params", "file", "LoRA", "generation", "timed runs"], rows))

        labels = list(models)
        goal_rows = []

        def row(name: str, goal: str, values: list[str], oks: list[bool | None]) -> None:
            met = [o for o in oks if o is not None]
            goal_rows.append([name, goal, *values, _yes(all(met)) if met else "-"])

        def dis(k: str, key: str) -> Any:
            return models[k]["ratio_disabled_vs_absent"][key]

        row("1. DS installed+disabled / absent, same process (DS's callbacks and script taken out; median wall "
            "per request; paired IQR)", f"<= {GOALS['disabled']}",
            [f"{_r(dis(k, 'same_process_wall'))} [{_r(dis(k, 'same_process_paired_wall').get('q1'))}, "
             f"{_r(dis(k, 'same_process_paired_wall').get('q3'))}]" for k in labels],
            [dis(k, "same_process_wall") <= GOALS["disabled"] for k in labels])
        row("1a. same, against a second webui process without the extension (UNet forward time ratio of the two "
            "processes in brackets: not DS)", "-",
            [f"{_r(dis(k, 'wall'))} [{_r(dis(k, 'paired_wall').get('q1'))}, {_r(dis(k, 'paired_wall').get('q3'))}] "
             f"(UNet {_r(dis(k, 'target_fwd_off_vs_absent'))})" for k in labels], [None])
        row("1b. same, from inside: 1 + DS's own code time in a disabled generation / its wall time", "-",
            [f"{_r(models[k]['ratio_disabled_vs_absent']['direct'], 4)} "
             f"({_r(models[k]['ratio_disabled_vs_absent']['ds_code_ms_disabled'], 2)} ms)" for k in labels], [None])
        row("2. DS full / (DS-off non-forward time + every UNet forward of the run: target + legs)",
            f"<= {GOALS['overhead']}",
            [f"{_r(models[k]['ratio_overhead']['ds_full_vs_off_plus_legs'])} "
             f"({_r(models[k]['ratio_overhead']['ds_bookkeeping_ms_per_call'], 1)} ms/call)" for k in labels],
            [models[k]["ratio_overhead"]["ds_full_vs_off_plus_legs"] <= GOALS["overhead"] for k in labels])
        row("2a. same, from inside: DS full / (DS full - DS's own code time outside the legs' forwards)", "-",
            [f"{_r(models[k]['ratio_overhead']['direct'])} "
             f"({_r(models[k]['ratio_overhead']['ds_own_ms_per_call'], 2)} ms/call)" for k in labels], [None])
        row("2b. DS full / sum of all UNet forwards (includes the webui's own sampler overhead)", "-",
            [_r(models[k]["ratio_overhead"]["ds_full_vs_all_forwards"]) for k in labels], [None])
        def mem(k: str, key: str) -> float | None:
            return models[k]["memory"].get(key)

        row("3. LoRA pair memory (model + LoRA tensors) / one source model", f"<= {GOALS['lora_memory']}",
            [_r(mem(k, "lora_pair_vs_one")) for k in labels],
            [None if mem(k, "lora_pair_vs_one") is None else mem(k, "lora_pair_vs_one") <= GOALS["lora_memory"]
             for k in labels])
        row("3b. LoRA pair / checkpoint pair (two copies)", "-",
            [_r(mem(k, "lora_pair_vs_checkpoint_pair")) for k in labels], [None])
        row("4. legs batched / two forwards (DS cost, i.e. time minus DS off)", f"<= {GOALS['batched']}",
            [_r(models[k]["ratio_batch_legs"]["ds_cost_batched_vs_unbatched"]) for k in labels],
            [models[k]["ratio_batch_legs"]["ds_cost_batched_vs_unbatched"] <= GOALS["batched"] for k in labels])
        for opt in ("window [0, 0.5)", "window [0.5, 1)"):
            vals, oks = [], []
            for k in labels:
                o = next(x for x in models[k]["options"] if x["option"] == opt)
                legs = o["legs_fwd_vs_full"] / o["nominal_fraction"]
                vals.append(f"{_r(o['ds_cost_vs_nominal'])} (legs' forwards {_r(legs)})")
                oks.append(abs(o["ds_cost_vs_nominal"] - 1) <= GOALS["window"])
            row(f"5. {opt}: DS cost / proportional (half of the calls; legs' forward time alone in brackets)",
                "within 10%", vals, oks)
        res_rows = [next((x for x in models[k]["options"] if x["option"] == "source_resolution=2"), None)
                    for k in labels]
        if all(res_rows):
            row("6. source_resolution=2: legs' UNet forward time / full-resolution legs' (DS cost in brackets; the "
                "legs' grid has 1/4 of the cells where the target's latent is at least 16 x 16, see bench/FLOPS.md)",
                "-", [f"{_r(o['legs_fwd_vs_full'])} ({_r(o['ds_cost_vs_full'])})" for o in res_rows], [None])
        parts.append("Goals (ratios measured in one run, same process, same seed):\n\n" + _table(
            ["measure", "goal", *labels, "met"], goal_rows))

    analytic = results.get("analytic") or []
    opt_names = [o["option"] for o in analytic[0]["options"]] if analytic else []
    if models:
        opt_names = [o["option"] for o in next(iter(models.values()))["options"]]
    rows = []
    for name in opt_names:
        cells = [name]
        for a in analytic[:1]:
            o = next((x for x in a["options"] if x["option"] == name), None)
            if o:
                cells += [f"{_r(o['leg_calls'], 2)} / {_r(o['leg_rows'], 2)}", _r(o["traj_err"], 3),
                          _r(o["transfer"], 2)]
            elif name == "batch_legs=false":
                cells += ["exact (same rows)", "0", "1"]
            else:  # source_resolution: a spatial question, answered by docs/native-resolution.md
                cells += ["-", "see docs/native-resolution.md", "-"]
        for k, r in models.items():
            o = next(x for x in r["options"] if x["option"] == name)
            share = 100 * o["image_diff_vs_full"] / r["ds_effect_image_diff"]
            cells += [f"{_r(o['cost_vs_full'], 2)} / {_r(o['ds_cost_vs_full'], 2)}",
                      f"{_r(o['image_diff_vs_full'], 2)} ({_r(share, 0)}%)"]
            del k
        rows.append(cells)
    if rows:
        header = ["option"]
        if analytic:
            a = analytic[0]
            header += [f"analytic leg calls / rows ({a['sampler']}, {a['steps']} steps)",
                       "analytic error vs exact (RMS / offset)", "analytic transfer (1 = exact)"]
        for k in models:
            header += [f"{k}: time / full, DS cost / full", f"{k}: image diff vs full, 0..255 (% of DS effect)"]
        note = ("Speed options. 'time / full' = generation time inside p.sample vs full DS; 'DS cost' = (time - DS "
                "off) / (full - DS off). Image diff: mean |pixel difference| vs the full-DS image, same seed; in "
                "brackets as a share of the full DS effect (image diff DS off vs full: "
                + ", ".join(f"{k} {_r(r['ds_effect_image_diff'], 1)}" for k, r in models.items()) + ").")
        parts.append(note + "\n\n" + _table(header, rows))
    if len(analytic) > 1:
        rows = [[a["sampler"], *(f"{_r(o['traj_err'], 3)} / {_r(o['transfer'], 2)}" for o in a["options"])]
                for a in analytic]
        parts.append("Analytic error vs exact / transfer, per sampler (error as RMS / |offset|; no DS: "
                     + ", ".join(_r(a["no_ds_traj_err"], 3) for a in analytic) + "):\n\n"
                     + _table(["sampler", *(o["option"] for o in analytic[0]["options"])], rows))
    if models:
        rows = []
        for k, r in models.items():
            mem = r["memory"]
            if "error" in mem:
                rows.append([k, mem["error"], "-", "-", "-"])
                continue
            rows.append([k, _mb(mem["one_model_bytes"]), f"{_mb(mem['lora_pair_bytes'])} "
                         f"(LoRA tensors {_mb(mem['lora_pair_lora_bytes'])})", _mb(mem["checkpoint_pair_bytes"]),
                         f"{_mb(mem['rss_one_model'])} / {_mb(mem['rss_lora_pair'])} / "
                         f"{_mb(mem['rss_checkpoint_pair'])}"])
        parts.append("Source-model memory (status route, shared tensors once; LoRA tensors as DS holds them):\n\n"
                     + _table(["model", "one source model", "LoRA pair", "checkpoint pair (two copies)",
                               "process RSS growth: one / LoRA pair / checkpoint pair"], rows))
        rows = []
        for k, r in models.items():
            for name, s in r["spread"].items():
                rows.append([k, name, f"{s['median']:.3f}", f"{s['min']:.3f} - {s['max']:.3f}", str(s["n"]),
                             f"{r['wall_s'][name]:.3f}"])
        parts.append("Times on this machine (seconds inside p.sample: median, range; wall = whole HTTP request):\n\n"
                     + _table(["model", "config", "median", "range", "n", "wall median"], rows))
    for k, err in (webui.get("errors") or {}).items():
        parts.append(f"Error: {k}: {err}")
    for k, r in models.items():
        if r.get("nondeterministic"):
            parts.append(f"Warning: {k}: images changed between identical runs for {r['nondeterministic']}.")
    return "\n\n".join(parts) + "\n"


# --- main ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models only, few repeats (about 2 minutes)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "latest.json", help="where to write the JSON")
    ap.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md", help="where to write the markdown tables")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the webui runs without --use-cpu/--no-half (fp16), hooks synchronise")
    ap.add_argument("--skip-webui", action="store_true", help="analytic models only")
    args = ap.parse_args(argv)

    started = time.monotonic()
    results: dict[str, Any] = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "quick": args.quick, "goals": GOALS}
    _log("bench: machine ...")
    results["machine"] = machine_info(args.device)
    _log("bench: analytic models ...")
    from bench import analytic_sim

    results["analytic"] = analytic_sim.run_all(quick=args.quick)
    if not args.skip_webui:
        from bench import webui_bench as wb

        if wb.h.MISSING:
            _log(f"bench: webui tier skipped: {wb.h.MISSING}")
            results["webui_skipped"] = wb.h.MISSING
        else:
            _log("bench: webui tier ...")
            with tempfile.TemporaryDirectory(prefix="delta-bench-") as work:
                def partial(webui: dict) -> None:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.with_suffix(".partial.json").write_text(
                        json.dumps({**results, "webui": webui}, indent=1, default=str))

                results["webui"] = wb.run_webui_tier(quick=args.quick, device=args.device, work=Path(work), log=_log,
                                                     partial=partial)
    results["seconds"] = time.monotonic() - started
    text = render(results)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    header = ("# Bench results\n\nWritten by `python -m bench" + (" --quick" if args.quick else "")
              + "` (see [README.md](README.md) for what each number means). Ratios, never asserted.\n\n")
    args.markdown.write_text(header + text)
    args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    _log(f"bench: wrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
