"""The README's config reference lists every field the config defines."""

from pathlib import Path

from ftcore.config import field_docs


def test_readme_documents_every_config_field():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name, _, _ in field_docs() if f"`{name}`" not in readme]
    assert not missing, f"README config reference lacks: {missing}"


def test_every_field_has_a_docstring():
    assert not [name for name, _, doc in field_docs() if not doc]


def test_readme_names_every_source_file_in_how_the_parts_fit():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## How the parts fit"):readme.index("## Configs")]
    files = [p.relative_to(root).as_posix() for top in ("ftcore", "launcher") for p in (root / top).rglob("*.py")
             if "assets" not in p.parts and (p.name != "__init__.py" or p.parent.name == "train")]
    missing = [f for f in sorted(files) if f"`{f}`" not in section]
    assert not missing, f"README 'How the parts fit' lacks: {missing}"
