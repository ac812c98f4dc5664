"""The static HTML neuron viewer: ``build_viewer(lake, out_dir)`` (also `neuron-pipeline viewer`)."""

from neuron_pipeline.viewer.build import ViewerSummary, build_viewer, default_viewer_dir

__all__ = ["ViewerSummary", "build_viewer", "default_viewer_dir"]
