"""The README's config reference lists every field the config defines."""

from pathlib import Path

from ftcore.config import field_docs


def test_readme_documents_every_config_field():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name, _, _ in field_docs() if f"`{name}`" not in readme]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_field_has_a_docstring():
    assert not [name for name, _, doc in field_docs() if not doc]
