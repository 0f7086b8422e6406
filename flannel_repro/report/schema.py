"""The shape of `report.json` (JSON Schema, draft 2020-12): the documented contract CI tools can rely on.

Every number that is not finite is written as null. `session`, the `claims` and `snapshots` come from a pytest
session (`--flannel-report`); `flannel-repro report` writes `session: null`, `snapshots: null` and no claims.
`snapshots` counts the session's flannel_snapshot assertions: compared exactly (the run's own class had a
snapshot), within the noise band (another class's, tolerantly), and not compared at all, with why.
A pair class's `plot` is null where all its pairs are bitwise identical over all its `steps` (nothing to plot:
the page says so in words).
"""

from __future__ import annotations

from typing import Any

FORMAT = "flannel-repro/report/1"

_num = {"type": ["number", "null"]}
_int_or_null = {"type": ["integer", "null"]}
_str_or_null = {"type": ["string", "null"]}
_count = {"type": "integer", "minimum": 0}
# why a snapshot assertion compared nothing: skipped by the opt-in policy, failed by the fail policy, failed for
# want of a noise band, no snapshot stored at all, written by --snapshot-update instead of compared, an error
NOT_COMPARED = ("skipped", "fail-policy", "no-band", "no-snapshot", "written", "error")

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "flannel-repro report",
    "type": "object",
    "required": [
        "format",
        "created",
        "environment",
        "session",
        "runs",
        "pair_classes",
        "matrix",
        "sources",
        "stall",
        "claims",
        "verdicts",
        "snapshots",
        "figures",
        "notes",
        "files",
        "seconds",
    ],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "created": {"type": "string"},
        "environment": {
            "type": "object",
            "required": ["python", "platform", "torch", "flannel_repro", "numerics_classes"],
            "properties": {"numerics_classes": {"type": "array", "items": {"type": "string"}}},
        },
        "session": {"type": ["object", "null"]},
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "label",
                    "path",
                    "run_key",
                    "repeat",
                    "config",
                    "steps",
                    "final_loss",
                    "numerics_class",
                    "wall_time_s",
                    "stalled_at",
                    "update_stats_recorded",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "label": {"type": "string"},
                    "path": {"type": "string"},
                    "run_key": {"type": "string"},
                    "repeat": {"type": "integer", "minimum": 0},
                    "config": {"type": "object"},
                    "steps": {"type": "integer", "minimum": 0},
                    "final_loss": _num,
                    "numerics_class": _str_or_null,
                    "wall_time_s": _num,
                    "stalled_at": _int_or_null,
                    "update_stats_recorded": {"type": "boolean"},
                },
            },
        },
        "pair_classes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "class",
                    "plot",
                    "steps",
                    "n_pairs",
                    "identical",
                    "first_step_min",
                    "first_step_max",
                    "final_frobenius_min",
                    "final_frobenius_max",
                    "pairs",
                ],
                "properties": {
                    "class": {"type": "string"},
                    "plot": {"type": ["string", "null"], "pattern": r"^[a-z0-9-]+\.png$"},
                    "steps": {"type": "integer", "minimum": 0},
                    "n_pairs": {"type": "integer", "minimum": 1},
                    "identical": {"type": "integer", "minimum": 0},
                    "first_step_min": _int_or_null,
                    "first_step_max": _int_or_null,
                    "final_frobenius_min": _num,
                    "final_frobenius_max": _num,
                    "pairs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "a",
                                "b",
                                "first_step",
                                "final_frobenius",
                                "final_max_abs",
                                "final_live_share",
                            ],
                            "properties": {
                                "a": {"type": "string"},
                                "b": {"type": "string"},
                                "first_step": _int_or_null,
                                "final_frobenius": _num,
                                "final_max_abs": _num,
                                "final_live_share": _num,
                            },
                        },
                    },
                },
            },
        },
        "matrix": {
            "type": ["object", "null"],
            "required": ["runs", "final_frobenius"],
            "properties": {
                "runs": {"type": "array", "items": {"type": "string"}},
                "final_frobenius": {"type": "array", "items": {"type": "array", "items": _num}},
            },
        },
        "sources": {
            "type": ["object", "null"],
            "required": ["base", "rows"],
            "properties": {
                "base": {"type": "string"},
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["source", "description", "first_step", "steps", "frobenius", "max_abs"],
                    },
                },
            },
        },
        "stall": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["run", "dtype", "recorded", "stalled_at", "at"],
                "properties": {
                    "run": {"type": "string"},
                    "dtype": {"type": "string"},
                    "recorded": {"type": "boolean"},
                    "stalled_at": _int_or_null,
                    "at": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["step", "changed", "lost", "second_moment_moved"],
                            "properties": {
                                "step": {"type": "integer"},
                                "changed": _num,
                                "lost": _num,
                                "second_moment_moved": _num,
                            },
                        },
                    },
                },
            },
        },
        "claims": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["nodeid", "outcome", "duration_s", "message", "plots"],
                "properties": {
                    "nodeid": {"type": "string"},
                    "outcome": {"enum": ["passed", "failed", "skipped"]},
                    "duration_s": _num,
                    "message": _str_or_null,
                    "plots": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "verdicts": {
            "type": "object",
            "required": ["passed", "failed", "skipped"],
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "snapshots": {
            "type": ["object", "null"],
            "required": [
                "assertions",
                "compared_exactly",
                "within_band",
                "not_compared",
                "not_compared_by_reason",
                "policy",
                "items",
            ],
            "additionalProperties": False,
            "properties": {
                "assertions": _count,
                "compared_exactly": _count,
                "within_band": _count,
                "not_compared": _count,
                "not_compared_by_reason": {
                    "type": "object",
                    "propertyNames": {"enum": list(NOT_COMPARED)},
                    "additionalProperties": _count,
                },
                "policy": {"enum": ["tolerant", "fail", "skip"]},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["nodeid", "snapshot", "comparison", "outcome", "reason", "class", "stored"],
                        "properties": {
                            "nodeid": {"type": "string"},
                            "snapshot": _str_or_null,
                            "comparison": {"enum": ["exact", "band", "none"]},
                            "outcome": {"enum": ["passed", "failed", "skipped"]},
                            "reason": {"enum": [*NOT_COMPARED, None]},
                            "class": {"type": "string"},
                            "stored": _str_or_null,
                        },
                    },
                },
            },
        },
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["file", "title", "shows"],
                "properties": {
                    "file": {"type": "string", "pattern": r"^[a-z0-9-]+\.png$"},
                    "title": {"type": "string"},
                    "shows": {"type": "string"},
                },
            },
        },
        "notes": {"type": "array", "items": {"type": "string"}},
        "files": {"type": "array", "items": {"type": "string"}},
        "seconds": _num,
    },
}
