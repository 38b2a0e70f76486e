"""lockstep.config.reference: docs/config-reference.md is what the generator writes from the section
dataclasses today, so the page cannot fall behind the code."""


def test_the_config_reference_page_is_current():
    from pathlib import Path

    from lockstep.config.reference import config_reference

    page = (Path(__file__).resolve().parents[2] / "docs" / "config-reference.md").read_text()
    assert config_reference() in page, "regenerate with: lockstep config-reference > docs/config-reference.md"
