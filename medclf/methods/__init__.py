"""Methods, one module each, registered by name (``--method``)."""

from medclf.methods.base import METHODS, Method, register_method
from medclf.methods import baseline, didicm, diffmic, diffusion_classifier, repdiff  # noqa: F401  (registers)

__all__ = ["METHODS", "Method", "register_method", "get_method", "methods_of_kind"]


def get_method(name: str) -> type[Method]:
    from medclf.errors import MedclfError

    if name not in METHODS:
        raise MedclfError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def methods_of_kind(kind: str) -> list[str]:
    """Registered names of one kind ("classifier" for ``finetune --method``, "pretrain" for ``pretrain``)."""
    return sorted(n for n, m in METHODS.items() if m.kind == kind)
