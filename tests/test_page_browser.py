"""The upload page in headless Chromium (Debian's chromium + chromedriver): pick an image, see the class.

`make test` installs chromium and chromium-driver with apt when /usr/bin/chromium is missing.
Screenshots are written beside each test's tmp_path (page.png) for a person to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from test_export import confident_val_images, train_real_run, train_tiny_run

from resfit.inference.classifier import Classifier, InferenceConfig
from resfit.serve import BackgroundServer, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No network beyond loopback, no background services: the page must work on its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,760",
)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "chromium and chromedriver are needed: `make browser` (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def upload(browser, url: str, image: Path) -> str:
    """Open the page, pick ``image`` in the file input, and return the final state (done or error)."""
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "model-line"), "classes"))
    browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
    WebDriverWait(browser, 120).until(
        lambda driver: (
            driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
    )
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_page_shows_the_class_and_errors_on_the_tiny_model(
    browser, tiny_imagefolder, tmp_path_factory, tmp_path
):
    run = train_tiny_run(tiny_imagefolder, tmp_path_factory.getbasetemp() / "deploy-tiny-run")
    classifier = Classifier.load(run, config=InferenceConfig(cache_dir=str(tmp_path / "cache")))
    image = tiny_imagefolder / "val" / "red" / "red_000.png"
    expected = classifier.predict(image, top_k=1)[0][0]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    with BackgroundServer(create_app(classifier)) as url:
        assert upload(browser, url, image) == "done"
        assert browser.find_element(By.ID, "predicted").text == expected
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 2
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert upload(browser, url, not_an_image) == "error"
        assert "not an image in an allowed format" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(tmp_path / "page-error.png"))
        assert not browser.find_element(By.ID, "result").is_displayed()


@pytest.mark.slow
def test_page_shows_the_right_class_for_a_real_validation_photo(
    browser, shared_dir, tmp_path_factory, tmp_path
):
    run = train_real_run(shared_dir, tmp_path_factory.getbasetemp())
    classifier = Classifier.load(run, config=InferenceConfig(cache_dir=str(tmp_path / "cache")))
    reference = Classifier.load(run, backend="torch", precision="fp32")
    (photo, true_class), *_ = confident_val_images(reference, shared_dir)
    with BackgroundServer(create_app(classifier)) as url:
        assert upload(browser, url, photo) == "done"
        assert browser.find_element(By.ID, "predicted").text == true_class
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
        assert [bar.find_element(By.CLASS_NAME, "name").text for bar in bars][0] == true_class
        assert browser.find_element(By.ID, "preview").get_attribute("naturalWidth") not in (None, "0")
        assert not browser.find_element(By.ID, "unknown-note").is_displayed()
        assert browser.save_screenshot(str(tmp_path / "page.png"))
        # a flower shown to the ants/bees model: the page says "unknown" and why, with the best guess
        flowers = sorted(shared_dir.joinpath("data", "flowers5", "val", "tulip").glob("*.jpg"))[:12]
        _, answers = reference.predict_answers(flowers)
        unknown = [photo for photo, answer in zip(flowers, answers, strict=True) if answer.unknown]
        assert unknown, "none of 12 tulips is unknown to the ants/bees model"
        assert upload(browser, url, unknown[0]) == "done"
        assert browser.find_element(By.ID, "predicted").text == "unknown"
        note = browser.find_element(By.ID, "unknown-note")
        assert note.is_displayed() and "best guess" in note.text and "knn" in note.text
    assert (tmp_path / "page.png").stat().st_size > 10_000
