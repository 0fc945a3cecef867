"""The Delta Sampling accordion in a real browser (headless Chromium): present in both tabs, with tooltips; turning it
on, choosing the source pair and pressing Generate gives an image whose infotext carries the DS settings."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.webui

TIMEOUT = 120


def _set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _pick(driver, elem_id: str, text: str) -> None:
    """Choose the dropdown option containing ``text`` (gradio 3 dropdowns filter as you type)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)

    def click_option(d) -> bool:
        # gradio re-renders the list while it filters: an option found a moment ago may be gone; look again
        for li in d.find_elements(By.CSS_SELECTOR, "ul.options li"):
            if text in li.text:
                li.click()
                return True
        return False

    WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(click_option)


def open_ui_and_check_accordions(driver, url: str) -> None:
    """Load the UI; the accordion is in both tabs and every control has its tooltip from the parameters model."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from lib_delta import SETTINGS

    driver.get(url)
    WebDriverWait(driver, TIMEOUT).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    for tab in ("txt2img", "img2img"):
        assert driver.find_elements(By.ID, f"script_{tab}_delta_sampling_enabled"), f"no accordion in {tab}"
        for setting in SETTINGS:
            element = driver.find_element(By.ID, f"script_{tab}_delta_sampling_{setting.name}")
            assert element.get_attribute("title") == setting.help, setting.name


def generate_with_pair(driver, source: str, adapted: str) -> str:
    """Turn DS on in txt2img (opening the accordion does), choose the pair, generate 64x64 in 4 steps; returns the
    infotext shown under the image once it carries the DS settings."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    accordion = driver.find_element(By.ID, "script_txt2img_delta_sampling_enabled")
    driver.execute_script("arguments[0].scrollIntoView()", accordion)
    switch = driver.find_element(By.CSS_SELECTOR, "#script_txt2img_delta_sampling_enabled-checkbox input")
    assert not switch.is_selected()
    accordion.find_element(By.CSS_SELECTOR, ".label-wrap").click()
    WebDriverWait(driver, 10).until(lambda _: switch.is_selected())

    _set_number(driver, "txt2img_width", 64)
    _set_number(driver, "txt2img_height", 64)
    _set_number(driver, "txt2img_steps", 4)
    _pick(driver, "script_txt2img_delta_sampling_source", source)
    _pick(driver, "script_txt2img_delta_sampling_adapted", adapted)
    driver.find_element(By.ID, "txt2img_generate").click()

    def infotext(d):
        text = d.find_element(By.ID, "html_info_txt2img").text
        return text if "Delta scale" in text else False

    text = WebDriverWait(driver, TIMEOUT).until(infotext)
    assert driver.find_elements(By.CSS_SELECTOR, "#txt2img_gallery img")
    return text


def test_accordion_tooltips_and_generation(webui, browser):
    open_ui_and_check_accordions(browser, webui.url)
    text = generate_with_pair(browser, "tiny-sd1-a", "tiny-sd1-b")
    assert "Delta source: tiny-sd1-a" in text and "Delta adapted: tiny-sd1-b" in text


def test_failure_is_shown_in_the_ui(webui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(webui.url)
    WebDriverWait(browser, TIMEOUT).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    accordion = browser.find_element(By.ID, "script_txt2img_delta_sampling_enabled")
    browser.execute_script("arguments[0].scrollIntoView()", accordion)
    accordion.find_element(By.CSS_SELECTOR, ".label-wrap").click()
    _set_number(browser, "txt2img_width", 64)
    _set_number(browser, "txt2img_height", 64)
    _set_number(browser, "txt2img_steps", 4)
    browser.find_element(By.ID, "txt2img_generate").click()  # enabled, but no source pair chosen

    def error_shown(driver):
        text = driver.find_element(By.ID, "txt2img_results").text
        return text if "choose the source base checkpoint" in text else False

    assert WebDriverWait(browser, TIMEOUT).until(error_shown)


def test_controlnet_units_in_both_tabs_and_a_generation_with_one(webui, browser, tmp_path):
    from PIL import Image, ImageDraw
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from lib_delta.control_units import UNIT_FIELDS

    image_path = tmp_path / "control.png"
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).rectangle([8, 8, 40, 40], fill="white")
    img.save(image_path)

    browser.get(webui.url)
    WebDriverWait(browser, TIMEOUT).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    for tab in ("txt2img", "img2img"):
        for index in range(3):  # the default number of unit tabs
            for f in UNIT_FIELDS:
                assert browser.find_elements(By.ID, f"script_{tab}_delta_sampling_controlnet_{index}_{f.name}"), (
                    tab, index, f.name)

    text = _generate_with_unit(browser, image_path, "tiny-sd1-cn")
    assert "Model: tiny-sd1-cn [" in text and "Delta source: tiny-sd1-a" in text


def test_ip_adapter_units_in_both_tabs_and_a_generation_with_one(webui, browser, tmp_path):
    from PIL import Image, ImageDraw
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "reference.png"
    img = Image.new("RGB", (48, 48), (30, 90, 160))
    ImageDraw.Draw(img).ellipse([4, 6, 40, 44], fill=(220, 180, 40))
    img.save(image_path)

    browser.get(webui.url)
    WebDriverWait(browser, TIMEOUT).until(ec.visibility_of_element_located((By.ID, "txt2img_generate")))
    for tab in ("txt2img", "img2img"):  # every unit tab takes an IP-Adapter: its model list and its encoders
        for index in range(3):
            model = browser.find_element(By.ID, f"script_{tab}_delta_sampling_controlnet_{index}_model")
            module = browser.find_element(By.ID, f"script_{tab}_delta_sampling_controlnet_{index}_module")
            assert "IP-Adapter model" in model.get_attribute("textContent"), (tab, index)
            assert "encoder" in module.get_attribute("textContent"), (tab, index)

    text = _generate_with_unit(browser, image_path, "tiny-sd1-ip-full", module="ip-adapter_clip_h")
    assert "Model: tiny-sd1-ip-full [" in text and "Module: ip-adapter_clip_h" in text, text


def _generate_with_unit(browser, image_path, model: str, module: str | None = None) -> str:
    """In txt2img: open the accordion and the units, upload the image to unit 1, turn it on with ``model`` (and
    ``module``), generate with source tiny-sd1-a at 64 x 64, 4 steps; returns the infotext once it names the unit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    accordion = browser.find_element(By.ID, "script_txt2img_delta_sampling_enabled")
    browser.execute_script("arguments[0].scrollIntoView()", accordion)
    accordion.find_element(By.CSS_SELECTOR, ".label-wrap").click()
    sub = browser.find_element(By.ID, "script_txt2img_delta_sampling_controlnet")
    browser.execute_script("arguments[0].scrollIntoView()", sub)
    sub.find_element(By.CSS_SELECTOR, ".label-wrap").click()
    upload = browser.find_element(By.CSS_SELECTOR,
                                  "#script_txt2img_delta_sampling_controlnet_0_image input[type=file]")
    upload.send_keys(str(image_path))
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, "#script_txt2img_delta_sampling_controlnet_0_image img"))
    browser.find_element(By.CSS_SELECTOR, "#script_txt2img_delta_sampling_controlnet_0_enabled input").click()
    if module is not None:
        _pick(browser, "script_txt2img_delta_sampling_controlnet_0_module", module)
    _pick(browser, "script_txt2img_delta_sampling_controlnet_0_model", model)
    _set_number(browser, "txt2img_width", 64)
    _set_number(browser, "txt2img_height", 64)
    _set_number(browser, "txt2img_steps", 4)
    _pick(browser, "script_txt2img_delta_sampling_source", "tiny-sd1-a")
    browser.find_element(By.ID, "txt2img_generate").click()

    def infotext(driver):
        text = driver.find_element(By.ID, "html_info_txt2img").text
        return text if "Delta ControlNet 1" in text else False

    return WebDriverWait(browser, TIMEOUT).until(infotext)
