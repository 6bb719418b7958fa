"""The report schema: a valid draft 2020-12 schema shipped with the package,
documenting every key; real compress and analyze reports validate against
it and broken ones do not."""

from __future__ import annotations

import json

import jsonschema
import pytest

from radio_reports import analyze_report, compress_report, dry_run_report
from sglp_onnx import validate_report
from sglp_onnx.report.summary import report_schema, to_json


def walk_properties(schema: dict, path: str = "$"):
    """Every (path, subschema) of a named property, recursively."""
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from walk_properties(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from walk_properties(schema[key], f"{path}[]")
    for key in ("oneOf", "anyOf", "prefixItems"):
        for sub in schema.get(key, []):
            yield from walk_properties(sub, path)
    for name, sub in schema.get("$defs", {}).items():
        yield from walk_properties(sub, f"#{name}")


def test_schema_is_valid_draft_2020_12_and_packaged():
    schema = report_schema()  # read through importlib.resources, as an installed package would
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_property_is_described():
    schema = report_schema()
    undocumented = [path for path, sub in walk_properties(schema)
                    if "description" not in sub and "$ref" not in sub and "const" not in sub]
    assert undocumented == []


def test_schema_lists_every_key_of_real_reports():
    properties = set(report_schema()["properties"])
    assert set(compress_report()) <= properties
    assert set(analyze_report()) <= properties
    assert set(dry_run_report()) <= properties
    assert properties == set(compress_report()) | set(analyze_report()) | set(dry_run_report())


@pytest.mark.parametrize("make", [compress_report, analyze_report, lambda: analyze_report("last"), dry_run_report],
                         ids=["compress", "analyze", "analyze-last", "dry-run"])
def test_real_reports_validate(make):
    report = make()
    validate_report(report)
    validate_report(to_json(report))  # the JSON text as written to disk


def test_written_report_file_validates(tmp_path):
    from sglp_onnx import compress
    from radio_reports import MODEL

    result = compress(MODEL, tmp_path / "m.onnx", criterion="random", remove=2, seed=3)
    validate_report(json.loads(result.report_path.read_text()))


def _drop(key):
    def broken(report):
        del report[key]
    return broken


BROKEN = {
    "missing units": _drop("units"),
    "missing suggestions": _drop("suggestions"),
    "unknown top-level key": lambda r: r.update(extra=1),
    "unit without removed": lambda r: r["units"][0].pop("removed"),
    "unit removed is not a bool": lambda r: r["units"][0].update(removed="yes"),
    "negative params": lambda r: r["before"].update(params=-1),
    "segment range of three": lambda r: r["segments"][0].append(9),
    "bad granularity": lambda r: r.update(granularity="block"),
    "suggestion target above 1": lambda r: r["suggestions"][0].update(target_flops=1.5),
    "achievable suggestion without units": lambda r: r["suggestions"][0].update(removed=None),
    "output without after": lambda r: r.update(output="x.onnx"),
}


@pytest.mark.parametrize("damage", BROKEN.values(), ids=BROKEN.keys())
def test_broken_reports_fail(damage):
    report = analyze_report()
    damage(report)
    with pytest.raises(jsonschema.ValidationError):
        validate_report(report)


def test_compress_report_without_validation_fails():
    report = compress_report()
    del report["validation"]
    with pytest.raises(jsonschema.ValidationError, match="validation"):
        validate_report(report)
