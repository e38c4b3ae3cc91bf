"""The documentation users get: every link in README.md and docs/ resolves, the result pictures exist and stay
small, every registered node has an up-to-date in-app help page (web/docs/<node id>.md), and the Registry
archive (`comfy node pack`) holds what the nodes and the docs need."""
import importlib.util
import re
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TECHNIQUE_PICTURES = ["adaptive_guidance", "gfcg", "composable", "ppap", "deediff", "lina_schedule"]
PICTURE_BYTES = 150 * 1024
# Markdown links and images ``[text](target "title")`` and HTML ``src=`` / ``href=`` attributes.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)=\"([^\"]+)\"")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_links(path: Path) -> list[str]:
    """Every link target in ``path`` that points into the repository (fenced code left out)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    targets = [markdown or html for markdown, html in LINK.findall(text)]
    return [t for t in targets if not EXTERNAL.match(t) and not t.startswith("#")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(document):
    missing = [target for target in relative_links(document)
               if not (document.parent / target.split("#")[0]).resolve().is_file()]
    assert missing == [], f"{document.relative_to(REPO)} links to missing files: {missing}"


def test_link_check_sees_markdown_images_and_html(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('[a](x.md#part) ![b](img/y.png "t") <img src="z.png" width="9"> [web](https://e.org) [top](#a)\n'
                    "```\n[code](not_a_link.md)\n```\n")
    assert relative_links(page) == ["x.md#part", "img/y.png", "z.png"]


def test_readme_shows_a_picture_per_technique_and_pictures_stay_small():
    readme = (REPO / "README.md").read_text()
    for name in TECHNIQUE_PICTURES:
        assert f"](docs/images/{name}.png)" in readme, f"README shows no picture of {name}"
    for picture in (REPO / "docs" / "images").rglob("*.png"):
        assert picture.stat().st_size < PICTURE_BYTES, f"{picture.relative_to(REPO)} is over 150 KB"


def test_every_registered_node_has_an_up_to_date_help_page(comfy_dir):
    """The frontend's help panel shows web/docs/<node id>.md; scripts/make_node_docs.py writes them from the node
    schemas (rerun it when a node or a tooltip changes)."""
    expected = _script("make_node_docs").pages()
    pages = {path.name: path.read_text() for path in (REPO / "web" / "docs").glob("*.md")}
    assert sorted(set(expected) - set(pages)) == [], "nodes without a help page: run scripts/make_node_docs.py"
    assert sorted(set(pages) - set(expected)) == [], "help pages of nodes that are not registered"
    stale = sorted(name for name in expected if pages[name] != expected[name])
    assert stale == [], f"out-of-date help pages (run scripts/make_node_docs.py): {stale}"


def test_registry_archive_holds_the_nodes_weights_workflows_and_docs(tmp_path, monkeypatch):
    """What `comfy node pack` uploads: git-tracked files minus .comfyignore, plus [tool.comfy] includes."""
    import tomllib
    from comfy_cli.file_utils import zip_files

    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    archive = tmp_path / "node.zip"
    monkeypatch.chdir(REPO)
    zip_files(archive, includes=includes)
    names = set(zipfile.ZipFile(archive).namelist())
    needed = ["__init__.py", "pyproject.toml", "README.md", "LICENSE", "web/icon.svg", "web/guidance_kit.js"]
    needed += [str(path.relative_to(REPO)) for pattern in ("nodes/**/*.py", "samplers/**/*.py", "toyworld/**/*.py",
                                                           "workflows/*.json", "docs/**/*.md", "docs/images/*.png",
                                                           "web/docs/*.md", "toyworld/**/*.safetensors")
               for path in REPO.glob(pattern)]
    missing = sorted(name for name in needed if name not in names)
    assert missing == [], f"the Registry archive lacks {missing} (commit them, or add them to [tool.comfy] includes)"
    assert any(name.endswith(".safetensors") for name in names) and any(n.startswith("web/docs/") for n in names)
    assert not [name for name in names if name.startswith((".venv/", ".comfyui/", "out/", ".cache/"))]
