"""What autogenerate compares, shared by env.py and the test that holds tables.py to the migrations head."""

from __future__ import annotations

# tables the code no longer uses but old databases still hold (see tables.DeliveryJob): kept, not dropped,
# and not reported as differences
RETIRED_TABLES = frozenset({"dicom_exports", "upstream_writebacks"})


def include_object(_obj: object, name: str | None, kind: str, reflected: bool, _compare_to: object) -> bool:
    return not (kind == "table" and reflected and name in RETIRED_TABLES)
