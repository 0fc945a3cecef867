// Tooltips for the Delta Sampling accordion. The texts come from lib_delta.SETTINGS (the one parameters model),
// rendered by the extension into a hidden element with a data-tooltips JSON map of elem_id -> help text.
(function () {
    function applyDeltaSamplingTooltips() {
        const holders = gradioApp().querySelectorAll(".delta-sampling-tooltips");
        holders.forEach(function (holder) {
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
                // Sliders, dropdowns and checkboxes put their label in a child element: give it the text too.
                element.querySelectorAll("label, span, input, textarea").forEach(function (child) {
                    if (!child.title) child.title = map[elemId];
                });
            });
        });
    }

    onUiLoaded(applyDeltaSamplingTooltips);
})();
