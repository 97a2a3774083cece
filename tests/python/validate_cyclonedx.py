"""Validates a CycloneDX document against the official 1.6 JSON schema, as
shipped in `cyclonedx-python-lib` (strict: no unknown fields).

usage: validate_cyclonedx.py FILE   -> prints "valid", or the error and exits 1
"""
import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
if error is not None:
    print(f"invalid: {error}")
    sys.exit(1)
print("valid")
