"""Which of the fields the operator sets on a child no longer hold what it set (a `kubectl edit`, a script).

The API fills in defaults and fields of its own (a container's terminationMessagePath, a Service's clusterIP),
drops empty and false values, and may write a quantity another way ("1000m" as "1"). So the comparison is
one-sided: each field the operator sets must hold its value, and what else the object holds is not judged.
Lists of named items (containers, env, volumes, ports) are matched by name; other lists, and selectors, must match
in full.
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils import parse_quantity

# Maps that mean something only as a whole: a selector with one more label selects other pods, or none.
WHOLE_MAPS = ("selector", "matchLabels", "nodeSelector")


def drifted(desired: Any, observed: Any, path: str = "", key: str = "", quantity: bool = False) -> list[str]:
    """The paths (``spec.template.spec.containers[tfs].image``) at which ``observed`` lost a value of ``desired``.
    ``key``: the key ``desired`` is under; ``quantity``: ``desired`` is a value of resource limits or requests."""
    if desired is None or (observed is None and desired in (False, 0, "", {}, [])):
        return []  # not set by the operator; or empty, which reads the same as unset once stored
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return [path]
        if key in WHOLE_MAPS:
            return [] if desired == observed else [path]
        in_resources = key in ("limits", "requests")
        return [
            drift
            for k, value in desired.items()
            for drift in drifted(value, observed.get(k), f"{path}.{k}" if path else k, k, in_resources)
        ]
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return [path]
        names = [item.get("name") for item in desired if isinstance(item, dict)]
        if desired and None not in names and len(set(names)) == len(desired):  # a map by name, as the API merges it
            named = {item.get("name"): item for item in observed if isinstance(item, dict)}
            return [
                drift for item in desired for drift in drifted(item, named.get(item["name"]), f"{path}[{item['name']}]")
            ]
        if len(desired) != len(observed):
            return [path]
        return [
            drift
            for i, (d, o) in enumerate(zip(desired, observed, strict=True))
            for drift in drifted(d, o, f"{path}[{i}]")
        ]
    if desired == observed or (quantity and _same_quantity(desired, observed)):
        return []
    return [path]


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError):
        return False
