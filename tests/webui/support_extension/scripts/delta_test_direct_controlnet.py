"""Test-only: ControlNet units applied directly to the target model (the oracle of test_delta_controlnet.py).

``alwayson_scripts: {"delta test direct controlnet": {"args": [{"units": [unit dicts]}]}}`` builds each unit's network
for the loaded checkpoint's UNet with ``lib_delta`` and, at every CFG denoiser call, runs the target UNet with the
active units' residuals (cond and uncond rows, or cond rows only), through the same functions DS uses on its adapted
leg, which tests/webui/test_delta_controlnet_core.py pins to the UNet's own forward. The infotext gets
"Direct ControlNet calls" (counted up to the end of the batch) so a test can see that it ran.
"""

import os

import torch
from modules import script_callbacks, scripts

ATTR = "delta_test_direct_controlnet"


class DirectControlNet(scripts.Script):
    def title(self):
        return "Delta test direct ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        return [gr.Textbox(visible=False)]  # one argument slot, for the API's {"units": [...]}

    def process(self, p, *args):
        if not args or not isinstance(args[0], dict) or not args[0].get("units"):
            return
        from modules import devices
        from omegaconf import OmegaConf

        from lib_delta.control_units import ControlStack, decode_image, parse_units
        from lib_delta.controlnet import build_controlnet
        from lib_delta.controlnet_files import read_controlnet
        from lib_delta.webui.source_models import read_checked_state_dict, resolve_controlnet

        model = p.sd_model
        unet = model.model.diffusion_model
        conf = OmegaConf.load(os.path.splitext(model.sd_checkpoint_info.filename)[0] + ".yaml").model.params
        kwargs = OmegaConf.to_container((conf.get("unet_config") or conf.get("network_config")).params)
        entries = []
        for unit in parse_units(args[0]["units"]):
            name, filename = resolve_controlnet(unit.model)
            cn = read_controlnet(read_checked_state_dict(filename, "ControlNet"), name)
            # the UNet's compute dtype (its weights may be stored as fp8)
            net = build_controlnet(unet, kwargs, cn, dtype=devices.dtype_unet)
            image = unit.image if unit.image is not None else p.init_images[0]
            entries.append((unit, net, decode_image(image)))
        setattr(p, ATTR, (ControlStack(entries), unet))

    def postprocess_batch(self, p, *args, **kwargs):
        found = getattr(p, ATTR, None)
        if found is not None:  # before the infotexts are written
            found[1].__dict__.pop("forward", None)
            p.extra_generation_params["Direct ControlNet calls"] = found[0].calls

    def postprocess(self, p, processed, *args):
        found = p.__dict__.pop(ATTR, None)
        if found is not None:
            found[1].__dict__.pop("forward", None)


def _on_cfg_denoiser(params):
    from lib_delta.controlnet import controlled_forward

    found = getattr(getattr(params.denoiser, "p", None), ATTR, None)
    if found is None:
        return
    stack, unet = found
    unet.__dict__.pop("forward", None)
    denoiser = params.denoiser
    height, width = (int(n) * 8 for n in params.x.shape[-2:])
    active = stack.active(denoiser.step, denoiser.total_steps, width, height)
    if active:
        uncond = params.text_uncond
        batch = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        rows = torch.arange(params.x.shape[0], device=params.x.device)
        unet.forward = controlled_forward(unet, active, rows, rows[:-batch], stack.count_call)


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
