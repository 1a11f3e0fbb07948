#!/usr/bin/env python3
"""Validate a Grafana dashboard against the JSON Schemas in dashboards/schema/.

    python3 tests/dashboard_schema.py DASHBOARD.json SCHEMA_DIR

The schemas are generated from Grafana's own TypeScript types by
scripts/grafana-schemas.sh. What is checked:

- the dashboard, without the export wrapper keys (__inputs, __requires, __elements,
  which only the import UI reads), against the `Dashboard` kind;
- each panel against `Panel` or, for rows, `RowPanel` (one at a time, so that an error
  names the panel);
- each panel's `options` and `fieldConfig.defaults.custom` against its plugin's
  `Options` and `FieldConfig`;
- each target of a Prometheus panel against the Prometheus query model.

A panel type with no schema here is an error: add it to scripts/grafana-schemas.sh.
Prints one line per error and exits 1 if there is any, 0 otherwise; 2 on bad usage.
Uses Debian's python3-jsonschema.
"""

import json
import os
import sys

import jsonschema

WRAPPER_KEYS = ("__inputs", "__requires", "__elements")


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validator(schema, ref=None):
    """A draft-07 validator for the schema, or for one of its definitions."""
    cls = jsonschema.Draft7Validator
    cls.check_schema(schema)
    if ref is not None:
        schema = dict(schema, **{"$ref": "#/definitions/" + ref})
    return cls(schema)


def where(prefix, error):
    path = "".join(
        "[%d]" % p if isinstance(p, int) else ".%s" % p for p in error.absolute_path
    )
    return prefix + path


def check(v, instance, prefix, errors):
    for e in sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        errors.append("%s: %s" % (where(prefix, e), e.message))


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    dashboard_path, schema_dir = argv[1], argv[2]
    d = load(dashboard_path)
    for k in WRAPPER_KEYS:
        d.pop(k, None)

    dash_schema = load(os.path.join(schema_dir, "dashboard.json"))
    prom_schema = load(os.path.join(schema_dir, "prometheus-query.json"))
    prom = validator(prom_schema)
    panel_v = validator(dash_schema, "Panel")
    row_v = validator(dash_schema, "RowPanel")

    errors = []
    # The panels are checked one by one below; an error in the Panel | RowPanel union
    # would otherwise only say that neither matched.
    whole = dict(d)
    whole["panels"] = []
    check(validator(dash_schema), whole, "dashboard", errors)

    for i, p in enumerate(d.get("panels", [])):
        name = "panels[%d] (%s)" % (i, p.get("title", "?"))
        if p.get("type") == "row":
            check(row_v, p, name, errors)
            continue
        check(panel_v, p, name, errors)
        kind = p.get("type")
        options_path = os.path.join(schema_dir, "panels", "%s.options.json" % kind)
        custom_path = os.path.join(schema_dir, "panels", "%s.custom.json" % kind)
        if not (os.path.exists(options_path) and os.path.exists(custom_path)):
            errors.append("%s: no schema for panel type %r in %s" % (name, kind, schema_dir))
            continue
        check(validator(load(options_path)), p.get("options", {}), name + ".options", errors)
        custom = p.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
        check(
            validator(load(custom_path)),
            custom,
            name + ".fieldConfig.defaults.custom",
            errors,
        )
        for j, t in enumerate(p.get("targets", [])):
            ds = t.get("datasource") or p.get("datasource") or {}
            if ds.get("type") != "prometheus":
                errors.append("%s.targets[%d]: not a Prometheus target" % (name, j))
                continue
            check(prom, t, "%s.targets[%d]" % (name, j), errors)

    for e in errors:
        print(e)
    print("%d errors in %s" % (len(errors), dashboard_path), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
