"""Malformed polygons in COCO ``segmentation`` fields, dropped only where they must be.

Each such annotation is named in one warning; a box model keeps the box, a mask model the valid
polygons.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ["PolygonIssue", "find_polygon_issues", "fix_annotation", "polygon_problem", "warning"]

_LISTED = 10


def polygon_problem(polygon) -> Optional[str]:
    """What is wrong with one polygon, or None when it is a valid ``[x1, y1, ..., xn, yn]``."""
    if not isinstance(polygon, (list, tuple)):
        return f"a polygon is a {type(polygon).__name__}, not a list of coordinates"
    numbers = [v for v in polygon if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(polygon):
        return f"a polygon holds {len(polygon) - len(numbers)} non-numeric value(s)"
    if not all(math.isfinite(v) for v in numbers):
        return "a polygon holds a non-finite coordinate (NaN or infinity)"
    if len(polygon) % 2:
        return f"a polygon has an odd count of numbers ({len(polygon)}); expected x, y pairs"
    if len(polygon) < 6:
        return f"a polygon has {len(polygon)} numbers; expected at least 6 (3 points)"
    return None


@dataclass
class PolygonIssue:
    """An annotation (at ``index``) with malformed polygons, and its ``valid`` ones."""

    index: int
    annotation_id: object
    image_id: object
    reason: str
    valid: List[list]


def find_polygon_issues(annotations: List[dict]) -> List[PolygonIssue]:
    """The annotations whose polygon list ``segmentation`` has malformed polygons."""
    issues = []
    for i, a in enumerate(annotations):
        segmentation = a.get("segmentation") if isinstance(a, dict) else None
        if not isinstance(segmentation, list) or not segmentation:
            continue
        problems = [polygon_problem(p) for p in segmentation]
        bad = [p for p in problems if p is not None]
        if not bad:
            continue
        valid = [poly for poly, p in zip(segmentation, problems) if p is None]
        reason = bad[0] + (
            f" ({len(bad)} of its {len(segmentation)} polygons)" if len(segmentation) > 1 else ""
        )
        issues.append(PolygonIssue(i, a.get("id"), a.get("image_id"), reason, valid))
    return issues


def fix_annotation(annotation: dict, issue: PolygonIssue, mask_on: bool) -> Optional[dict]:
    """``annotation`` as training uses it, or None (dropped) when a mask model has no polygon."""
    if not mask_on:
        return {k: v for k, v in annotation.items() if k != "segmentation"}
    if issue.valid:
        return dict(annotation, segmentation=issue.valid)
    return None


def warning(
    dataset_name: str, json_file: str, issues: List[PolygonIssue], files: Dict, mask_on: bool
) -> str:
    """The one warning naming every annotation of ``issues`` (``files``: image id -> file)."""
    n = len(issues)
    lines = [
        f"Dataset {dataset_name!r}: {json_file} has {n} annotation{'s' * (n != 1)} with "
        "malformed polygons (expected [x1, y1, x2, y2, ...] with at least 3 points):"
    ]
    for issue in issues[:_LISTED]:
        if not mask_on:
            action = "box kept without its segmentation"
        elif issue.valid:
            action = f"kept with its {len(issue.valid)} valid polygon(s)"
        else:
            action = "instance dropped (no valid polygon for its mask)"
        lines.append(
            f"  image {files.get(issue.image_id, issue.image_id)}, annotation id "
            f"{issue.annotation_id}: {issue.reason}; {action}"
        )
    if n > _LISTED:
        lines.append(f"  ... and {n - _LISTED} more")
    lines.append(
        "MODEL.MASK_ON is False: the boxes train as usual."
        if not mask_on
        else "MODEL.MASK_ON is True: an instance without a valid polygon has no mask to learn."
    )
    return "\n".join(lines)
