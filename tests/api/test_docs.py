"""docs/openapi.yaml and docs/api.md describe exactly the routes the API serves."""

import os
import re

import yaml

from hyperd.api.app import HyperAPI

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def served_routes():
    routes = set()
    for rule in HyperAPI.app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)))
    return routes


def test_openapi_lists_every_route_and_no_other():
    with open(os.path.join(DOCS, "openapi.yaml")) as f:
        spec = yaml.safe_load(f)
    assert spec["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item
                  if method in ("get", "post", "put", "delete", "patch")}
    assert documented == served_routes()


def test_every_route_has_a_section_in_api_md():
    with open(os.path.join(DOCS, "api.md")) as f:
        text = f.read()
    for method, path in served_routes():
        assert f"`{method} {path}" in text or f"{method} {path}?" in text or f"and `{method} {path}" in text, \
            (method, path)


def test_every_reference_in_openapi_resolves():
    import re

    with open(os.path.join(DOCS, "openapi.yaml")) as f:
        text = f.read()
    components = yaml.safe_load(text)["components"]
    refs = set(re.findall(r'\$ref: "#/components/(\w+)/(\w+)"', text))
    assert refs
    for kind, name in refs:
        assert name in components.get(kind, {}), f"#/components/{kind}/{name} is not defined"
