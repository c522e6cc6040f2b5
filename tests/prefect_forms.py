"""Filling in the Prefect UI's block forms in a real browser, as a person does: V1 (the UI the
run links open) and V2 (where the UI's root leads). Fields are found by the title the form
shows; a field of several types (`X | None`) shows one tab per type."""

from __future__ import annotations

import time
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tests.browser import WAIT_S, open_page, wait_for

CONTROLS = ".//input[not(@type='checkbox') and not(@type='hidden')] | .//textarea"
# The tab labels of the two UIs for `null` and for a string.
NONE = {"v1": "null", "v2": "None"}
TEXT = {"v1": "string", "v2": "str"}


class BlockForm:
    """One block form at a time: `create(slug)` or `edit(id)`, fill, `save()` -> the id."""

    def __init__(self, driver: Any, ui: str, version: str) -> None:
        self.driver, self.ui, self.version = driver, ui.rstrip("/"), version
        self.prefix = self.ui + ("/v2" if version == "v2" else "")

    def create(self, slug: str, name: str) -> None:
        open_page(self.driver, f"{self.prefix}/blocks/catalog/{slug}/create")
        _replace(wait_for(self.driver, self._name_box, "the block name input"), name)

    def edit(self, block_id: str) -> None:
        open_page(self.driver, f"{self.prefix}/blocks/block/{block_id}/edit")
        wait_for(self.driver, lambda d: self._save_button(), "the Save button")
        self._settled()

    def _settled(self, quiet_s: float = 1.0) -> None:
        """Wait until the form stops changing for `quiet_s` (it selects its tabs after the saved
        values load, later on a loaded machine); a fixed pause made the tab checks flaky."""
        last, since = None, time.monotonic()
        deadline = since + WAIT_S
        while time.monotonic() < deadline:
            now = self.driver.execute_script(
                "const f = document.querySelector('form'); return f ? f.innerHTML : '';"
            )
            if now != last:
                last, since = now, time.monotonic()
            elif now and time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.2)
        # still changing after WAIT_S: go on; the check that follows says what it found

    def _name_box(self, driver: Any) -> Any:
        css = "input[name=blockName]" if self.version == "v2" else "input.p-text-input__control"
        return driver.find_element(By.CSS_SELECTOR, css)

    def _save_button(self) -> Any:
        for button in self.driver.find_elements(By.XPATH, "//form//button"):
            if button.text.strip() in ("Save", "Create") and button.is_displayed():
                return button
        return None

    def field(self, title: str, within: Any = None) -> Any:
        """The smallest part of the form holding the field titled `title` and its inputs."""
        label = (
            f"(self::label or self::h3) and (normalize-space(.)='{title}' or "
            f"normalize-space(.)='{title} (Optional)')"
        )
        holds = ".//button[@aria-selected] or .//input or .//textarea or .//select"
        xpath = f".//*[{label}]/ancestor::*[{holds}][1]"
        root = within or self.driver
        return wait_for(self.driver, lambda d: root.find_element(By.XPATH, xpath), title)

    def tabs(self, title: str) -> dict[str, bool]:
        """The field's type tabs and which one is selected."""
        return {
            b.text.strip(): b.get_attribute("aria-selected") == "true"
            for b in self.field(title).find_elements(By.CSS_SELECTOR, "button[aria-selected]")
            if b.text.strip() not in ("Add", "")
        }

    def choose(self, title: str, tab: str) -> None:
        """Select the type tab `tab` (e.g. `None`/`null`, `VaultCredentials`, `VaultSecret`)."""
        buttons = self.field(title).find_elements(By.CSS_SELECTOR, "button[aria-selected]")
        next(b for b in buttons if b.text.strip() == tab).click()
        wait_for(self.driver, lambda d: self.tabs(title).get(tab), f"{title}: tab {tab}")

    def type(self, title: str, text: str, within: Any = None) -> None:
        """Replace the text of the field's input."""
        _replace(self.field(title, within).find_element(By.XPATH, CONTROLS), text)

    def pick_block(self, title: str, name: str) -> None:
        """Choose the saved block document `name` in a nested-block field."""
        field = self.field(title)
        if self.version == "v1":
            select = wait_for(
                self.driver,
                lambda d: next(
                    s for s in field.find_elements(By.CSS_SELECTOR, "select")
                    if name in s.text
                ),
                f"{title}: the block list with {name}",
            )  # fmt: skip
            Select(select).select_by_visible_text(name)
            return
        wait_for(
            self.driver,
            lambda d: field.find_element(By.CSS_SELECTOR, "button[aria-haspopup=listbox]"),
            f"{title}: the block list",
        ).click()
        option = wait_for(
            self.driver,
            lambda d: next(
                o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == name
            ),
            f"option {name}",
        )
        option.click()

    # What a person does with a field, whichever UI draws it.
    def text(self, title: str, value: str) -> None:
        """Type a text value, on the field's text tab when it has tabs (`X | None`)."""
        self._on_tab(title, TEXT[self.version])
        self.type(title, value)

    def secret(self, title: str, value: str) -> None:
        """Type a secret (SecretStr: a password input)."""
        self._on_tab(title, "password")
        self.type(title, value)

    def vault_secret(self, title: str, path: str, key: str) -> None:
        """Give a `VaultSecret` reference (its path and key) instead of a value."""
        self.choose(title, "VaultSecret")
        self.type("Path", path, within=self.field(title))
        self.type("Key", key, within=self.field(title))

    def block(self, title: str, block_type: str, name: str) -> None:
        """Choose the saved block `name` of `block_type` (e.g. `VaultCredentials`)."""
        self.choose(title, block_type)
        self.pick_block(title, name)

    def none(self, title: str) -> None:
        self.choose(title, NONE[self.version])

    def _on_tab(self, title: str, tab: str) -> None:
        tabs = self.tabs(title)
        if tabs and not tabs.get(tab):
            self.choose(title, tab)

    def save(self) -> str:
        """Submit the form; the id of the saved block document."""
        before = self.driver.current_url
        button = wait_for(
            self.driver,
            lambda d: (b := self._save_button()) is not None and b.is_enabled() and b,
            "an enabled Save button",
        )
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()
        wait_for(
            self.driver,
            lambda d: d.current_url != before and "/blocks/block/" in d.current_url
            and not d.current_url.endswith("/edit"),
            "the saved block's page",
        )  # fmt: skip
        return str(self.driver.current_url.rstrip("/").rsplit("/", 1)[-1])


def _replace(box: Any, text: str) -> None:
    """Type `text` into an input in place of what it holds (a draft the UI kept, a default)."""
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
