"""The demo in a real browser: headless Debian chromium driven by selenium through one generation, one controlled
generation and bad inputs, at the laptop sizes 1366x768 and 1280x800, with screenshots.

Needs chromium and chromedriver (`apt-get install chromium chromium-driver`; .ci/run installs them where apt-get
is available) and selenium (the test extra). Screenshots go to the test's temporary folder, or to
$DEMO_SCREENSHOTS when set (to look at them).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """tools/demo.py with the shipped student, teacher and ControlNet branch, on a free local port."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo_browser") / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools/demo.py"), "--port", str(port)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the demo did not start:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1366,768"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DEMO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def viewport_size(driver) -> tuple[int, int]:
    return driver.execute_script("return [window.innerWidth, window.innerHeight]")


def top_in_viewport(driver, element) -> bool:
    """The element's top edge lies inside the visible part of the page (no scrolling needed to see it)."""
    top = driver.execute_script("return arguments[0].getBoundingClientRect().top", element)
    return 0 <= top < viewport_size(driver)[1] - 40


def wait_for(driver, condition, timeout: float = 180, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d), message=what)


def gallery_images(driver, elem_id: str):
    return driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")


def messages(driver) -> str:
    return driver.find_element(By.ID, "messages").text


def set_number(driver, elem_id: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if value:
        field.send_keys(value)
    field.send_keys(Keys.TAB)


def set_prompt(driver, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def generate_and_wait(driver, count: int, gallery: str = "student") -> float:
    """Click Generate, wait for `count` images in the gallery; returns the seconds it took."""
    before = {img.get_attribute("src") for img in gallery_images(driver, gallery)}
    start = time.time()
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: len(gallery_images(d, gallery)) == count
             and {img.get_attribute("src") for img in gallery_images(d, gallery)} != before,
             what=f"{count} new images in #{gallery}; messages: {messages(driver)!r}")
    return time.time() - start


def test_the_demo_in_a_browser(server, browser, shots):
    url, log = server
    driver = browser
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.ID, "generate") and d.find_elements(By.ID, "student"), 60,
             "the page loads")
    assert viewport_size(driver)[0] <= 1366
    # The button and the results are both visible at 1366x768, without scrolling.
    button, results = driver.find_element(By.ID, "generate"), driver.find_element(By.ID, "student")
    assert top_in_viewport(driver, button) and top_in_viewport(driver, results)
    assert "Limits on this server (CPU): width and height 8-64 px" in driver.find_element(By.TAG_NAME, "body").text

    # One generation: four seeds from the student and from the teacher, shown large, with both times.
    generate_and_wait(driver, 4)
    wait_for(driver, lambda d: len(gallery_images(d, "teacher")) == 4, what="the teacher's images")
    shown = gallery_images(driver, "student")[0]
    assert shown.size["width"] >= 60, shown.size  # not the 32 px of the true size
    times = driver.find_element(By.ID, "times").text
    assert "Student (lcm 4 steps):" in times and "Teacher (dpm 20 steps, guidance 3):" in times
    assert "Error" not in messages(driver)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#files a")) >= 8  # the true-size PNGs to download
    driver.save_screenshot(str(shots / "1_generation_1366x768.png"))

    # A controlled generation from a clicked example (prompt and map from docs/examples): the map and its edges
    # over the image beside the result.
    example = driver.find_element(By.XPATH, "//div[contains(@class, 'table') and text()='triangle_edges.png']"
                                            "/ancestor::tr[1]")
    driver.execute_script("arguments[0].scrollIntoView()", example)
    example.click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#control-preview img"), 60, "the example's map")
    assert "triangle at the center" in driver.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
    set_number(driver, "images", "2")
    driver.execute_script("window.scrollTo(0, 0)")
    generate_and_wait(driver, 2)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#control-view img")
             and d.find_elements(By.CSS_SELECTOR, "#overlay img"), what="the control map and its overlay")
    assert "Error" not in messages(driver)
    driver.save_screenshot(str(shots / "2_controlled_1366x768.png"))

    # Cancel: eight seeds from both models stop early, and the next request runs at once.
    set_number(driver, "images", "8")
    driver.find_element(By.ID, "generate").click()
    time.sleep(0.5)
    driver.find_element(By.ID, "cancel").click()
    wait_for(driver, lambda d: "request cancelled from its page after" in log.read_text(), 60,
             "the server to stop the cancelled request")
    assert "after 16 of 16 images" not in log.read_text()

    # Words the model never saw: a warning in the page, and the images still come.
    set_prompt(driver, "a cat riding a bicycle on the moon")
    set_number(driver, "images", "1")
    driver.find_element(By.CSS_SELECTOR, "#control button[aria-label='Clear']").click()
    generate_and_wait(driver, 1)
    assert "Warning: Prompt: the model never saw" in messages(driver) and "cat" in messages(driver)

    # Bad input 1: an empty field names the field, nothing of the server leaks.
    set_number(driver, "width", "")
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: "Width is empty" in messages(d), 60, "the empty-width message")
    assert top_in_viewport(driver, driver.find_element(By.ID, "messages"))
    driver.save_screenshot(str(shots / "3_empty_width_1366x768.png"))
    set_number(driver, "width", "32")
    set_number(driver, "steps", "2.7")
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: "Steps must be a whole number" in messages(d), 60, "the fractional-steps message")
    set_number(driver, "steps", "4")

    # Bad input 2: a text file renamed .png as control map.
    fake = shots / "not_an_image.png"
    fake.write_text("this is a text file, not a PNG")
    driver.find_element(By.CSS_SELECTOR, "#control input[type=file]").send_keys(str(fake))
    wait_for(driver, lambda d: "Control map: the uploaded file is not an image" in messages(d), 60,
             "the bad-upload message")
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: "Control map: the uploaded file is not an image" in messages(d), 60,
             "the bad-upload message after Generate")
    page = driver.find_element(By.TAG_NAME, "body").text
    assert "/tmp" not in page and "Traceback" not in page and "UnidentifiedImageError" not in page
    driver.save_screenshot(str(shots / "4_bad_upload_1366x768.png"))

    # 1280x800: the button and the results still side by side and visible.
    driver.set_window_size(1280, 800)
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.ID, "generate") and d.find_elements(By.ID, "student"), 60,
             "the page loads")
    assert top_in_viewport(driver, driver.find_element(By.ID, "generate"))
    assert top_in_viewport(driver, driver.find_element(By.ID, "student"))
    generate_and_wait(driver, 4)
    driver.save_screenshot(str(shots / "5_generation_1280x800.png"))
    assert "Traceback" not in log.read_text()
