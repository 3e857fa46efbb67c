"""Export: explanation maps as NIfTI on the source grid, PNG overlays, summaries."""

from medclf.export.maps import maps_to_source, overlay_png, source_geometry, write_explanation, write_nifti_map
from medclf.export.parametric_map import parametric_map_sources, write_parametric_maps
from medclf.export.dicom_sr import ReportContext, SRWriter, build_report
from medclf.export.send import send_files

__all__ = ["maps_to_source", "overlay_png", "source_geometry", "write_explanation", "write_nifti_map",
           "parametric_map_sources", "write_parametric_maps", "ReportContext", "SRWriter", "build_report", "send_files"]
