#!/usr/bin/env python3
"""Turn a Kubernetes release's OpenAPI v2 document (api/openapi-spec/swagger.json
in the k8s.io/kubernetes module) into standalone, strict JSON schemas that
kubeconform reads with

    -schema-location 'DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json'

(file names as in yannh/kubernetes-json-schema: deployment-apps-v1.json,
service-v1.json, clusterrole-rbac-v1.json). "Strict": objects with declared
properties get additionalProperties: false, so unknown fields are errors.
Stdlib only; usage: openapi2jsonschema.py swagger.json OUTDIR
"""
import copy
import json
import os
import sys

PERMISSIVE = {}  # stands in for a recursive reference (JSONSchemaProps)

SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"oneOf": [{"type": "string"}, {"type": "number"}]},
}


def nullable(t):
    if isinstance(t, list):
        return t if "null" in t else t + ["null"]
    return [t, "null"]


def main(src, out):
    with open(src) as f:
        defs = json.load(f)["definitions"]
    memo = {}

    def expand(node, stack):
        if isinstance(node, list):
            return [expand(x, stack) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return resolve(name, stack)
        res = {}
        for k, v in node.items():
            if k in ("properties", "patternProperties"):
                res[k] = {pk: expand(pv, stack) for pk, pv in v.items()}
            elif k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not"):
                res[k] = expand(v, stack)
            elif k.startswith("x-kubernetes-") or k == "format":
                continue
            else:
                res[k] = v
        if "properties" in res and "additionalProperties" not in res:
            res["additionalProperties"] = False
        if "type" in res:
            res["type"] = nullable(res["type"])
        return res

    def resolve(name, stack):
        if name in SPECIAL:
            return copy.deepcopy(SPECIAL[name])
        if name in stack:
            return PERMISSIVE
        if name not in memo:
            memo[name] = expand(defs[name], stack | {name})
        return memo[name]

    os.makedirs(out, exist_ok=True)
    n = 0
    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            group, version, kind = gvk.get("group", ""), gvk["version"], gvk["kind"]
            schema = copy.deepcopy(resolve(name, frozenset()))
            props = schema.setdefault("properties", {})
            api_version = f"{group}/{version}" if group else version
            props["apiVersion"] = {"type": ["string", "null"], "enum": [api_version]}
            props["kind"] = {"type": ["string", "null"], "enum": [kind]}
            schema["$schema"] = "http://json-schema.org/schema#"
            suffix = f"-{group.split('.')[0].lower()}-{version}" if group else f"-{version}"
            fn = os.path.join(out, f"{kind.lower()}{suffix}.json")
            if os.path.exists(fn):  # first one wins (same short group name)
                continue
            with open(fn, "w") as f:
                json.dump(schema, f, separators=(",", ":"))
            n += 1
    print(f"wrote {n} schemas to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
