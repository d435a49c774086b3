"""The shipped example config documents every key and loads as it is."""

from __future__ import annotations

import re
from pathlib import Path

from mta.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "node.example.toml"


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.smtp.listen == "127.0.0.1:2525"


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    for section_name, field in Settings.model_fields.items():
        if section_name == "users":
            assert "[[users]]" in text
            continue
        assert f"[{section_name}]" in text, section_name
        annotation = field.annotation
        assert annotation is not None
        for key in annotation.model_fields:  # type: ignore[union-attr]
            assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), f"{section_name}.{key}"
