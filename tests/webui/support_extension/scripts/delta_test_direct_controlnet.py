"""Test-only: ControlNet and IP-Adapter units applied directly to the target model (the oracle of
test_delta_controlnet.py and test_delta_ip_adapter.py).

``alwayson_scripts: {"delta test direct controlnet": {"args": [{"units": [unit dicts]}]}}`` builds each unit's network
for the loaded checkpoint's UNet with ``lib_delta`` and, at every CFG denoiser call, runs the target UNet with the
active units' residuals (cond and uncond rows, or cond rows only) and image attention (cond rows the reference's
tokens, uncond rows the uncond tokens), through the same functions DS uses on its adapted leg, which
tests/webui/test_delta_controlnet_core.py and tests/unit/test_ip_adapter.py pin to the UNet's own forward and the
formula. Windows by sd-webui-controlnet's clock (the webui's step fraction). The infotext gets "Direct ControlNet calls"
and "Direct IP-Adapter calls" (counted up to the end of the batch) so a test can see that it ran.
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

        from lib_delta.clip_vision import read_clip_vision
        from lib_delta.control_units import ControlStack, decode_image, parse_units
        from lib_delta.controlnet import build_controlnet
        from lib_delta.controlnet_files import read_controlnet
        from lib_delta.ip_adapter import build_ip_adapter, is_ip_adapter, read_ip_adapter
        from lib_delta.webui.image_prompts import TokenMaker, encoder_module, resolve_encoder
        from lib_delta.webui.source_models import read_checked_state_dict, resolve_controlnet

        model = p.sd_model
        unet = model.model.diffusion_model
        conf = OmegaConf.load(os.path.splitext(model.sd_checkpoint_info.filename)[0] + ".yaml").model.params
        kwargs = OmegaConf.to_container((conf.get("unet_config") or conf.get("network_config")).params)
        entries = []
        stack = ControlStack([])
        maker = TokenMaker(forge=False)
        for index, unit in enumerate(parse_units(args[0]["units"])):
            name, filename = resolve_controlnet(unit.model)
            state_dict = read_checked_state_dict(filename, "ControlNet")
            given = unit.image if unit.image is not None else p.init_images[0]
            image = [decode_image(one) for one in given] if isinstance(given, tuple) else decode_image(given)
            if is_ip_adapter(state_dict):
                net = build_ip_adapter(unet, read_ip_adapter(state_dict, name), source="the target",
                                       dtype=devices.dtype_unet)
                encoder_file = resolve_encoder(encoder_module(unit, net))
                encoder = read_clip_vision(read_checked_state_dict(encoder_file, "CLIP vision"), encoder_file)
                stack.set_tokens(index, *maker.tokens(net, encoder, image))
            else:
                cn = read_controlnet(state_dict, name)
                # the UNet's compute dtype (its weights may be stored as fp8)
                net = build_controlnet(unet, kwargs, cn, dtype=devices.dtype_unet)
            entries.append((unit, net, image))
        stack.entries = entries
        stack.ip_calls = 0
        setattr(p, ATTR, (stack, unet))

    def postprocess_batch(self, p, *args, **kwargs):
        found = getattr(p, ATTR, None)
        if found is not None:  # before the infotexts are written
            found[1].__dict__.pop("forward", None)
            p.extra_generation_params["Direct ControlNet calls"] = found[0].calls
            p.extra_generation_params["Direct IP-Adapter calls"] = found[0].ip_calls

    def postprocess(self, p, processed, *args):
        found = p.__dict__.pop(ATTR, None)
        if found is not None:
            found[1].__dict__.pop("forward", None)


class _Open:
    """The image-attention forwards installed for the current denoiser call (taken off after it)."""

    scope = None


def _on_cfg_denoiser(params):
    from lib_delta.control_units import Moment
    from lib_delta.controlnet import controlled_forward
    from lib_delta.ip_adapter import image_prompt_forwards

    found = getattr(getattr(params.denoiser, "p", None), ATTR, None)
    if found is None:
        return
    stack, unet = found
    unet.__dict__.pop("forward", None)
    height, width = (int(n) * 8 for n in params.x.shape[-2:])
    moment = Moment(params.sampling_step / max(params.total_sampling_steps, 1))
    active = stack.active(moment, width, height)
    uncond = params.text_uncond
    batch = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
    rows = torch.arange(params.x.shape[0], device=params.x.device)
    if active:
        unet.forward = controlled_forward(unet, active, rows, rows[:-batch], stack.count_call)
    prompts = stack.image_prompts(moment)
    if prompts:
        stack.ip_calls += 1
        flags = torch.zeros(params.x.shape[0], dtype=torch.bool)
        flags[-batch:] = True  # the webui batches [cond rows, uncond rows]
        _Open.scope = image_prompt_forwards(unet, prompts, rows, flags)
        _Open.scope.__enter__()


def _on_cfg_denoised(params):
    scope, _Open.scope = _Open.scope, None
    if scope is not None:
        scope.__exit__(None, None, None)


script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
script_callbacks.on_cfg_denoised(_on_cfg_denoised)
