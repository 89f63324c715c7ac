"""The report's pictures, rendered offline from the same Vega-Lite templates `dvc plots show` uses.

`.dvc/plots/<name>.json` is a DVC plot template: a Vega-Lite spec whose data is the anchor
"<DVC_METRIC_DATA>". DVC fills it with the rows of the plot's file, each row tagged with its git
revision (`rev`); `fill` does the same for one revision, so the report's image and DVC's page are one
picture. vl-convert renders the spec with its own bundled Vega (no browser, no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import vl_convert

TEMPLATES_DIR = Path(".dvc/plots")  # DVC's default template folder: `template: frontier` in dvc.yaml
DATA_ANCHOR = "<DVC_METRIC_DATA>"
# The oldest Vega-Lite vl-convert bundles; the `dvc plots show` page loads 5.2 from a CDN, so the
# templates use nothing newer than what both understand.
VEGA_LITE_VERSION = "5.8"
PNG_SCALE = 2  # pixels per spec pixel: sharp on high-density screens, ~100 KB per image


def load_template(name: str, templates_dir: Path = TEMPLATES_DIR) -> dict:
    return json.loads((templates_dir / f"{name}.json").read_text())


def fill(template: dict, rows: list[dict], revision: str) -> dict:
    """The template with its data anchor replaced by `rows`, each tagged `rev` as DVC does."""
    if template.get("data") != {"values": DATA_ANCHOR}:
        raise ValueError(f'template data must be {{"values": "{DATA_ANCHOR}"}}, got {template.get("data")!r}')
    return {**template, "data": {"values": [{**row, "rev": revision} for row in rows]}}


def render_png(spec: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=PNG_SCALE))
