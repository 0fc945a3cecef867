"""Delta Sampling on Forge: the bench's ratios measured in a real Forge (CPU), printed and written into RESULTS.md.

    python -m bench.forge_bench [--rounds N]

Two Forge processes from the Forge tier's harness (tests/forge): one with this extension (**installed**), one without
(**absent**), the SD1.5 Forge fixtures (UNet 44 M parameters), 64x64, Euler, 8 steps, CFG 5. Whole-request wall
times, medians over rounds in which the configurations run back to back (absent and installed-off alternate, order
flipped each round). Orchestration overhead: the bench support extension (bench/support_extension) times
``p.sample`` and every UNet forward, target and source legs, inside the installed process. Memory:
``/delta-sampling/v1/status`` bytes (shared tensors once) and the process RSS growth
after a generation with one source model, a LoRA pair and a checkpoint pair. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "forge"))

import forge_harness as fh  # noqa: E402
from .sections import write_results  # noqa: E402
from .webui_bench import SUPPORT, SUPPORT_NAME  # noqa: E402


def _wall(ui, payload: dict) -> float:
    t0 = time.perf_counter()
    r = ui.post("/sdapi/v1/txt2img", json=payload)
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    if fh.MISSING:
        print(f"skipped: {fh.MISSING}")
        return
    models = fh.ensure_forge_models()
    work = Path(tempfile.mkdtemp(prefix="delta-forge-bench-"))
    installed = fh.start_forge(models, work / "installed", extra_extensions={SUPPORT_NAME: SUPPORT})
    absent = fh.start_forge(models, work / "absent", extension=False)
    try:
        a, b = models.title("forge-sd15-a"), models.title("forge-sd15-b")
        base = installed.payload("forge-sd15-a", "a red apple on a table", steps=8)

        def ds(**over) -> dict:
            return {**base, "alwayson_scripts": {"delta sampling": {"args": [{"enabled": True, "scale": 1.0,
                                                                             "source": a, **over}]}}}

        configs = {"off": base, "checkpoint pair": ds(adapted=b),
                   "LoRA pair": ds(loras=[{"name": "forge-sd15-lora", "weight": 0.8}])}
        memory = {}
        rss0 = installed.get("/delta-sampling/v1/status").json()["process_rss_bytes"]
        for label, payload in (("one source model", ds(adapted=a)), ("LoRA pair", configs["LoRA pair"]),
                               ("checkpoint pair", configs["checkpoint pair"])):
            installed.post("/delta-sampling/v1/unload")
            _wall(installed, payload)
            status = installed.get("/delta-sampling/v1/status").json()
            memory[label] = {"bytes": status["total_bytes"], "rss_growth": status["process_rss_bytes"] - rss0}
        for ui in (installed, absent):
            _wall(ui, base)  # warm-up
        for payload in configs.values():
            _wall(installed, payload)
        times: dict[str, list[float]] = {"absent": [], **{k: [] for k in configs}}
        inside: dict[str, list[dict]] = {k: [] for k in configs}  # the support extension's numbers per generation
        for i in range(args.rounds):
            pair = [("absent", absent), ("off", installed)]
            for name, ui in (pair if i % 2 == 0 else pair[::-1]):
                times[name].append(_wall(ui, base))
                if ui is installed:
                    inside["off"].append(installed.get("/delta-bench/v1/last").json())
            for name in ("checkpoint pair", "LoRA pair"):
                times[name].append(_wall(installed, configs[name]))
                encode = installed.get("/delta-sampling/v1/status").json()["last_generation"]["encode_seconds"]
                inside[name].append({**installed.get("/delta-bench/v1/last").json(), "encode_s": encode})
    finally:
        fh.h.stop_process(installed.process)
        fh.h.stop_process(absent.process)
    med = {k: statistics.median(v) for k, v in times.items()}
    # orchestration: DS's time inside p.sample / (DS off's non-forward time + every UNet forward of the DS run)
    off_nonfwd = statistics.median(r["sample_s"] - r["target_fwd_s"] for r in inside["off"])
    orchestration = {name: statistics.median(r["sample_s"] / (r["target_fwd_s"] + r["source_fwd_s"] + off_nonfwd)
                                             for r in inside[name]) for name in ("checkpoint pair", "LoRA pair")}
    excess_ms = {name: statistics.median((r["sample_s"] - r["target_fwd_s"] - r["source_fwd_s"] - off_nonfwd)
                                         / max(1, r["target_calls"]) * 1000 for r in inside[name])
                 for name in ("checkpoint pair", "LoRA pair")}
    source_calls = {name: inside[name][-1]["source_calls"] for name in ("checkpoint pair", "LoRA pair")}
    # the same with the legs' text encoding counted like a forward (Forge's text encoders are full-size CLIP-L here)
    no_encode = {name: statistics.median(r["sample_s"] / (r["target_fwd_s"] + r["source_fwd_s"] + r["encode_s"]
                                                          + off_nonfwd) for r in inside[name])
                 for name in ("checkpoint pair", "LoRA pair")}
    encode_ms = {name: statistics.median(r["encode_s"] for r in inside[name]) * 1000
                 for name in ("checkpoint pair", "LoRA pair")}
    one = memory["checkpoint pair"]["bytes"] / 2  # one engine after its legs ran (text encoder loaded too)
    lora_file = (models.root / "Lora" / "forge-sd15-lora.safetensors").stat().st_size
    rows = [
        "| ratio | value |", "| --- | --- |",
        f"| DS installed + disabled / extension absent (whole request) | {med['off'] / med['absent']:.3f} |",
        f"| DS checkpoint pair / DS off | {med['checkpoint pair'] / med['off']:.2f} |",
        f"| DS LoRA pair / DS off | {med['LoRA pair'] / med['off']:.2f} |",
        *(f"| orchestration, {name}: DS time in `p.sample` / (DS off's non-forward time + every UNet forward) | "
          f"{orchestration[name]:.3f} ({excess_ms[name]:+.1f} ms per denoiser call; {source_calls[name]} source "
          "UNet forwards) |" for name in ("checkpoint pair", "LoRA pair")),
        *(f"| orchestration, {name}, the legs' text encoding counted as forwards ({encode_ms[name]:.0f} ms per "
          f"generation) | {no_encode[name]:.3f} |" for name in ("checkpoint pair", "LoRA pair")),
        f"| LoRA pair memory / one engine (half the checkpoint pair; status bytes) | "
        f"{memory['LoRA pair']['bytes'] / one:.3f} (+ the LoRA's own tensors, a {lora_file / 2**20:.1f} MB file) |",
        f"| checkpoint pair memory / one engine | {memory['checkpoint pair']['bytes'] / one:.3f} |",
        f"| a source whose legs never ran (adapted = base) / one engine | "
        f"{memory['one source model']['bytes'] / one:.3f} (Forge had not loaded its text encoder) |",
    ]
    text = "\n".join(rows)
    print(text)
    raw = {"median_s": med, "memory": memory, "orchestration": orchestration, "orchestration_no_encode": no_encode,
           "encode_ms": encode_ms, "off_nonforward_s": off_nonfwd}
    print(json.dumps(raw))
    write_results(Path(args.markdown), "forge", heading="Forge", module="bench.forge_bench",
                  intro=f"Forge main (dfdcbab) on this 2-core CPU, SD1.5 Forge fixtures (UNet 44 M parameters), 64x64, "
                  f"Euler, 8 steps; medians of {args.rounds} rounds of whole-request wall times. Memory: status bytes "
                  "after one generation of each kind (a fresh load each).", table=text, raw=raw)


if __name__ == "__main__":
    main()
