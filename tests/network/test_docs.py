"""docs/network.md's OpenAPI text documents exactly the port-mapping routes, and its references resolve
(in openapi.yaml's components or in its own schemas block), ready for the lead to merge."""

import os
import re

import yaml

from hyperd.api.app import HyperAPI

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def test_openapi_text_covers_exactly_the_portmapping_routes():
    with open(os.path.join(DOCS, "network.md")) as f:
        text = f.read()
    paths_block, schemas_block = re.findall(r"```yaml\n(.*?)```", text, re.S)
    paths = yaml.safe_load(paths_block)
    documented = {(m.upper(), p) for p, item in paths.items() for m in item}
    served = {(m, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule)) for r in HyperAPI.app.url_map.iter_rules()
              if r.endpoint.startswith("portmappings_") for m in r.methods - {"HEAD", "OPTIONS"}}
    assert documented == served == {("GET", "/pod/{pod_id}/portmappings"),
                                    ("PUT", "/pod/{pod_id}/portmappings/{action}")}
    with open(os.path.join(DOCS, "openapi.yaml")) as f:
        components = yaml.safe_load(f)["components"]
    components["schemas"].update(yaml.safe_load(schemas_block))
    refs = re.findall(r'\$ref: "#/components/(\w+)/(\w+)"', paths_block)
    assert refs
    for kind, name in refs:
        assert name in components[kind], (kind, name)
    assert "`GET /pod/{id}/portmappings`" in text and "`PUT /pod/{id}/portmappings/add`" in text
