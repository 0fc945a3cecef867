"""What one ControlNet unit on the adapted leg costs, measured in one webui run, printed as ratios.

    python -m bench.controlnet_cost [--repeats N] [--markdown bench/RESULTS.md]

One webui (the test tier's, with the bench support extension) and two SD1 checkpoints: the tiny test model and the
mid-size bench model (~79 M UNet parameters). For each, ``/delta-bench/v1/controlnet-cost`` builds a ControlNet on
that UNet (its own encoder weights, random hint and zero convolutions) and times, in-process, the legs' batched
forward (base cond, base uncond, adapted cond, adapted uncond) with and without the unit, the same with two separate
forwards (no shared-weights fast path), and the ControlNet alone. Then whole generations (time inside ``p.sample``):
DS off, DS with the unit as the only adapted-leg change (batched and not), and with the unit's window on half the
steps (the other half skips both legs). Medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from .sections import write_results
from .webui_bench import _launch, _wait_ready, ensure_mid_models, h, snapshot_tiny

HERE = Path(__file__).resolve().parent


def _image(size: int) -> str:
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(img).rectangle([size // 8, size // 8, size // 2, size // 2], fill="white")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _generation(ui: h.WebUI, payload: dict) -> float:
    r = ui.post("/sdapi/v1/txt2img", json=payload)
    r.raise_for_status()
    return float(ui.get("/delta-bench/v1/last").json()["sample_s"])


def measure(ui: h.WebUI, ck: h.Checkpoint, *, size: int, steps: int, repeats: int, log=print) -> dict:
    base = ui.payload(ck.title, width=size, height=size, steps=steps)
    ui.txt2img({**base, "steps": 1})  # load the checkpoint
    fwd = ui.post("/delta-bench/v1/controlnet-cost", params={"size": size, "repeats": repeats}).json()
    log(f"  [{ck.name}] forwards: {json.dumps(fwd['median_s'])}")
    unit = {"model": fwd["controlnet_file"], "image": _image(size)}

    def ds(**over) -> dict:
        return {"delta sampling": {"args": [{"enabled": True, "scale": 1.0, "source": ck.title, **over}]}}

    configs = {
        "off": base,
        "unit": {**base, "alwayson_scripts": ds(controlnet=[unit])},
        "unit, batch_legs=false": {**base, "alwayson_scripts": ds(controlnet=[unit], batch_legs=False)},
        "unit, window [0, 0.5]": {**base, "alwayson_scripts": ds(controlnet=[{**unit, "guidance_end": 0.5}])},
        "unit, ControlNet is more important": {**base, "alwayson_scripts": ds(controlnet=[{
            **unit, "control_mode": "ControlNet is more important"}])},
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for payload in configs.values():
        _generation(ui, payload)  # warm-up (loads the source and the ControlNet once)
    for _ in range(repeats):
        for name, payload in configs.items():
            times[name].append(_generation(ui, payload))
    return {"forwards": fwd, "sample_s": {k: statistics.median(v) for k, v in times.items()},
            "size": size, "steps": steps, "repeats": repeats}


def table(results: dict) -> str:
    lines = [
        "| model | px | CN / UNet params | unit cost / legs' forward | cond-rows-only unit / legs | CN alone / UNet "
        "(same 2 rows) | fast path saving (batched vs separate, with unit) | DS unit / off | batch_legs=false / "
        "batched | window [0, 0.5] / full window |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        m, s = r["forwards"]["median_s"], r["sample_s"]
        params = r["forwards"]["controlnet_params"] / r["forwards"]["unet_params"]
        lines.append(
            f"| {label} | {r['size']} | {params:.2f} | "
            f"{m['legs_batch4_with_unit'] / m['legs_batch4'] - 1:+.2f} | "
            f"{m['legs_batch4_with_unit_cond_rows_only'] / m['legs_batch4'] - 1:+.2f} | "
            f"{m['controlnet_batch2'] / m['unet_batch2']:.2f} | "
            f"{1 - m['legs_batch4_with_unit'] / m['legs_separate_with_unit']:+.1%} | "
            f"{s['unit'] / s['off']:.2f} | {s['unit, batch_legs=false'] / s['unit']:.2f} | "
            f"{s['unit, window [0, 0.5]'] / s['unit']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", default=str(HERE / "RESULTS.md"), help="file whose ControlNet section is replaced")
    args = ap.parse_args()
    reason = h.webui_missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    tiny = snapshot_tiny(h.ensure_tiny_models())
    mid, mid_loras, _ = ensure_mid_models(tiny)
    models = dataclasses.replace(tiny, checkpoints={**tiny.checkpoints, **mid}, loras={**tiny.loras, **mid_loras})
    work = Path(tempfile.mkdtemp(prefix="delta-cn-bench-"))
    ui, t0 = _launch(models, work / "webui", extension=True, device="cpu")
    try:
        _wait_ready(ui, t0)
        results = {}
        for label, ck, size, steps in (("tiny", tiny.ckpt("tiny-sd1-a"), 64, 20),
                                       ("mid", mid["bench-mid-sd1-a"], 128, 12)):
            t = time.monotonic()
            results[label] = measure(ui, ck, size=size, steps=steps, repeats=args.repeats)
            print(f"  [{label}] {time.monotonic() - t:.0f} s")
    finally:
        h.stop_process(ui.process)
    text = table(results)
    print(text)
    intro = (f"Ratios from one run (medians of {args.repeats}), 2-core CPU, fp32, 1 torch thread. \"Legs' forward\": "
             "the source UNet's batched forward of base cond, base uncond, adapted cond and adapted uncond rows; the "
             "unit adds its ControlNet on the two adapted rows (on one with \"ControlNet is more important\"). \"Fast "
             "path\": that batch against the base rows and the adapted rows in two forwards. Generations: time inside "
             "`p.sample`, DS with target = source base and adapted = base + the unit, lambda 1, Euler, CFG 5.")
    write_results(Path(args.markdown), "controlnet-cost", heading="ControlNet on the adapted leg",
                  module="bench.controlnet_cost", intro=intro, table=text, raw=results)


if __name__ == "__main__":
    main()
