"""The Extensions Index entry (ExtensionsIndex/AnyMC3D.json, the file to submit to Slicer/ExtensionsIndex for Slicer
5.10) against the catalog-entry schema it names, and against the extension's own CMake metadata (one repository URL,
set in one place: the top of CMakeLists.txt)."""

import copy
import json
import os
import re

import jsonschema
import pytest

from .slicer_testing import REPO_ROOT

ENTRY = os.path.join(REPO_ROOT, "ExtensionsIndex", "AnyMC3D.json")

#: Written for this test from Slicer/ExtensionsIndex (commit 07f1d1b, schemas/slicer-extension-catalog-entry-schema-
#: v1.0.1.json, the schema the 5.10 entries name): required fields, types, enum and range, no other fields.
CATALOG_ENTRY_SCHEMA_V1_0_1 = {
    "$schema": "http://json-schema.org/draft-07/schema",
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "category": {"type": "string"},
        "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"},
        "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"},
        "tier": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"


def cmakeValue(name):
    with open(os.path.join(REPO_ROOT, "CMakeLists.txt"), encoding="utf-8") as file:
        match = re.search(rf'^set\({name} "([^"]*)"\)', file.read(), re.MULTILINE)
    assert match, name
    return match.group(1)


@pytest.fixture(scope="module")
def entry():
    with open(ENTRY, encoding="utf-8") as file:
        return json.load(file)


def test_entry_is_valid_against_the_catalog_schema(entry):
    jsonschema.Draft7Validator(CATALOG_ENTRY_SCHEMA_V1_0_1).validate(entry)
    assert entry["$schema"] == SCHEMA_URL
    assert entry["build_dependencies"] == ["PyTorch"]


@pytest.mark.parametrize("change", ["no category", "no scm_url", "unknown field", "tier 0", "scm_type svn"])
def test_the_schema_copy_refuses_what_the_index_refuses(entry, change):
    broken = copy.deepcopy(entry)
    if change.startswith("no "):
        del broken[change[3:]]
    elif change == "unknown field":
        broken["homepage"] = "https://example.org"
    elif change == "tier 0":
        broken["tier"] = 0
    else:
        broken["scm_type"] = "svn"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(CATALOG_ENTRY_SCHEMA_V1_0_1).validate(broken)


def test_entry_matches_the_extension_metadata(entry):
    """Category, dependencies, repository and branch: the same as the CMake metadata, set in one place."""
    assert entry["category"] == cmakeValue("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmakeValue("EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == cmakeValue("ANYMC3D_REPOSITORY_URL")
    assert entry["scm_revision"] == cmakeValue("ANYMC3D_REPOSITORY_BRANCH")
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert "${ANYMC3D_REPOSITORY_URL}" in cmakeValue(name) or "${_raw_url}" in cmakeValue(name), name
