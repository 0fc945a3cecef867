// Tooltips for the Delta Sampling accordion. The texts come from lib_delta.SETTINGS (the one parameters model),
// rendered by the extension into a hidden element with a data-tooltips JSON map of elem_id -> help text.
(function () {
    function applyDeltaSamplingTooltips() {
        gradioApp().querySelectorAll(".delta-sampling-tooltips").forEach(function (holder) {
            let map;
            try {
                map = JSON.parse(holder.dataset.tooltips || "{}");
            } catch (e) {
                return;
            }
            Object.keys(map).forEach(function (elemId) {
                const element = gradioApp().getElementById(elemId);
                if (!element) return;
                element.title = map[elemId];
                // The visible label is a child; take the component's own first one only, since an accordion contains
                // the other components (and their labels) too.
                const label = element.querySelector(".label-wrap, label");
                if (label) label.title = map[elemId];
            });
        });
    }

    onUiLoaded(applyDeltaSamplingTooltips);
})();
