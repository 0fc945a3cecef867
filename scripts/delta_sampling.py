"""Delta Sampling for the AUTOMATIC1111 webui and Forge: the AlwaysOn script. Wiring only; the work is in lib_delta."""

from modules import scripts

import lib_delta.webui  # imported at load time: the webui restores sys.path after loading each script
from lib_delta.params import INFOTEXT_KEYS
from lib_delta.webui import hooks, ui


class DeltaSamplingScript(scripts.Script):
    sorting_priority = 15  # Forge's UI ordering; ignored by A1111

    def title(self):
        return "Delta Sampling"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if hooks.host().supported else False

    def ui(self, is_img2img):
        components, paste_fields = ui.build(self.elem_id)
        self.infotext_fields = paste_fields
        self.paste_field_names = list(INFOTEXT_KEYS)  # "Send to img2img/inpaint" carries DS settings along
        return components

    def process(self, p, *args):
        hooks.begin_job(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only
        hooks.before_sampling(p, kwargs.get("x"))

    def postprocess(self, p, processed, *args):
        hooks.end_job(p)


lib_delta.webui.install()
