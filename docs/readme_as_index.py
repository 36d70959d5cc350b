"""mkdocs hook: the repository's README.md is the site's home page (docs/index.md is not kept)."""

import os

from mkdocs.structure.files import File


def on_files(files, config):
    readme = os.path.join(os.path.dirname(config["config_file_path"]), "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    files.append(File.generated(config, "index.md", content=text))
    return files
