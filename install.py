"""Run by the webui at start-up (not with --skip-install): installs only what the webui lacks, with ranges.

The engine (lib_delta) needs torch and numpy, which every webui has; the list below is for anything beyond that.
"""

import launch

REQUIREMENTS = {
    # distribution name -> pip requirement (a range, never a pin)
    "numpy": "numpy>=1.23",
}

for distribution, requirement in REQUIREMENTS.items():
    if not launch.is_installed(distribution):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for sd-webui-delta-sampling")
