"""Recipe section `route`: how the routing policy is fitted."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section


class RouteConfig(Section):
    tolerance: float = Field(
        0.02, ge=0, le=1, description="Routed quality may fall at most this far below the teacher's (0.02 = 2 points)."
    )
    length_quantile: float = Field(
        1.0, gt=0, le=1, description="Inputs longer than this quantile of trained input lengths go to the teacher."
    )
    min_records: int = Field(
        5, gt=0, description="A function with fewer held-out records than this is never sent to the student."
    )
