"""Provenance of a score table: where its scores came from and how its rows were selected.

One typed record, :class:`Provenance`, kept as JSON in the table's ``info.description``: ``datasets`` carries
``info`` through ``map``, ``filter``, ``sort``, ``select``, ``add_column``, ``save_to_disk``/``load_from_disk``
(tests/test_provenance.py checks each). Its dictionary form is ``{"influence": {...}, "selection": {...}}``;
each part holds its stage's settings whole under ``"settings"``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """``influence``: stores, tasks, checkpoint weights, features and the influence settings of the scores;
    ``selection``: the selection settings and what they gave (thresholds, sizes); ``extra``: any other top-level
    key a caller stored (kept as is)."""

    influence: dict | None = None
    selection: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict | None) -> Provenance:
        values = dict(values or {})
        influence, selection = values.pop("influence", None), values.pop("selection", None)
        return cls(influence=influence, selection=selection, extra=values)

    @classmethod
    def of(cls, table) -> Provenance:
        """The provenance a table carries (empty when it carries none or unreadable JSON)."""
        text = getattr(getattr(table, "info", None), "description", None)
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except (TypeError, ValueError):
            logger.debug("table description is not JSON provenance; ignored")
            return cls()
        return cls.from_dict(values if isinstance(values, dict) else {})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        if self.influence is not None:
            out["influence"] = self.influence
        if self.selection is not None:
            out["selection"] = self.selection
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def attach(self, table):
        """Writes this provenance into ``table.info.description`` (in place) and returns the table."""
        table.info.description = self.to_json()
        return table


def provenance(table) -> dict:
    """The provenance that ``compute_influence``/``select`` attach to a score table, as a dict (empty if none)."""
    return Provenance.of(table).to_dict()


__all__ = ["Provenance", "provenance"]
