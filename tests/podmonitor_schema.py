#!/usr/bin/env python3
"""Validate a PodMonitor manifest against deploy/kubernetes/schema/podmonitor.schema.json.

    python3 tests/podmonitor_schema.py PODMONITOR.yaml SCHEMA.json

Prints one line per error; exits 1 if there is any, 0 otherwise. Uses python3-jsonschema
and python3-yaml. kubernetes-validate has no schema for CRDs, hence this check.
"""

import json
import sys

import jsonschema
import yaml


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    with open(argv[2], encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    v = cls(schema)
    errors = []
    if len(docs) != 1:
        errors.append("expected one document, found %d" % len(docs))
    for d in docs:
        if (d.get("apiVersion"), d.get("kind")) != ("monitoring.coreos.com/v1", "PodMonitor"):
            errors.append("not a monitoring.coreos.com/v1 PodMonitor")
        for e in sorted(v.iter_errors(d), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            errors.append("%s: %s" % (path, e.message))
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
