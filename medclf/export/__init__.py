"""Export: explanation maps as NIfTI on the source grid, PNG overlays, summaries."""

from medclf.export.maps import maps_to_source, overlay_png, source_geometry, write_explanation, write_nifti_map

__all__ = ["maps_to_source", "overlay_png", "source_geometry", "write_explanation", "write_nifti_map"]
