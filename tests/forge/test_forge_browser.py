"""The Delta Sampling accordion in Forge's gradio-4 UI, in a real browser (headless Chromium): present in both tabs
with its tooltips and ControlNet unit tabs; turning it on, choosing the source pair and pressing Generate gives an
image whose infotext carries the DS settings."""

from __future__ import annotations

import pytest
from test_delta_browser import TIMEOUT, _pick, _set_number

pytestmark = pytest.mark.forge


def test_accordion_in_both_tabs_and_a_generation(forge, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from lib_delta import SETTINGS
    from lib_delta.control_units import UNIT_FIELDS

    browser.get(forge.url)
    WebDriverWait(browser, TIMEOUT).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    for tab in ("txt2img", "img2img"):
        assert browser.find_elements(By.ID, f"script_{tab}_delta_sampling_enabled"), f"no accordion in {tab}"
        for setting in SETTINGS:
            element = browser.find_element(By.ID, f"script_{tab}_delta_sampling_{setting.name}")
            assert element.get_attribute("title") == setting.help, setting.name
        for f in UNIT_FIELDS:
            assert browser.find_elements(By.ID, f"script_{tab}_delta_sampling_controlnet_0_{f.name}"), (tab, f.name)

    accordion = browser.find_element(By.ID, "script_txt2img_delta_sampling_enabled")
    browser.execute_script("arguments[0].scrollIntoView()", accordion)
    switch = browser.find_element(By.CSS_SELECTOR, "#script_txt2img_delta_sampling_enabled-checkbox input")
    assert not switch.is_selected()
    accordion.find_element(By.CSS_SELECTOR, ".label-wrap").click()
    WebDriverWait(browser, 10).until(lambda _: switch.is_selected())

    _set_number(browser, "txt2img_width", 64)
    _set_number(browser, "txt2img_height", 64)
    _set_number(browser, "txt2img_steps", 4)
    _pick(browser, "script_txt2img_delta_sampling_source", "forge-sd15-a")
    _pick(browser, "script_txt2img_delta_sampling_adapted", "forge-sd15-b")
    browser.find_element(By.ID, "txt2img_generate").click()

    def infotext(driver):
        text = driver.find_element(By.ID, "html_info_txt2img").text
        return text if "Delta scale" in text else False

    text = WebDriverWait(browser, TIMEOUT).until(infotext)
    assert "Delta source: forge-sd15-a" in text and "Delta adapted: forge-sd15-b" in text
    assert browser.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img")
