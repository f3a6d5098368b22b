"""docs/images-api.md documents exactly the image routes, in YAML the lead merges into docs/openapi.yaml."""

import os
import re

import yaml

import hyperd.api.images  # noqa: F401 - registers the routes
from hyperd.api.app import HyperAPI

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def _blocks():
    with open(os.path.join(DOCS, "images-api.md")) as f:
        text = f.read()
    return text, re.findall(r"```yaml\n(.*?)```", text, re.S)


def test_the_openapi_text_covers_exactly_the_image_routes():
    text, (paths_block, schemas_block) = _blocks()
    paths = yaml.safe_load(paths_block)
    documented = {(m.upper(), p) for p, item in paths.items() for m in item}
    image_routes = {(m, r.rule) for r in HyperAPI.app.url_map.iter_rules()
                    if r.endpoint.startswith(("image_", "images_")) for m in r.methods - {"HEAD", "OPTIONS"}}
    assert documented == image_routes
    # every $ref resolves in openapi.yaml's components or in section C
    with open(os.path.join(DOCS, "openapi.yaml")) as f:
        components = yaml.safe_load(f)["components"]
    components["schemas"].update(yaml.safe_load(schemas_block))
    for ref in re.findall(r'\$ref: "#/components/(\w+)/(\w+)"', paths_block):
        assert ref[1] in components[ref[0]], ref
    for method, path in image_routes:
        assert f"`{method} {path}" in text, (method, path)
